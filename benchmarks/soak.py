"""A soak of `proxytune serve`: clients sending mixed valid traffic for many minutes, rows joining the running
batch at nearly every step. Passes when nothing fails, the server's memory stays flat after warm-up and its
latency does not climb (issue 32: the batch must not grow state with history).

    python benchmarks/soak.py --tiny --minutes 10                 # the tests' tiny random trio
    python benchmarks/soak.py --minutes 5 -- --base smollm2-135m-instruct --expert smollm2-135m-instruct \
        --anti-expert smollm2-135m-instruct
    git worktree add /tmp/before c8e2c62 && python benchmarks/soak.py --tiny --tree /tmp/before --minutes 5

Each of --clients clients loops over a random mix: greedy completions, chat, streams, echo + logprobs over token
ids (lm-eval's loglikelihood requests), a JSON-schema response_format, sampled n = 2 with a seed, and one stream
in twenty abandoned mid-way (its rows must leave). Reported: requests and errors, p50/p99 latency of the first
and the last minute, RSS after the first minute (warm-up) and at the end, /health at the end; the last line is
RESULT errors=.. rss_growth=.. p99_last_over_first=.. pass=true|false (errors 0, RSS within 10 %, p99 ratio
<= 1.2).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hardening import add_server_arguments, served  # noqa: E402  (benchmarks/hardening.py)

SCHEMA = {"type": "json_schema", "json_schema": {"name": "pet", "schema": {
    "type": "object", "properties": {"animal": {"enum": ["fox", "dog", "cat"]}, "age": {"type": "integer"}},
    "required": ["animal", "age"]}}}
PROMPTS = ["The quick brown fox", "Once upon a time", "def add(a, b):", "Question: what is 3 + 4?\nAnswer:",
           "Tuning language models by proxy", "The lazy dog"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_request(http: httpx.AsyncClient, url: str, rng: random.Random, token_ids: list[int]) -> str | None:
    """One request of the mix; None when it went as it should, else what went wrong."""
    prompt = rng.choice(PROMPTS)
    kind = rng.choice(["greedy", "chat", "stream", "echo", "schema", "sampled", "stream"])
    if kind == "stream" and rng.random() < 0.05:
        kind = "abandon"
    if kind in ("stream", "abandon"):
        body = {"prompt": prompt, "max_tokens": rng.randint(8, 48), "temperature": 0, "stream": True}
        async with http.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return f"stream {response.status_code}"
            chunks = 0
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"error"' in line:
                    return f"stream error {line[:120]}"
                chunks += 1
                if kind == "abandon" and chunks >= 3:
                    return None  # the client goes away; its rows must leave at the next step
            return None
    if kind == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}],
                                              "max_tokens": rng.randint(4, 24), "temperature": 0}
    elif kind == "echo":
        ids = token_ids[:rng.randint(3, len(token_ids))]
        path, body = "/v1/completions", {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1,
                                         "temperature": 0}
    elif kind == "schema":
        path, body = "/v1/completions", {"prompt": prompt, "max_tokens": 48, "temperature": 0,
                                         "response_format": SCHEMA}
    elif kind == "sampled":
        path, body = "/v1/completions", {"prompt": prompt, "max_tokens": rng.randint(4, 24), "temperature": 0.8,
                                         "n": 2, "seed": rng.randrange(1000)}
    else:
        path, body = "/v1/completions", {"prompt": prompt, "max_tokens": rng.randint(1, 24), "temperature": 0}
    response = await http.post(url + path, json=body)
    if response.status_code != 200:
        return f"{kind} {response.status_code} {response.text[:120]}"
    return None


async def client(index: int, http, url: str, until: float, token_ids: list[int], log: list) -> None:
    rng = random.Random(index)
    while time.monotonic() < until:
        start_time = time.monotonic()
        try:
            problem = await one_request(http, url, rng, token_ids)
        except httpx.HTTPError as error:
            problem = f"{type(error).__name__}: {error}"
        log.append((start_time, time.monotonic() - start_time, problem))


async def soak(url: str, pid: int, minutes: float, clients: int) -> dict:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=4 * clients)) as http:
        token_ids = (await http.post(url + "/tokenize", json={"prompt": "Answer the following question. " * 3})
                     ).json()["tokens"]
        log: list = []
        begin = time.monotonic()
        until = begin + minutes * 60
        rss: list[tuple[float, float]] = []

        async def sample():
            while time.monotonic() < until:
                rss.append((time.monotonic() - begin, rss_mb(pid)))
                await asyncio.sleep(5)
        await asyncio.gather(sample(), *(client(i, http, url, until, token_ids, log) for i in range(clients)))
        await asyncio.sleep(1)
        health = (await http.get(url + "/health")).json()
    return {"log": log, "rss": rss, "health": health, "begin": begin}


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


def report(result: dict, minutes: float, label: str) -> dict:
    log, begin = result["log"], result["begin"]
    first = [s for t, s, _ in log if t - begin < 60]
    last = [s for t, s, _ in log if t - begin >= minutes * 60 - 60]
    errors = [problem for _, _, problem in log if problem]
    warm = [mb for t, mb in result["rss"] if t >= 60] or [mb for _, mb in result["rss"]]
    growth = (max(warm) - warm[0]) / warm[0]
    summary = {"label": label, "minutes": minutes, "requests": len(log), "errors": len(errors),
               "first_errors": errors[:5], "p50_first_s": statistics.median(first), "p99_first_s": p(first, 99),
               "p50_last_s": statistics.median(last), "p99_last_s": p(last, 99),
               "rss_after_warmup_mb": warm[0], "rss_max_after_warmup_mb": max(warm), "rss_end_mb": warm[-1],
               "rss_growth": growth, "health": result["health"]}
    summary["p99_last_over_first"] = summary["p99_last_s"] / summary["p99_first_s"]
    summary["pass"] = (not errors and growth <= 0.10 and summary["p99_last_over_first"] <= 1.2
                       and result["health"].get("running_rows") == 0)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--label", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    add_server_arguments(parser)
    args = parser.parse_args()
    result, alive, _, serve_args = served(args, lambda url, pid: asyncio.run(soak(url, pid, args.minutes,
                                                                                  args.clients)))
    summary = report(result, args.minutes, args.label or ("tiny trio" if args.tiny else " ".join(serve_args)))
    summary["server_alive"] = alive
    print(json.dumps({k: v for k, v in summary.items()}, indent=1))
    print(f"| {summary['label']} | {args.minutes:g} min, {args.clients} clients | {summary['requests']} | "
          f"{summary['errors']} | {summary['rss_after_warmup_mb']:.0f} → {summary['rss_end_mb']:.0f} MB "
          f"(max +{100 * summary['rss_growth']:.1f} %) | {summary['p50_first_s']:.3f} / {summary['p99_first_s']:.3f} s | "
          f"{summary['p50_last_s']:.3f} / {summary['p99_last_s']:.3f} s | {summary['p99_last_over_first']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"RESULT errors={summary['errors']} rss_growth={summary['rss_growth']:.3f} "
          f"p99_last_over_first={summary['p99_last_over_first']:.2f} pass={str(summary['pass']).lower()}")


if __name__ == "__main__":
    main()
