"""The transformers backend: every spec no other backend's prefix claims (a model directory, a .gguf file read
dequantised, a peft adapter directory, a registered name, a Hub id), its loading and its plan.

A peft adapter whose base is also used plainly for another role (the usual expert = LoRA of the anti-expert) is
loaded once: that role runs the same weights with the adapter switched off. Adapters therefore load first.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..backends.transformers import TransformersSource
from ..errors import ProxyTuneError
from . import registry
from .backend import Backend, LoadOptions, RolePlan
from .footprint import gguf_bytes, kv_bytes_per_token, weight_bytes
from .placement import Placement, torch_device, torch_dtype, where
from .specs import adapter_base, local_path

log = logging.getLogger("proxytune.models")  # the CLI shows its lines: which model is loading, where

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(path, what: str = "model") -> None:
    """Weights are read from safetensors only: a pickle (pytorch_model.bin, adapter_model.bin) can run
    code when loaded. A directory holding only pickles is refused with the one command that converts it."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    found = f"only pickle files ({', '.join(pickles[:3])})" if pickles else "no .safetensors weights"
    raise ProxyTuneError(f"the {what} directory {path} holds {found}; proxytune loads safetensors only, since "
                         f"a pickle can run code when it is loaded. Convert it once, reading tensors only: "
                         f"proxytune models to-safetensors {path} {path}-safetensors")


def load_plain(spec: str, device: torch.device, dtype: torch.dtype, device_map=None, quantize: str | None = None,
               trust_remote_code: bool = False):
    """(model, tokenizer) from a model directory, a GGUF file or a Hub id in the local cache. `device_map`
    (accelerate) places the layers instead of `device`; `quantize` loads 4/8-bit weights with bitsandbytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_path(spec)
    options = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if quantize is not None:  # bitsandbytes places its weights itself: the whole model on `device` unless mapped
        options["quantization_config"] = _bitsandbytes(quantize, dtype)
        device_map = device_map if device_map is not None else {"": str(device)}
    if device_map is not None:
        options["device_map"] = device_map
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise ProxyTuneError(f"{path} is a file but not a .gguf model")
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **options)
        else:
            if not (path / "config.json").exists():
                raise ProxyTuneError(f"{path} has no config.json: not a transformers model directory")
            require_safetensors(path)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **options)
    except ProxyTuneError:
        raise
    except Exception as error:  # corrupt or unsupported files: name the file, keep the cause
        raise ProxyTuneError(f"could not load model {spec!r} from {path}: {error}") from error
    if device_map is None:
        model = model.to(device)
    return model.eval(), tokenizer


def _bitsandbytes(quantize: str, dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it installed; the error below says how)
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ProxyTuneError(f"quantize={quantize} needs bitsandbytes: pip install 'proxytune[quant]'") from None
    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def is_adapter(spec: str) -> bool:
    return adapter_base(local_path(spec)) is not None


class TransformersRoles:
    """Loads each distinct (spec, placement) once; roles whose spec and placement agree share one model."""

    def __init__(self, trust_remote_code: bool = False):
        self.trust_remote_code = trust_remote_code
        self.plain: dict[tuple, tuple] = {}  # (spec, placement key) -> (model, tokenizer)
        self.adapted: dict[tuple, object] = {}  # (base spec, placement key) -> peft model built on those weights

    def source(self, spec: str, role: str, placement: Placement) -> tuple[TransformersSource, object]:
        """(source, tokenizer) for one role. Plain specs that carry an adapter elsewhere (same placement)
        run adapter-off."""
        key = (spec, placement.key)
        base_spec = adapter_base(local_path(spec))
        if base_spec is not None:
            model, tokenizer = self._adapter(spec, base_spec, placement)
            return TransformersSource(model, name=role, tokenizer=tokenizer), tokenizer
        if key in self.adapted:
            tokenizer = self.plain[key][1]
            source = TransformersSource(self.adapted[key], name=role, adapter_disabled=True, tokenizer=tokenizer)
            return source, tokenizer
        model, tokenizer = self._plain(spec, placement)
        return TransformersSource(model, name=role, tokenizer=tokenizer), tokenizer

    def _load(self, spec: str, placement: Placement):
        device, dtype = torch_device(placement), torch_dtype(placement, local_path(spec))
        log.info("loading %s (%s on %s%s)", spec, str(dtype).removeprefix("torch."), where(placement),
                 f", {placement.quantize}" if placement.quantize else "")
        return load_plain(spec, device, dtype, placement.device_map, placement.quantize, self.trust_remote_code)

    def _plain(self, spec: str, placement: Placement):
        key = (spec, placement.key)
        if key not in self.plain:
            self.plain[key] = self._load(spec, placement)
        return self.plain[key]

    def _adapter(self, spec: str, base_spec: str, placement: Placement):
        from peft import PeftModel

        model, tokenizer = self._plain(base_spec, placement)
        if (base_spec, placement.key) in self.adapted:  # the shared base already carries another adapter: a copy
            model, tokenizer = self._load(base_spec, placement)
        require_safetensors(local_path(spec), "adapter")
        try:
            peft_model = PeftModel.from_pretrained(model, str(local_path(spec)))  # its .safetensors: checked above
        except Exception as error:
            raise ProxyTuneError(f"could not load adapter {spec!r} onto {base_spec!r}: {error}") from error
        self.adapted.setdefault((base_spec, placement.key), peft_model)
        return peft_model.eval(), tokenizer


def _unprepared(spec: str) -> bool:
    """A registered model whose weights are not converted yet: planning must not convert it."""
    return spec in registry.MODELS and not (registry.model_dir(spec) / "config.json").exists()


def plan(role: str, raw_spec: str, spec: str, placement: Placement, counted: set) -> RolePlan:
    if Path(spec).suffix == ".gguf":  # read dequantised: its size on disk is all the plan knows
        return RolePlan(role, raw_spec, "transformers", "cpu", "gguf", gguf_bytes(spec), None)
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


def _loader(options: LoadOptions) -> TransformersRoles:
    return TransformersRoles(options.trust_remote_code)


BACKEND = Backend("transformers", prefix="", loader=_loader, plan=plan, every_role=True, loads_first=is_adapter)
