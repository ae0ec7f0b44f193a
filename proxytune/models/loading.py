"""Turning model specs (local dirs, GGUF files, peft adapter dirs, registry names) into logit sources.

A peft adapter whose base is also used plainly for another role (the usual expert = LoRA of the
anti-expert) is loaded once: that role runs the same weights with the adapter switched off.
"""
from __future__ import annotations

import json
from typing import Sequence

import torch

from ..errors import ProxyTuneError
from .specs import adapter_base, is_llama_cpp, local_path, with_backend
from ..backends.remote.spec import is_remote_spec
from ..backends.transformers import TransformersSource

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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


def load_plain(spec: str, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a model directory or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_path(spec)
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise ProxyTuneError(f"{path} is a file but not a .gguf model")
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        else:
            if not (path / "config.json").exists():
                raise ProxyTuneError(f"{path} has no config.json: not a transformers model directory")
            require_safetensors(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except ProxyTuneError:
        raise
    except Exception as error:  # corrupt or unsupported files: name the file, keep the cause
        raise ProxyTuneError(f"could not load model {spec!r} from {path}: {error}") from error
    return model.to(device).eval(), tokenizer


class Loader:
    """Loads each distinct spec once and hands out one logit source per role."""

    def __init__(self, device=None, dtype=None, threads: int | None = None, n_ctx: int | None = None):
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.llama_cpp_options = {"threads": threads, "n_ctx": n_ctx}
        self.llama_cpp = None  # LlamaCppRoles, made when a gguf: spec first appears
        self.plain: dict[str, tuple] = {}  # spec -> (model, tokenizer)
        self.adapted: dict[str, object] = {}  # base spec -> peft model built on that base's weights
        self.sources: dict[tuple, TransformersSource] = {}

    def _plain(self, spec: str):
        if spec not in self.plain:
            self.plain[spec] = load_plain(spec, self.device, self.dtype)
        return self.plain[spec]

    def _adapter(self, spec: str, base_spec: str):
        from peft import PeftModel

        model, tokenizer = self._plain(base_spec)
        if base_spec in self.adapted:  # the shared base already carries another adapter: use a copy
            model, tokenizer = load_plain(base_spec, self.device, self.dtype)
        require_safetensors(local_path(spec), "adapter")
        try:
            peft_model = PeftModel.from_pretrained(model, str(local_path(spec)))  # its .safetensors: checked above
        except Exception as error:
            raise ProxyTuneError(f"could not load adapter {spec!r} onto {base_spec!r}: {error}") from error
        self.adapted.setdefault(base_spec, peft_model)
        return peft_model.eval(), tokenizer

    def source(self, spec: str, role: str) -> tuple[TransformersSource, object]:
        """(source, tokenizer) for one role. Plain specs that carry an adapter elsewhere run adapter-off."""
        if spec in self.sources:
            return self.sources[spec]
        if is_remote_spec(spec):  # openai:URL?tokenizer=... : a model behind an OpenAI-compatible server
            from ..backends.remote.source import RemoteSource
            from ..backends.remote.spec import parse_spec

            from .tokenizers import load_tokenizer

            options = parse_spec(spec)
            source = RemoteSource(options, load_tokenizer(options.tokenizer), name=role)
            self.sources[spec] = (source, source.tokenizer)
            return self.sources[spec]
        if is_llama_cpp(spec):  # gguf:... : a GGUF model (or a LoRA on one) run in-process by llama.cpp
            from .gguf_roles import LlamaCppRoles

            self.llama_cpp = self.llama_cpp or LlamaCppRoles(**self.llama_cpp_options)
            self.sources[spec] = self.llama_cpp.source(spec, role)
            return self.sources[spec]
        base_spec = adapter_base(local_path(spec))
        if base_spec is not None:
            model, tokenizer = self._adapter(spec, base_spec)
            source = TransformersSource(model, name=role)
        elif spec in self.adapted:
            model, tokenizer = self.adapted[spec], self.plain[spec][1]
            source = TransformersSource(model, name=role, adapter_disabled=True)
        else:
            model, tokenizer = self._plain(spec)
            source = TransformersSource(model, name=role)
        self.sources[spec] = (source, tokenizer)
        return source, tokenizer


def as_source(model, name: str = "model") -> TransformersSource:
    """A loaded transformers (or peft) model as a logit source."""
    return TransformersSource(model, name=name)


def load_roles(specs: dict[str, str], pairs: Sequence[tuple[str, str]] = (), device=None, dtype=None,
               backend: str | None = None, threads: int | None = None, n_ctx: int | None = None) -> dict[str, tuple]:
    """role -> (source, tokenizer). Adapters load first so their base is shared, not duplicated; each
    (expert role, anti-expert role) in `pairs` that is a LoRA adapter on and off runs as one LoraPair.
    backend="llama.cpp" runs every role in llama.cpp (llama_cpp_roles); threads/n_ctx apply to those."""
    specs = {role: with_backend(spec, backend) for role, spec in specs.items()}
    loader = Loader(device, dtype, threads=threads, n_ctx=n_ctx)
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
