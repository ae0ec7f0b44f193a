"""What loading a trio would take, without loading it: each role's placement, dtype, weight bytes and KV cache.

Weights are counted from the safetensors headers (parameter counts × the bytes of the dtype they load
in; 4-bit and 8-bit quantisation at 0.5 and 1 byte per parameter of the quantised layers, all but the
embeddings, plus the rest at the dtype); an adapter adds its own file; roles sharing one loaded model count
it once. The KV cache is 2 (keys, values) × layers × KV heads × head size × dtype bytes per token and row.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..backends.remote.spec import is_remote_spec
from . import registry
from .placement import Placement, torch_dtype, where
from .specs import adapter_base, is_llama_cpp, local_path, with_backend

BYTES_PER_PARAMETER = {"4bit": 0.5, "8bit": 1.0}


@dataclass
class RolePlan:
    role: str
    spec: str
    runs_in: str  # "transformers" | "llama.cpp" | "server"
    where: str  # a device, a device map, the server's address
    dtype: str
    weights: int | None  # bytes this role adds (0 when it shares another role's weights; None: unknown)
    kv_per_token: int | None  # bytes of KV cache per token per row
    note: str = ""


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


def _unprepared(spec: str) -> bool:
    """A registered model whose weights are not converted yet: planning must not convert it."""
    return spec in registry.MODELS and not (registry.model_dir(spec) / "config.json").exists()


def plan_roles(specs: dict[str, str], placements: dict[str, Placement], backend: str | None = None) -> list[RolePlan]:
    """One RolePlan per role, in order; nothing is loaded or converted."""
    plans, counted = [], set()
    for role, raw_spec in specs.items():
        spec = with_backend(raw_spec, backend)
        placement = placements[role]
        if is_remote_spec(spec):
            plans.append(RolePlan(role, raw_spec, "server", spec.split("?")[0][len("openai:"):], "-", 0, None))
            continue
        if is_llama_cpp(spec) or (Path(spec).suffix == ".gguf"):
            name = spec.removeprefix("gguf:")
            path = None if name in registry.MODELS or name in registry.ADAPTERS else local_path(name)
            weights = path.stat().st_size if path is not None and path.is_file() else None
            plans.append(RolePlan(role, raw_spec, "llama.cpp" if is_llama_cpp(spec) else "transformers", "cpu",
                                  "gguf", weights, None, "KV: --ctx cells per model" if is_llama_cpp(spec) else ""))
            continue
        plans.append(_transformers_plan(role, raw_spec, spec, placement, counted))
    return plans


def _transformers_plan(role: str, raw_spec: str, spec: str, placement: Placement, counted: set) -> RolePlan:
    if _unprepared(spec):
        return RolePlan(role, raw_spec, "transformers", where(placement), placement.dtype or "auto", None, None,
                        "registered, not converted yet (it is on first use)")
    path = local_path(spec)
    base = adapter_base(path)
    adapter = path if base is not None else None
    if base is not None:
        if _unprepared(base):
            return RolePlan(role, raw_spec, "transformers", where(placement), placement.dtype or "auto", None, None,
                            f"adapter on {base}, not converted yet")
        path = local_path(base)
    dtype = torch_dtype(placement, path)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    key = (str(path.resolve()), placement.key)
    weights = 0 if key in counted else weight_bytes(path, dtype, placement.quantize)
    counted.add(key)
    note = "shares weights loaded for another role" if weights == 0 else ""
    if adapter is not None:
        weights += sum(f.stat().st_size for f in adapter.glob("*.safetensors"))
        note = f"adapter on {base}" + (" (base shared)" if note else "")
    name = str(dtype).removeprefix("torch.") + (f" ({placement.quantize})" if placement.quantize else "")
    return RolePlan(role, raw_spec, "transformers", where(placement), name, weights,
                    kv_bytes_per_token(config, dtype), note)


def table(plans: Sequence[RolePlan], batch: int, context: int) -> str:
    def size(n):
        return "?" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    lines = [f"{'role':<12} {'runs in':<12} {'where':<22} {'dtype':<16} {'weights':>11} "
             f"{f'KV (batch {batch} x {context})':>22}  spec"]
    total = 0
    for p in plans:
        kv = None if p.kv_per_token is None else p.kv_per_token * batch * context
        total += (p.weights or 0) + (kv or 0)
        lines.append(f"{p.role:<12} {p.runs_in:<12} {p.where:<22} {p.dtype:<16} {size(p.weights):>11} "
                     f"{size(kv):>22}  {p.spec}" + (f"  ({p.note})" if p.note else ""))
    lines.append(f"total known: {size(total)} (activations and logits come on top: batch x vocabulary x 4 bytes "
                 f"per step and role)")
    return "\n".join(lines)
