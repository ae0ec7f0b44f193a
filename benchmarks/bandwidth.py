"""The memory ceiling a benchmark reads its speeds against: GB/s of reading a large tensor.

Decoding reads weights and writes almost nothing, so its floor is weight bytes / *read* bandwidth,
measured as a read (a sum over 1 GiB, far beyond the caches). A copy reads and writes: on this machine
it moves a similar number of bytes per second, and dividing it by two (as an earlier version did)
made every "share of the floor" look twice as good as it was.
"""
from __future__ import annotations

import time

import torch


def read_bandwidth(threads: int | None = None, megabytes: int = 1024, repeats: int = 5) -> float:
    """GB/s of reading a large float32 tensor once (a sum) on `threads` threads (None: as set now),
    best of `repeats`."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    data = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(data.sum())
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(previous)
    return data.numel() * 4 / best / 1e9
