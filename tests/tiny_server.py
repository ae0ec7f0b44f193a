"""`proxytune serve` as a real subprocess over the tiny trio saved to disk, on a free loopback port."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tiny import tiny_model, tiny_tokenizer


def save_tiny_trio(root: Path, **size) -> dict[str, str]:
    """base, expert, anti_expert = tiny_model(0), (1), (2), each with the tiny tokenizer; `size` goes to
    tiny_model (hidden=..., layers=...) for slower models."""
    dirs = {}
    for seed, role in enumerate(("base", "expert", "anti_expert")):
        path = root / role
        if not (path / "config.json").exists():
            tiny_model(seed, **size).save_pretrained(path)
            tiny_tokenizer().save_pretrained(path)
        dirs[role] = str(path)
    return dirs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    def __init__(self, dirs: dict[str, str], *options: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "proxytune", "serve", "--base", dirs["base"], "--expert", dirs["expert"],
                   "--anti-expert", dirs["anti_expert"], "--port", str(self.port), *options]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxytune serve exited {self.process.returncode}:\n{self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError("proxytune serve did not come up")

    def stop(self) -> str:
        self.process.terminate()
        try:
            output, _ = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
        return output
