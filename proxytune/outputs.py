"""Outputs that runs append to and resume from (batch results, evaluation records): one writer at a time.

A second run on the same output would append every row again; `exclusive(path)` takes an advisory lock
(flock) on a lock file beside it for the life of the run, and refuses at once, naming the output, when another
run holds it. The lock goes with the process, however it ends (no stale lock file to clean up by hand).
"""
from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path
from typing import Iterator

from .errors import ProxyTuneError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, runs are not kept apart
    fcntl = None


class Held:
    """An output's lock, held while this object lives (closing it, or the process ending, releases it)."""

    def __init__(self, handle):
        self.handle = handle

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def __del__(self):
        self.close()


_HELD: "weakref.WeakValueDictionary[str, Held]" = weakref.WeakValueDictionary()  # one lock per output per process


def hold(path, what: str = "--output") -> Held | None:
    """Take `path`'s lock (PATH.lock beside a file, PATH/.lock in a directory) for as long as the returned Held
    lives; this process may take it again (the same Held). None where there are no advisory locks."""
    path = Path(path)
    lock_path = path / ".lock" if path.is_dir() else path.with_name(path.name + ".lock")
    if fcntl is None:
        return None
    key = str(lock_path.resolve())
    if key in _HELD:
        return _HELD[key]
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ProxyTuneError(f"{what} {path} is being written by another run (pid {holder}); wait for it to end "
                             f"or choose another {what}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    held = _HELD[key] = Held(handle)
    return held


@contextlib.contextmanager
def exclusive(path, what: str = "--output") -> Iterator[None]:
    """`hold(path)` while the block runs."""
    held = hold(path, what)
    try:
        yield
    finally:
        del held
