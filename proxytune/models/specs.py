"""Model specs: what a role's spec names (a path, a registered name, `gguf:...`, `openai:...`) and where it is."""
from __future__ import annotations

import json
from pathlib import Path

from ..backends.remote.spec import is_remote_spec
from ..errors import ProxyTuneError
from . import registry

PREFIX = "gguf:"
BACKENDS = ("transformers", "llama.cpp")


def local_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    registered = registry.resolve_model(spec)
    if registered is not None:
        return registered
    raise ProxyTuneError(f"model {spec!r} is neither an existing path (a model directory, a .gguf file, a peft "
                         f"adapter directory) nor a registered model name; `proxytune models list` shows the names")


def adapter_base(path: Path) -> str | None:
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        return None
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ProxyTuneError(f"{config_file} names no base_model_name_or_path")
    return base


def with_backend(spec: str, backend: str | None) -> str:
    """The spec a role runs under `backend` (None: as the spec itself says)."""
    if backend is None or backend == "transformers":
        return spec
    if backend in ("llama.cpp", "llama-cpp", "llamacpp"):
        # a model behind a server (openai:...) stays remote: --backend chooses how *local* roles run
        return spec if is_llama_cpp(spec) or is_remote_spec(spec) else PREFIX + spec
    raise ProxyTuneError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


def is_llama_cpp(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)
