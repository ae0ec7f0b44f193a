"""How much memory a model takes, read from its files without loading it (the backends' plans, models/plan.py).

Weights are counted from the safetensors headers (parameter counts × the bytes of the dtype they load
in; 4-bit and 8-bit quantisation at 0.5 and 1 byte per parameter of the quantised layers, all but the
embeddings, plus the rest at the dtype). The KV cache is 2 (keys, values) × layers × KV heads × head size
× dtype bytes per token and row. A GGUF file weighs what it holds.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from . import registry
from .specs import local_path

BYTES_PER_PARAMETER = {"4bit": 0.5, "8bit": 1.0}


def _safetensors_counts(directory: Path) -> dict[str, int]:
    """tensor name -> number of elements, from every .safetensors header in the directory (no weights read)."""
    counts: dict[str, int] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                counts[name] = count
    return counts


def weight_bytes(directory: Path, dtype: torch.dtype, quantize: str | None) -> int:
    counts = _safetensors_counts(directory)
    size = torch.tensor([], dtype=dtype).element_size()
    if quantize is None:
        return sum(counts.values()) * size
    # bitsandbytes quantises the linear layers; embeddings and norms stay in the compute dtype
    kept = sum(n for name, n in counts.items() if "embed" in name or "norm" in name or "lm_head" in name)
    return int((sum(counts.values()) - kept) * BYTES_PER_PARAMETER[quantize] + kept * size)


def kv_bytes_per_token(config: dict, dtype: torch.dtype) -> int | None:
    config = config.get("text_config", config)
    layers, heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    if not (layers and heads and hidden):
        return None
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def gguf_bytes(name: str) -> int | None:
    """A GGUF file's size; None for a registered name (its file may not be assembled yet) or a directory."""
    path = None if name in registry.MODELS or name in registry.ADAPTERS else local_path(name)
    return path.stat().st_size if path is not None and path.is_file() else None
