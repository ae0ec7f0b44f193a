"""Does dynamic batching pay? Throughput and latency of `proxytune serve` at 1, 8 and 32 concurrent clients.

    python benchmarks/serve_load.py                      # SmolLM2-135M-Instruct as all three roles
    python benchmarks/serve_load.py --base B --expert E --anti-expert A --rounds 2

It starts the server as a subprocess on a free loopback port, warms it up, then runs rounds; in each
round every concurrency level runs once (the order rotates between rounds so that drift of a shared
machine hits every level alike). A level is `clients` closed-loop clients, each sending
`--requests` streaming greedy /v1/completions one after another. tokens/s = completion tokens of
all requests / wall time of the level; latency = one request, first byte sent to last chunk read;
TTFT = to the first token. The ratio 32-client / 1-client throughput is computed inside each round
and its median (and range) reported. No asserts: it prints measurements. Last line, for machines:
RESULT tps_1=X tps_8=Y tps_32=Z ratio_32_over_1=R
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx


PROMPTS = [
    "Write a short story about a robot who learns to paint.\n\n",
    "The history of the printing press begins",
    "Explain, step by step, how to make a cup of tea.\n1.",
    "Question: Tom has 3 boxes with 12 pencils each. He gives away 7 pencils. How many are left?\nAnswer:",
    "Here is a list of ten fruits and their colours:\n",
    "def fibonacci(n):\n",
    "Dear hiring manager,\n\n",
    "The three laws of thermodynamics are",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args, port: int, *options: str) -> subprocess.Popen:
    roles = ["--model", args.model] if getattr(args, "model", None) else [
        "--base", args.base, "--expert", args.expert, "--anti-expert", args.anti_expert]
    command = [sys.executable, "-m", "proxytune", "serve", *roles, "--port", str(port), "--max-batch",
               str(max(args.levels)), "--max-queue", "256", "--log-level", "warning", *options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    return subprocess.Popen(command, env=env)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not come up")


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int,
                      extra: dict | None = None) -> tuple[float, float, int]:
    """(latency, time to first token, completion tokens) of one streamed completion; `extra`: more body fields."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {") and '"text": ""' not in line:
                first = time.perf_counter() - start
            if '"usage": {' in line:
                tokens = int(line.split('"completion_tokens": ')[1].split(",")[0])
    return time.perf_counter() - start, first or 0.0, tokens


async def run_level(url: str, clients: int, requests: int, max_tokens: int, extra: dict | None = None) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def client(c: int):
            return [await one_request(http, url, PROMPTS[(c + r) % len(PROMPTS)], max_tokens, extra)
                    for r in range(requests)]

        start = time.perf_counter()
        results = [x for per_client in await asyncio.gather(*(client(c) for c in range(clients))) for x in per_client]
        wall = time.perf_counter() - start
    return {"wall": wall, "tokens": sum(t for _, _, t in results), "latencies": [lat for lat, _, _ in results],
            "ttfts": [f for _, f, _ in results]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--expert", default="smollm2-135m-instruct")
    parser.add_argument("--anti-expert", dest="anti_expert", default="smollm2-135m-instruct")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=2, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP threads of the server")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(args, port)
    try:
        wait_ready(url, process)
        asyncio.run(run_level(url, 2, 1, 8))  # warm-up: first forwards, allocator, tokenizer caches
        measured: dict[int, list[dict]] = {level: [] for level in args.levels}
        ratios = []
        for round_index in range(args.rounds):
            order = args.levels[round_index % len(args.levels):] + args.levels[:round_index % len(args.levels)]
            this_round = {}
            for level in order:
                this_round[level] = asyncio.run(run_level(url, level, args.requests, args.max_tokens))
                measured[level].append(this_round[level])
                result = this_round[level]
                print(f"round {round_index + 1} clients {level:3d}: {result['tokens'] / result['wall']:7.1f} tok/s "
                      f"({result['tokens']} tokens in {result['wall']:.1f} s)", flush=True)
            low, high = min(args.levels), max(args.levels)
            ratios.append((this_round[high]["tokens"] / this_round[high]["wall"]) /
                          (this_round[low]["tokens"] / this_round[low]["wall"]))
    finally:
        process.terminate()
        process.wait(timeout=30)

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, server OMP threads {args.threads}; "
          f"{args.base} / {args.expert} / {args.anti_expert}; {args.requests} requests x {args.max_tokens} tokens "
          f"per client, greedy, streamed, {args.rounds} rounds\n")
    print("| clients | tokens/s (median of rounds) | p50 latency s | p99 latency s | p50 TTFT s |")
    print("|---:|---:|---:|---:|---:|")
    tps = {}
    for level in args.levels:
        runs = measured[level]
        tps[level] = statistics.median(r["tokens"] / r["wall"] for r in runs)
        latencies = [x for r in runs for x in r["latencies"]]
        ttfts = [x for r in runs for x in r["ttfts"]]
        print(f"| {level} | {tps[level]:.1f} | {percentile(latencies, 50):.2f} | {percentile(latencies, 99):.2f} | "
              f"{percentile(ttfts, 50):.2f} |")
    low, high = min(args.levels), max(args.levels)
    print(f"\nthroughput {high} clients / {low} client, per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x")
    print("RESULT " + " ".join(f"tps_{level}={tps[level]:.1f}" for level in args.levels) +
          f" ratio_{high}_over_{low}={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
