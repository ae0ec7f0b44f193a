"""Local model specs: what a spec without a backend's prefix names (a path, a registered name, a Hub id) and where
it is. Which backend runs a spec, `gguf:...` and `openai:...` included, is the registry's (backend_registry.py)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..errors import ProxyTuneError
from . import registry

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def local_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    registered = registry.resolve_model(spec)
    if registered is not None:
        return registered
    if HUB_ID.fullmatch(spec):
        return hub_path(spec)
    raise ProxyTuneError(f"model {spec!r} is neither an existing path (a model directory, a .gguf file, a peft "
                         f"adapter directory), a registered model name (`proxytune models list`) nor a Hugging Face "
                         f"Hub id (org/name)")


def hub_path(repo_id: str) -> Path:
    """A Hub id as transformers users write it (org/name): its snapshot in the local Hugging Face cache, or
    downloaded when the hub may be reached (never with HF_HUB_OFFLINE=1, as in tests)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except LocalEntryNotFoundError:
        how = ("HF_HUB_OFFLINE=1 forbids downloading it: run `hf download " + repo_id + "` where the hub is reachable, "
               "or unset HF_HUB_OFFLINE") if offline else "the hub could not be reached"
        raise ProxyTuneError(f"model {repo_id!r} is not a local path or registered name, and the Hub id is not in the "
                             f"Hugging Face cache ({constants.HF_HUB_CACHE}); {how}") from None
    except Exception as error:  # a repository that does not exist, a gated one, a network error
        raise ProxyTuneError(f"model {repo_id!r} (a Hub id): {type(error).__name__}: {error}") from None


def adapter_base(path: Path) -> str | None:
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        return None
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ProxyTuneError(f"{config_file} names no base_model_name_or_path")
    return base


def adapter_digest(spec: str) -> str | None:
    """The first 16 hex digits of the SHA-256 of a LoRA adapter's weights, for a spec that is an adapter directory or
    a registered adapter name (whose weights change when a new one ships under the same name); None otherwise."""
    path = Path(spec).expanduser()
    directory = path if path.is_dir() else registry.ADAPTERS.get(spec)
    weights = directory / "adapter_model.safetensors" if directory is not None else None
    if weights is None or not weights.is_file():
        return None
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
