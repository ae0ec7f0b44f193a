"""What one bad request does to a healthy stream beside it, on a real `proxytune serve`.

Starts the server (any checkout: --tree runs that directory's proxytune, e.g. an older commit in a git
worktree, for a before/after in one run), then for each input of issue 13 sends it together with a healthy
greedy stream and reports the bad request's status, whether the healthy stream kept its exact text, and its
wall time as a ratio to the healthy stream alone (measured in the same round, rounds alternating).

    python benchmarks/hardening.py --rounds 2 -- --base smollm2-135m-instruct --expert smollm2-135m-instruct \
        --anti-expert smollm2-135m-instruct
    git worktree add /tmp/before 33ffd84 && python benchmarks/hardening.py --tree /tmp/before -- ...
    python benchmarks/hardening.py --issue 32 --tiny      # issue 32's inputs, on the tests' tiny random trio

--issue 32 sends what crashed, stalled or starved the server in issue 32, and beside each refused one the
largest request of its kind that is still accepted (a 16 KB format at n = 1, 64 schedule entries at n = 32, ...),
so the table shows what the limits still let through costs the healthy stream.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HEALTHY = {"prompt": "Write a short story about a lighthouse keeper.", "max_tokens": 24, "temperature": 0}
HEADERS = {"Content-Type": "application/json"}


def inputs() -> dict[str, tuple[str, bytes]]:
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 150  # ~1,500 tokens
    return {
        "alpha 1e39, temperature 1": ("/v1/completions", json.dumps(
            {"prompt": "Hello", "max_tokens": 24, "temperature": 1, "alpha": 1e39}).encode()),
        "alpha 3e38, temperature 1": ("/v1/completions", json.dumps(
            {"prompt": "Hello", "max_tokens": 24, "temperature": 1, "alpha": 3e38}).encode()),
        "a lone surrogate": ("/v1/chat/completions",
                             b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 8}'),
        "JSON nested 100,000 deep": ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "a 10 MB prompt": ("/v1/completions", json.dumps({"prompt": "fox " * 2_500_000, "max_tokens": 2}).encode()),
        "1,000 stop strings": ("/v1/completions", json.dumps(
            {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
             "stop": [f"zq{i}x" for i in range(1000)]}).encode()),
        "echo+logprobs, 4 x 1,500 tokens": ("/v1/completions", json.dumps(
            {"prompt": [long_prompt] * 4, "max_tokens": 0, "echo": True, "logprobs": 5}).encode()),
    }


def ref_chain(n: int) -> dict:
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def issue_32_inputs() -> dict[str, tuple[str, bytes]]:
    def completion(**body) -> tuple[str, bytes]:
        return "/v1/completions", json.dumps({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
                                              **body}).encode()

    def schema(properties: int) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "wide", "schema": {
            "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(properties)}}}}

    rules = "start: r0\n" + "\n".join(f"r{i}: r{i + 1}" for i in range(3000)) + '\nr3000: "a"'
    return {
        "schema chaining 1,000 $refs (94 KB)": completion(response_format={"type": "json_schema", "json_schema": {
            "name": "chain", "schema": ref_chain(1000)}}),
        "grammar chaining 3,000 rules": completion(response_format={"type": "grammar", "grammar": rules}),
        "10,000-property schema, n = 16": completion(n=16, response_format=schema(10_000)),
        "500-property schema (14 KB), n = 1: parser limit mid-way": completion(n=1, response_format=schema(500)),
        "accepted: 60-property schema (1.6 KB), n = 8": completion(n=8, response_format=schema(60)),
        "100 KB string literal, n = 32": completion(n=32, response_format={
            "type": "grammar", "grammar": 'start: "' + "ab c" * 25_000 + '"'}),
        "accepted: 16 KB string literal, n = 1": completion(n=1, response_format={
            "type": "grammar", "grammar": 'start: "' + "ab c" * 4_000 + '"'}),
        "alpha_schedule with 1M keys": completion(alpha_schedule={str(i): 1 for i in range(1_000_000)}),
        "accepted: 64 schedule entries, n = 32": completion(n=32, alpha_schedule={str(i): 1 for i in range(64)}),
        "/detokenize 7.9M ids": ("/detokenize", json.dumps({"tokens": [5] * 7_900_000}).encode()),
        "accepted: /detokenize 65,536 ids": ("/detokenize", json.dumps({"tokens": [5] * 65_536}).encode()),
        "/tokenize 15 MB": ("/tokenize", json.dumps({"prompt": "fox " * 3_750_000}).encode()),
        "accepted: /tokenize 1M characters": ("/tokenize", json.dumps({"prompt": "fox " * 262_000}).encode()),
        "n = 32 x 1,000 tokens, details 20": completion(n=32, max_tokens=1000, details=20),
        "accepted: n = 16 x 200 tokens, details 20": completion(n=16, max_tokens=200, details=20),
    }


async def stalled_readers(url: str, count: int, seconds: float) -> list:
    """`count` streams whose clients stop reading after the headers (their sockets left full), held open."""
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1000, "details": 20, "stream": True}).encode()
    host, port = url.rsplit(":", 1)
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writers.append(writer)
    await asyncio.sleep(seconds)
    return writers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(tree: Path, serve_args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "proxytune", "serve", "--port", str(port), *serve_args],
                               cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit("the server did not come up")


async def healthy_stream(http: httpx.AsyncClient, url: str) -> tuple[str, float]:
    start = time.monotonic()
    text = []
    async with http.stream("POST", url + "/v1/completions", json={**HEALTHY, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    text.append(chunk["choices"][0]["text"])
                elif "error" in chunk:
                    text.append(f"<error {chunk['error'].get('message', '')[:40]}>")
    return "".join(text), time.monotonic() - start


async def with_bad(http: httpx.AsyncClient, url: str, path: str, raw: bytes) -> tuple[int, str, float]:
    async def bad():
        await asyncio.sleep(0.05)  # the healthy stream is running
        try:
            return (await http.post(url + path, content=raw, headers=HEADERS, timeout=300)).status_code
        except httpx.HTTPError as error:
            return f"{type(error).__name__}"
    (text, seconds), status = await asyncio.gather(healthy_stream(http, url), bad())
    return status, text, seconds


def peak_rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


async def measure(url: str, rounds: int, only: str | None, issue: int) -> list[tuple[str, object, bool, float]]:
    rows = []
    async with httpx.AsyncClient(timeout=600) as http:
        reference, _ = await healthy_stream(http, url)
        if issue == 32:
            rows.append(await beside_stalled_readers(http, url, reference, rounds))
        for name, (path, raw) in (issue_32_inputs() if issue == 32 else inputs()).items():
            if only and only not in name:
                continue
            ratios, same, status = [], True, None
            for _ in range(rounds):
                _, alone = await healthy_stream(http, url)
                status, text, beside = await with_bad(http, url, path, raw)
                same &= text == reference
                ratios.append(beside / alone)
            rows.append((name, status, same, sorted(ratios)[len(ratios) // 2]))
    return rows


async def beside_stalled_readers(http, url: str, reference: str, rounds: int) -> tuple[str, object, bool, float]:
    """8 streams (n = 1, 1,000 tokens, details 20) whose clients stopped reading, then the healthy stream."""
    ratios, same = [], True
    for _ in range(rounds):
        _, alone = await healthy_stream(http, url)
        writers = await stalled_readers(url, 8, 2.0)
        text, beside = await healthy_stream(http, url)
        same &= text == reference
        ratios.append(beside / alone)
        for writer in writers:
            writer.close()
    return "8 streams whose readers stopped (1,000 tokens, details 20)", "-", same, sorted(ratios)[len(ratios) // 2]


def tiny_trio_args() -> list[str]:
    """The tests' tiny random trio, saved once under ~/.cache/proxytune/bench-tiny."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_server import save_tiny_trio

    dirs = save_tiny_trio(Path.home() / ".cache" / "proxytune" / "bench-tiny")
    return ["--base", dirs["base"], "--expert", dirs["expert"], "--anti-expert", dirs["anti_expert"]]


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                        help="serve this checkout's proxytune (e.g. an older commit in a git worktree)")
    parser.add_argument("--tiny", action="store_true", help="serve the tests' tiny random trio")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: proxytune serve's arguments")


