"""Turning model specs (local dirs, GGUF files, peft adapter dirs, registry names) into logit sources.

A peft adapter whose base is also used plainly for another role (the usual expert = LoRA of the
anti-expert) is loaded once: that role runs the same weights with the adapter switched off.
"""
from __future__ import annotations

import json
import logging
from typing import Sequence

import torch

from ..errors import ProxyTuneError
from .placement import DTYPES, Placement, check, placement_of, torch_device, torch_dtype, where
from .specs import adapter_base, is_llama_cpp, local_path, with_backend
from ..backends.remote.spec import is_remote_spec
from ..backends.transformers import TransformersSource

log = logging.getLogger("proxytune.models")  # the CLI shows its lines: which model is loading, where


def pick_device(device) -> torch.device:
    """A device this machine has (default: cuda when there is one), or a one-line error."""
    return torch_device(Placement(device=None if device is None else str(device)))


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    """An explicit dtype (training's choice), checked; see placement.torch_dtype for loading's default."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ProxyTuneError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


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


class Loader:
    """Loads each distinct (spec, placement) once and hands out one logit source per role.

    `placements` (role -> Placement) override `default` for their role; roles whose spec and placement
    agree share one loaded model."""

    def __init__(self, device=None, dtype=None, threads: int | None = None, n_ctx: int | None = None,
                 placements: dict[str, Placement] | None = None, trust_remote_code: bool = False):
        self.default = placement_of({"device": None if device is None else str(device),
                                     "dtype": dtype if not isinstance(dtype, torch.dtype) else str(dtype)[6:]},
                                    "device/dtype (every role)")
        self.placements = dict(placements or {})
        self.trust_remote_code = trust_remote_code
        self.llama_cpp_options = {"threads": threads, "n_ctx": n_ctx}
        self.llama_cpp = None  # LlamaCppRoles, made when a gguf: spec first appears
        self.plain: dict[tuple, tuple] = {}  # (spec, placement key) -> (model, tokenizer)
        self.adapted: dict[tuple, object] = {}  # (base spec, placement key) -> peft model built on those weights
        self.sources: dict[tuple, tuple] = {}

    def placement(self, role: str) -> Placement:
        return check(self.placements.get(role, Placement()).over(self.default), f"the {role} placement")

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

    def source(self, spec: str, role: str) -> tuple[TransformersSource, object]:
        """(source, tokenizer) for one role. Plain specs that carry an adapter elsewhere (same placement)
        run adapter-off."""
        placement = self.placement(role)
        key = (spec, placement.key)
        if key in self.sources:
            return self.sources[key]
        if is_remote_spec(spec):  # openai:URL?tokenizer=... : a model behind an OpenAI-compatible server
            from ..backends.remote.source import RemoteSource
            from ..backends.remote.spec import parse_spec

            from .tokenizers import load_tokenizer

            options = parse_spec(spec)
            source = RemoteSource(options, load_tokenizer(options.tokenizer), name=role)
            self.sources[key] = (source, source.tokenizer)
            return self.sources[key]
        if is_llama_cpp(spec):  # gguf:... : a GGUF model (or a LoRA on one) run in-process by llama.cpp
            from .gguf_roles import LlamaCppRoles

            self.llama_cpp = self.llama_cpp or LlamaCppRoles(**self.llama_cpp_options)
            self.sources[key] = self.llama_cpp.source(spec, role)
            return self.sources[key]
        base_spec = adapter_base(local_path(spec))
        if base_spec is not None:
            model, tokenizer = self._adapter(spec, base_spec, placement)
            source = TransformersSource(model, name=role, tokenizer=tokenizer)
        elif key in self.adapted:
            model, tokenizer = self.adapted[key], self.plain[key][1]
            source = TransformersSource(model, name=role, adapter_disabled=True, tokenizer=tokenizer)
        else:
            model, tokenizer = self._plain(spec, placement)
            source = TransformersSource(model, name=role, tokenizer=tokenizer)
        self.sources[key] = (source, tokenizer)
        return source, tokenizer


def as_source(model, name: str = "model", tokenizer=None) -> TransformersSource:
    """A loaded transformers (or peft) model as a logit source (its end-of-text ids with the tokenizer's)."""
    return TransformersSource(model, name=name, tokenizer=tokenizer)


def load_roles(specs: dict[str, str], pairs: Sequence[tuple[str, str]] = (), device=None, dtype=None,
               backend: str | None = None, threads: int | None = None, n_ctx: int | None = None,
               placements: dict[str, Placement] | None = None, trust_remote_code: bool = False) -> dict[str, tuple]:
    """role -> (source, tokenizer). Adapters load first so their base is shared, not duplicated; each
    (expert role, anti-expert role) in `pairs` that is a LoRA adapter on and off runs as one LoraPair.
    backend="llama.cpp" runs every role in llama.cpp (llama_cpp_roles); threads/n_ctx apply to those.
    device/dtype: every role's default; placements: per role (models/placement.py)."""
    specs = {role: with_backend(spec, backend) for role, spec in specs.items()}
    loader = Loader(device, dtype, threads=threads, n_ctx=n_ctx, placements=placements,
                    trust_remote_code=trust_remote_code)
    for role in specs:  # every placement checked before any weights load
        loader.placement(role)
    order = sorted(specs, key=lambda role: is_remote_spec(specs[role]) or is_llama_cpp(specs[role])
                   or adapter_base(local_path(specs[role])) is None)
    loaded = {role: loader.source(specs[role], role) for role in order}
    # expert = LoRA of the anti-expert: run both roles in one batched forward (backends/lora_pair.py).
    from ..backends.lora_pair import pair_lora_roles
    sources = pair_lora_roles({role: source for role, (source, _) in loaded.items()}, pairs)
    return {role: (sources[role], loaded[role][1]) for role in specs}


def to_safetensors(source, target) -> list[str]:
    """The explicit, opt-in conversion of a pickled model or adapter directory: tensors are read with
    torch.load(weights_only=True) (no code runs), written as safetensors with the other files copied."""
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    source, target = Path(source).expanduser(), Path(target).expanduser()
    if not source.is_dir():
        raise ProxyTuneError(f"{source} is not a directory")
    if target.exists() and any(target.iterdir()):
        raise ProxyTuneError(f"{target} exists and is not empty: choose a new directory")
    target.mkdir(parents=True, exist_ok=True)
    written, weight_map = [], {}
    for file in sorted(source.iterdir()):
        if file.suffix in PICKLE_SUFFIXES:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as error:
                raise ProxyTuneError(f"{file} is not a plain tensor file (refused: {type(error).__name__}: "
                                     f"{str(error)[:200]})") from None
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ProxyTuneError(f"{file} holds no mapping of names to tensors")
            out = target / f"{file.stem.replace('pytorch_model', 'model', 1)}.safetensors"  # shards keep their numbers
            save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"format": "pt"})
            written.append(out.name)
            weight_map.update(dict.fromkeys(state, out.name))
        elif file.is_file() and not file.name.endswith(".bin.index.json"):  # the pickles' index is rewritten
            shutil.copy2(file, target / file.name)
    if not written:
        raise ProxyTuneError(f"{source} holds no pickle weights to convert")
    if len(written) > 1:  # a sharded checkpoint: transformers finds the shards through this index
        index = target / "model.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        written.append(index.name)
    return written
