"""Tokenizers for roles whose weights are not loaded by transformers: a remote model's, a GGUF file's."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ..errors import ProxyTuneError
from . import registry
from .specs import local_path


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path = local_path(spec)
    try:
        if path.is_file():
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:
        raise ProxyTuneError(f"could not load tokenizer {spec!r} from {path}: {error}") from error


def load_gguf_tokenizer(path: Path):
    """transformers' tokenizer for a GGUF file. Building it from GGUF metadata takes seconds (15 s for a
    49k vocabulary on a busy 2-core machine), so it is saved once under the cache and reloaded from there."""
    from transformers import AutoTokenizer

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    saved = registry.cache_dir() / "gguf-tokenizers" / f"{path.stem}-{key}"
    if saved.is_dir():
        return AutoTokenizer.from_pretrained(saved)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:
        raise ProxyTuneError(f"could not read a tokenizer from {path}: {error}") from error
    partial = saved.with_name(saved.name + f".partial-{os.getpid()}")
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(saved)  # renamed into place only once complete
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # another process saved it first
    return tokenizer
