"""The memory ceiling a benchmark reads its speeds against: GB/s of a large tensor copy."""
from __future__ import annotations

import time

import torch


def copy_bandwidth(threads: int | None = None, megabytes: int = 512, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written) on `threads` threads (None: as set now),
    best of `repeats`."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(previous)
    return 2 * source.numel() * 4 / best / 1e9
