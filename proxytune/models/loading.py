"""Turning model specs (local dirs, GGUF files, peft adapter dirs, registry names, `gguf:`, `openai:`) into
logit sources: each spec goes to the backend the registry picks for it (backend_registry.py), one loading's
state per backend, so that roles on one model share it.
"""
from __future__ import annotations

import json
from typing import Sequence

import torch

from ..errors import ProxyTuneError
from .backend import LoadOptions, RoleLoader
from .backend_registry import backend_of, with_backend
from .placement import DTYPES, Placement, check, placement_of, torch_device
from .transformers_roles import PICKLE_SUFFIXES, load_plain  # noqa: F401  (load_plain: one model, as callers load it)
from ..backends.transformers import TransformersSource


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


class Loader:
    """Loads each distinct (spec, placement) once and hands out one logit source per role.

    `placements` (role -> Placement) override `default` for their role; each backend keeps what its roles share
    (a transformers model, a llama.cpp model) in its RoleLoader, made when its first spec appears."""

    def __init__(self, device=None, dtype=None, threads: int | None = None, n_ctx: int | None = None,
                 placements: dict[str, Placement] | None = None, trust_remote_code: bool = False):
        self.default = placement_of({"device": None if device is None else str(device),
                                     "dtype": dtype if not isinstance(dtype, torch.dtype) else str(dtype)[6:]},
                                    "device/dtype (every role)")
        self.placements = dict(placements or {})
        self.options = LoadOptions(threads=threads, n_ctx=n_ctx, trust_remote_code=trust_remote_code)
        self.loaders: dict[str, RoleLoader] = {}  # backend name -> its state in this loading
        self.sources: dict[tuple, tuple] = {}  # (spec, placement key) -> (source, tokenizer)

    def placement(self, role: str) -> Placement:
        return check(self.placements.get(role, Placement()).over(self.default), f"the {role} placement")

    def source(self, spec: str, role: str) -> tuple[object, object]:
        """(source, tokenizer) for one role, from the backend that claims its spec."""
        placement = self.placement(role)
        key = (spec, placement.key)
        if key not in self.sources:
            self.sources[key] = self._load(spec, role, placement)
        return self.sources[key]

    def _load(self, spec: str, role: str, placement: Placement) -> tuple[object, object]:
        backend = backend_of(spec)
        if backend.name not in self.loaders:
            self.loaders[backend.name] = backend.loader(self.options)
        try:
            return self.loaders[backend.name].source(spec, role, placement)
        except ModuleNotFoundError as error:  # a backend that needs an extra says which, in one line
            if backend.extra is None:
                raise
            raise ProxyTuneError(f"the {backend.name} backend needs {error.name}: "
                                 f"pip install 'proxytune[{backend.extra}]'") from error


def as_source(model, name: str = "model", tokenizer=None) -> TransformersSource:
    """A loaded transformers (or peft) model as a logit source (its end-of-text ids with the tokenizer's)."""
    return TransformersSource(model, name=name, tokenizer=tokenizer)


def load_roles(specs: dict[str, str], pairs: Sequence[tuple[str, str]] = (), device=None, dtype=None,
               backend: str | None = None, threads: int | None = None, n_ctx: int | None = None,
               placements: dict[str, Placement] | None = None, trust_remote_code: bool = False) -> dict[str, tuple]:
    """role -> (source, tokenizer). Adapters load first so their base is shared, not duplicated; each
    (expert role, anti-expert role) in `pairs` that is a LoRA adapter on and off runs as one LoraPair.
    backend=NAME runs every role whose spec names no backend in that one (backend="llama.cpp": in llama.cpp,
    gguf_roles.py); threads/n_ctx apply to llama.cpp roles.
    device/dtype: every role's default; placements: per role (models/placement.py)."""
    specs = {role: with_backend(spec, backend) for role, spec in specs.items()}
    loader = Loader(device, dtype, threads=threads, n_ctx=n_ctx, placements=placements,
                    trust_remote_code=trust_remote_code)
    for role in specs:  # every placement checked before any weights load
        loader.placement(role)
    order = sorted(specs, key=lambda role: not backend_of(specs[role]).loads_first(specs[role]))
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
