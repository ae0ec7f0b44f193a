"""The llama.cpp backend: `gguf:` specs -> llama.cpp logit sources, and their plan.

A role spec runs in transformers unless it says `gguf:` (or the whole trio is given
backend="llama.cpp", which puts `gguf:` before every spec):

    gguf:PATH.gguf                  the GGUF model file, in llama.cpp
    gguf:NAME                       a registered model's GGUF file (never converted to safetensors)
    gguf:ADAPTER                    a peft LoRA adapter (directory or registered name) on its base's GGUF:
                                    converted once to a llama.cpp LoRA GGUF, cached under $PROXYTUNE_CACHE
    gguf:LORA.gguf                  a LoRA GGUF written by `proxytune convert-lora` (it names its base)
    gguf:BASE.gguf+LORA.gguf        any llama.cpp LoRA GGUF on an explicit base

A plain `PATH.gguf` (no prefix) still loads in transformers, dequantised. Roles on the same GGUF
share one copy of its weights: the anti-expert and a LoRA expert on it differ only in their context.

This module is the llama.cpp backend's registration (BACKEND); the llama_cpp bindings are imported only when a
`gguf:` role loads (backends/llama_cpp/model.py reaches for them on import).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from . import registry
from ..errors import ProxyTuneError
from .backend import Backend, LoadOptions, RolePlan
from .footprint import gguf_bytes
from .placement import Placement
from .tokenizers import load_gguf_tokenizer
from .lora_gguf import adapter_base_spec, adapter_fingerprint, convert_lora
from .specs import adapter_base

if TYPE_CHECKING:
    from ..backends.llama_cpp.model import GGUFModel
    from ..backends.llama_cpp.source import LlamaCppSource

PREFIX = "gguf:"
ADAPTER_SIZE_LIMIT = 2 << 30  # bigger GGUF files are models: their metadata is not read to look for an adapter

log = logging.getLogger("proxytune.models")


def _registered(name: str, table: str):
    return getattr(registry, table, {}).get(name)


class LlamaCppRoles:
    """Loads each GGUF file once (weights, HF tokenizer, vocabulary check) and gives one source per spec."""

    def __init__(self, threads: int | None = None, n_ctx: int | None = None, lora_cache: Path | None = None):
        self.threads, self.n_ctx = threads, n_ctx
        self.lora_cache = lora_cache  # where converted peft adapters go (default: $PROXYTUNE_CACHE/gguf-lora)
        self.models: dict[Path, tuple[GGUFModel, object]] = {}
        self.sources: dict[str, tuple[LlamaCppSource, object]] = {}

    def source(self, spec: str, role: str, placement: Placement | None = None) -> tuple[LlamaCppSource, object]:
        """(source, tokenizer) for a `gguf:` spec. llama.cpp runs on the CPU: a placement does not apply."""
        from ..backends.llama_cpp.source import LlamaCppSource

        if spec not in self.sources:
            model_path, adapter = self.resolve(spec[len(PREFIX):])
            model, tokenizer = self.model(model_path)
            source = LlamaCppSource(model, name=role, adapter=adapter, threads=self.threads, n_ctx=self.n_ctx)
            self.sources[spec] = (source, tokenizer)
        return self.sources[spec]

    def model(self, path: Path) -> tuple[GGUFModel, object]:
        from ..backends.llama_cpp.model import GGUFModel
        from ..backends.llama_cpp.vocab import check_tokenizer_matches

        key = path.resolve()
        if key not in self.models:
            model = GGUFModel(path)
            tokenizer = load_gguf_tokenizer(model.path)
            check_tokenizer_matches(model, tokenizer)
            self.models[key] = (model, tokenizer)
        return self.models[key]

    def resolve(self, target: str) -> tuple[Path, Path | None]:
        """(model GGUF, LoRA GGUF or None) for what follows `gguf:`."""
        if "+" in target and not Path(target).expanduser().exists():
            base, adapter = target.split("+", 1)
            base_path, base_adapter = self.resolve(base)
            if base_adapter is not None:
                raise ProxyTuneError(f"{base} is an adapter, not a base model")
            return base_path, Path(adapter).expanduser()
        path = Path(target).expanduser()
        if path.is_file():
            base = self._adapter_base(path) if path.stat().st_size < ADAPTER_SIZE_LIMIT else None
            return (path, None) if base is None else (base, path)
        if path.is_dir():
            if (path / "adapter_config.json").exists():
                return self.peft_adapter(path)
            raise ProxyTuneError(f"{path} is a directory; the llama.cpp backend runs .gguf files "
                                 f"(or peft adapters whose base is one)")
        if _registered(target, "MODELS") is not None:
            return registry.gguf_path(target), None
        if _registered(target, "ADAPTERS") is not None:
            return self.peft_adapter(registry.resolve_model(target))  # says so when it is not there yet
        if path.suffix == ".gguf" or "/" in target:
            raise ProxyTuneError(f"GGUF file {path} does not exist")
        raise ProxyTuneError(f"gguf:{target} is neither a .gguf file, a peft adapter directory nor a registered "
                             f"model or adapter name; `proxytune models list` shows the names")

    def _adapter_base(self, path: Path) -> Path | None:
        """The base model GGUF of a LoRA GGUF, or None when `path` is a model."""
        from ..backends.llama_cpp.model import check_gguf_file

        check_gguf_file(path)
        try:
            base = adapter_base_spec(path)
        except ProxyTuneError:
            raise
        except Exception as error:
            raise ProxyTuneError(f"{path} is not a readable GGUF file: {error}") from error
        if base is None:
            return None
        base_path, base_adapter = self.resolve(base)
        if base_adapter is not None:
            raise ProxyTuneError(f"the adapter {path} names another adapter ({base}) as its base")
        return base_path

    def peft_adapter(self, adapter_dir: Path) -> tuple[Path, Path]:
        """A peft adapter on its base's GGUF: converted to a LoRA GGUF once, then cached."""
        base_spec = adapter_base(adapter_dir)
        if base_spec is None:
            raise ProxyTuneError(f"{adapter_dir} holds no adapter_config.json: not a peft adapter")
        base_path, base_adapter = self.resolve(base_spec)
        if base_adapter is not None:
            raise ProxyTuneError(f"the adapter {adapter_dir} has another adapter ({base_spec}) as its base")
        cache = self.lora_cache or registry.cache_dir() / "gguf-lora"
        out = cache / f"{adapter_dir.name}-{adapter_fingerprint(adapter_dir, base_path)}.gguf"
        if not out.exists():
            log.info("converting the adapter %s to a llama.cpp LoRA GGUF in %s (first use only)", adapter_dir.name,
                     out.parent)
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_suffix(".partial")
            convert_lora(adapter_dir, base_path, partial, base_spec)
            partial.replace(out)  # renamed into place only once complete
        return base_path, out


def plan(role: str, raw_spec: str, spec: str, placement: Placement, counted: set) -> RolePlan:
    return RolePlan(role, raw_spec, "llama.cpp", "cpu", "gguf", gguf_bytes(spec[len(PREFIX):]), None,
                    "KV: --ctx cells per model")


def _loader(options: LoadOptions) -> LlamaCppRoles:
    return LlamaCppRoles(threads=options.threads, n_ctx=options.n_ctx)


BACKEND = Backend("llama.cpp", prefix=PREFIX, loader=_loader, plan=plan, every_role=True,
                  aliases=("llama-cpp", "llamacpp"), extra="llama-cpp")