def served(args: argparse.Namespace, run) -> tuple[object, bool, float, list[str]]:
    """run(url, pid) against a server started from `args` (add_server_arguments); its result, whether the server
    was still up after it, the server's peak RSS in GB, and the serve arguments."""
    serve_args = [a for a in args.serve_args if a != "--"] + (tiny_trio_args() if args.tiny else [])
    process, url = start(args.tree, serve_args)
    try:
        result = run(url, process.pid)
        alive = process.poll() is None
        rss = peak_rss_gb(process.pid)
    finally:
        process.terminate()
        process.wait(30)
    return result, alive, rss, serve_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default=None, help="run only the inputs whose name holds this text")
    parser.add_argument("--issue", type=int, choices=[13, 32], default=13, help="whose inputs to send")
    add_server_arguments(parser)
    args = parser.parse_args()
    rows, alive, rss, serve_args = served(args, lambda url, pid: asyncio.run(measure(url, args.rounds, args.only,
                                                                                      args.issue)))
    print(f"server: {args.tree} {' '.join(serve_args)}; healthy stream {HEALTHY['max_tokens']} greedy tokens")
    print(f"| input | its status | healthy stream's text kept | healthy time beside it / alone (median of {args.rounds}) |")
    print("|---|---|---|---:|")
    for name, status, same, ratio in rows:
        print(f"| {name} | {status} | {'yes' if same else 'NO'} | {ratio:.2f} |")
    print(f"server still up: {alive}; its peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
