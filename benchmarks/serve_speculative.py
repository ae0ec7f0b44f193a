"""Does speculative decoding pay in the server? `proxytune serve` at 1 and 8 concurrent clients, plain vs
speculative decoding, one server, each request naming its mode (the `decoding` field).

    python benchmarks/serve_speculative.py                       # the demo trio (Qwen2.5-Coder 1.5B / 0.5B GSM)
    python benchmarks/serve_speculative.py --model NAME | --base B --expert E --anti-expert A

Both modes run in the same server process, so they meet the same caches, threads and machine load; in each
round every (clients, mode) pair runs once, the order of modes alternating between rounds, and the ratio
speculative / plain tokens/s is taken inside each round (median and range reported). First, every prompt is
decoded greedily in both modes and the texts compared (identical in fp32; in bf16 near-ties may round apart). No
asserts on speed: it prints measurements. Last line, for machines:
RESULT speculative_over_plain_1=X speculative_over_plain_8=Y identical=K/8
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import PROMPTS, free_port, run_level, start_server, wait_ready  # noqa: E402

MODES = ("plain", "speculative")


def same_text(url: str, max_tokens: int) -> int:
    """How many prompts' greedy texts are the same decoded plainly and speculatively (all of them in fp32; in
    bf16 a verification forward over several positions may round a near-tie the other way: README, speed)."""
    same = 0
    for prompt in PROMPTS:
        texts = [httpx.post(url + "/v1/completions", timeout=600, json={
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "decoding": mode}).json()["choices"][0]["text"]
            for mode in MODES]
        same += texts[0] == texts[1]
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="a registered trio (default demo); or give the three roles")
    parser.add_argument("--base")
    parser.add_argument("--expert")
    parser.add_argument("--anti-expert", dest="anti_expert")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=1, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP threads of the server")
    parser.add_argument("--dtype", default=None, help="the server's --dtype (default: each checkpoint's own)")
    args = parser.parse_args()
    if args.base:
        args.model = None

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(args, port, *(["--dtype", args.dtype] if args.dtype else []))
    try:
        wait_ready(url, process, timeout=1200)
        for mode in MODES:  # warm-up: first forwards, allocator, tokenizer caches
            asyncio.run(run_level(url, 2, 1, 8, {"decoding": mode}))
        identical = same_text(url, args.max_tokens)
        print(f"greedy text identical in both modes: {identical} of {len(PROMPTS)} prompts", flush=True)
        measured = {(level, mode): [] for level in args.levels for mode in MODES}
        ratios = {level: [] for level in args.levels}
        for round_index in range(args.rounds):
            modes = MODES if round_index % 2 == 0 else MODES[::-1]
            for level in args.levels:
                tps = {}
                for mode in modes:
                    result = asyncio.run(run_level(url, level, args.requests, args.max_tokens, {"decoding": mode}))
                    measured[(level, mode)].append(result)
                    tps[mode] = result["tokens"] / result["wall"]
                    print(f"round {round_index + 1} clients {level:2d} {mode:11s}: {tps[mode]:6.2f} tok/s "
                          f"({result['tokens']} tokens in {result['wall']:.1f} s)", flush=True)
                ratios[level].append(tps["speculative"] / tps["plain"])
    finally:
        process.terminate()
        process.wait(timeout=30)

    roles = args.model or f"{args.base} / {args.expert} / {args.anti_expert}"
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, server OMP threads {args.threads}; "
          f"{roles}; {args.requests} request(s) x {args.max_tokens} tokens per client, greedy, streamed, "
          f"{args.rounds} rounds\n")
    print("| clients | plain tok/s | speculative tok/s | speculative / plain (median, range) |")
    print("|---:|---:|---:|---:|")
    for level in args.levels:
        plain, spec = (statistics.median(r["tokens"] / r["wall"] for r in measured[(level, m)]) for m in MODES)
        print(f"| {level} | {plain:.2f} | {spec:.2f} | {statistics.median(ratios[level]):.2f}x "
              f"({min(ratios[level]):.2f}-{max(ratios[level]):.2f}) |")
    print("RESULT " + " ".join(f"speculative_over_plain_{level}={statistics.median(ratios[level]):.2f}"
                               for level in args.levels) + f" identical={identical}/{len(PROMPTS)}")


if __name__ == "__main__":
    main()
