"""A peft LoRA adapter -> a llama.cpp LoRA adapter GGUF, so a tuned expert runs on llama.cpp too.

llama.cpp applies a LoRA adapter at run time on top of the base GGUF's (quantised) weights, per
context: the expert is then the anti-expert's weights with the adapter switched on, in the same
process, without a second copy. Tensor `W` of the base gets `W.lora_a` = peft's lora_A ([r, in]) and
`W.lora_b` = lora_B ([out, r]); llama.cpp scales by adapter.lora.alpha / r as peft does.

Names follow the base GGUF (read from its metadata, no HF config needed). One architecture detail
matters: llama.cpp stores llama-architecture q/k projections with their rows permuted for its rope
layout (convert_hf_to_gguf.py does this to the weights), so lora_B of q_proj/k_proj is permuted the
same way. Qwen2 needs no permutation.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from ..errors import ProxyTuneError

PERMUTED_QK = {"llama"}  # architectures whose q/k rows convert_hf_to_gguf.py permutes
SUPPORTED = PERMUTED_QK | {"qwen2"}
BASE_KEY = "proxytune.base_model"  # which base the adapter was made for (a spec: path or registered name)


def read_base(base_gguf: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(str(base_gguf)).fields

    def scalar(key: str):
        field = fields.get(key)
        if field is None:
            return None
        value = field.parts[field.data[0]]
        return bytes(value).decode() if value.dtype == np.uint8 else value.item()

    arch = scalar("general.architecture")
    return {"arch": arch, "blocks": scalar(f"{arch}.block_count"), "heads": scalar(f"{arch}.attention.head_count"),
            "kv_heads": scalar(f"{arch}.attention.head_count_kv") or scalar(f"{arch}.attention.head_count"),
            "type": scalar("general.type")}


def permute_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `permute` on the output rows (HF rotate-half -> llama.cpp's rope order)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def adapter_alpha(config: dict) -> float:
    """The alpha llama.cpp needs so that alpha / r equals peft's scaling."""
    for unsupported in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(unsupported):
            raise ProxyTuneError(f"adapters with {unsupported} cannot be converted for llama.cpp")
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha * math.sqrt(rank) if config.get("use_rslora") else float(alpha)  # rslora: alpha / sqrt(r)


def lora_tensors(adapter_dir: Path, base: dict) -> dict[str, np.ndarray]:
    import gguf
    from safetensors.torch import load_file  # numpy cannot read bf16 adapters

    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.exists():
        raise ProxyTuneError(f"{adapter_dir} has no adapter_model.safetensors")
    arch = {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}[base["arch"]]
    names = gguf.TensorNameMap(arch, base["blocks"])
    tensors = {}
    for key, value in load_file(str(weights_file)).items():
        module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ProxyTuneError(f"{weights_file}: tensor {key} is not a LoRA A/B matrix; llama.cpp adapters "
                                 f"hold only those")
        target = names.get_name(module)
        if target is None:
            raise ProxyTuneError(f"{weights_file}: no {base['arch']} GGUF tensor matches {module}")
        value = value.float().numpy()
        if kind == "B.weight" and base["arch"] in PERMUTED_QK:
            if module.endswith("q_proj"):
                value = permute_rows(value, base["heads"])
            elif module.endswith("k_proj"):
                value = permute_rows(value, base["kv_heads"])
        tensors[f"{target}.weight.lora_{kind[0].lower()}"] = value
    return tensors


def convert_lora(adapter_dir: str | Path, base_gguf: str | Path, out: str | Path, base_spec: str | None = None) -> Path:
    """Write the llama.cpp LoRA GGUF of a peft adapter made for the model in `base_gguf`."""
    import gguf

    adapter_dir, base_gguf, out = Path(adapter_dir), Path(base_gguf), Path(out)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise ProxyTuneError(f"{adapter_dir} is not a peft adapter directory (no adapter_config.json)")
    config = json.loads(config_file.read_text())
    base = read_base(base_gguf)
    if base["type"] == "adapter" or base["arch"] is None:
        raise ProxyTuneError(f"{base_gguf} is not a base model GGUF")
    if base["arch"] not in SUPPORTED:
        raise ProxyTuneError(f"converting LoRA adapters for the {base['arch']} architecture is not supported here "
                             f"(only {sorted(SUPPORTED)}); llama.cpp's convert_lora_to_gguf.py covers more")
    tensors = lora_tensors(adapter_dir, base)
    writer = gguf.GGUFWriter(str(out), base["arch"])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter_alpha(config))
    writer.add_string(BASE_KEY, base_spec or str(base_gguf))
    for name, value in sorted(tensors.items()):
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def adapter_fingerprint(adapter_dir: Path, base_gguf: Path) -> str:
    """Names a cached conversion: changes when the adapter's files or the base file change."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((adapter_dir / name).read_bytes())
    stat = base_gguf.stat()
    digest.update(f"{base_gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def adapter_base_spec(adapter_gguf: Path) -> str | None:
    """The base a LoRA GGUF names (written by convert_lora), or None for a GGUF that is no adapter."""
    from gguf import GGUFReader

    fields = GGUFReader(str(adapter_gguf)).fields
    kind = fields.get("general.type")
    if kind is None or bytes(kind.parts[kind.data[0]]).decode() != "adapter":
        return None
    base = fields.get(BASE_KEY)
    if base is None:
        raise ProxyTuneError(f"{adapter_gguf} is a LoRA adapter GGUF that does not name its base model; write it "
                             f"with `proxytune convert-lora` or give the base explicitly: gguf:BASE.gguf+{adapter_gguf}")
    return bytes(base.parts[base.data[0]]).decode()
