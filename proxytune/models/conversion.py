"""GGUF file -> transformers model directory with safetensors weights.

transformers can read a GGUF file directly but dequantises every tensor on each load (12–42 s here)
and refuses to `save_pretrained` such a model (its GGUF quantizer stays attached). So the weights are
dequantised once and written with safetensors' own writer, next to the config, generation config and
tokenizer that transformers derived from the GGUF metadata. Reloading then takes about a second.
"""
from __future__ import annotations

import sys
from pathlib import Path

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def gguf_to_safetensors(gguf: Path, out: Path, dtype: str) -> None:
    """Write a loadable model directory for `gguf` into the existing, empty directory `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {dtype!r}")
    print(f"converting {gguf.name}: dequantising to {dtype} (a minute or so for a 1.5B model)",
          file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights written below are plain dense tensors
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        del state["lm_head.weight"]  # one storage under two names; transformers re-ties it on load
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
