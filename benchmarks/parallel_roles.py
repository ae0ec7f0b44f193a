"""Roles stepping concurrently vs one after another: time per token, in alternating rounds of one run.

A proxy step runs every role's forward. When the roles' sessions declare places apart (a remote base and a
local pair; roles on different GPUs), `ProxySession` runs them in threads, so a step costs about the slowest
role instead of the sum. `ProxySession.concurrent = False` is the one-after-another reference; replies must
be identical.

    --setting remote    the pirate setting of docs/remote.md: SmolLM2-135M-Instruct behind the real llama.cpp
                        server as the base (plain decoding, chunk=0: one call per token), the expert/anti-expert
                        pair local in transformers fp32 (one thread: the other core serves the base);
                        --latency S adds a round trip of S seconds per call, as a hosted API has
    --setting devices   a random-initialised ~1.1B base and ~0.2B pair (benchmarks/device_trio.py's shapes):
                        base on cuda:0, pair on cuda:1 (or on the CPU when there is one GPU)

    python benchmarks/parallel_roles.py --setting remote --latency 0.05
    python benchmarks/parallel_roles.py --setting devices --tokens 64
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from proxytune import ProxyTuner  # noqa: E402
from proxytune.engine.session import ProxySession  # noqa: E402


def timed_run(run, requests, concurrent: bool, device=None) -> tuple[float, list]:
    ProxySession.concurrent = concurrent
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = run(requests)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, outputs


def compare(run, requests, rounds: int, device=None) -> None:
    """`run(requests)` -> outputs (with .token_ids), timed one after another and concurrently."""
    timed_run(run, requests, True, device)  # warm-up: caches, kernels, the server's prefix cache
    seconds = {True: 0.0, False: 0.0}
    replies = {}
    for _ in range(rounds):
        for concurrent in (False, True):  # alternating: the machine's load hits both alike
            spent, outputs = timed_run(run, requests, concurrent, device)
            seconds[concurrent] += spent
            replies[concurrent] = [o.token_ids for o in outputs]
    tokens = sum(len(ids) for ids in replies[True]) * rounds
    same = sum(a == b for a, b in zip(replies[True], replies[False]))
    print(f"| {len(requests)} | {tokens // rounds} | {1000 * seconds[False] / tokens:.1f} | "
          f"{1000 * seconds[True] / tokens:.1f} | {seconds[True] / seconds[False]:.2f} | {same} of {len(requests)} |",
          flush=True)


def remote(args) -> None:
    from llama_server import LlamaServer, smollm2_gguf
    from remote_agreement import requests_for
    from remote_chunked import Latency

    from proxytune.backends.remote.source import RemoteSource
    from proxytune.backends.remote.spec import parse_spec
    from proxytune.models.loading import load_plain
    from proxytune.models.tokenizers import load_tokenizer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    local, _ = load_plain("smollm2-135m-instruct", torch.device("cpu"), torch.float32)
    print(f"remote base (llama.cpp server, chunk=0) + local transformers pair; round trip added "
          f"{1000 * args.latency:.0f} ms; {args.rounds} alternating rounds")
    print("| rows | tokens | ms/token one after another | ms/token concurrent | concurrent/sequential | identical |")
    print("|---|---|---|---|---|---|")
    with LlamaServer(smollm2_gguf()) as llama:
        server = Latency(llama.url, args.latency) if args.latency else llama
        source = RemoteSource(parse_spec(f"openai:{server.url}?tokenizer=smollm2-135m-instruct&top_k=20&chunk=0"),
                              tokenizer)
        tuner = ProxyTuner(source, local, local, tokenizer=tokenizer)
        for rows in args.rows:
            requests = requests_for(tokenizer, 0.5, args.tokens)[:rows]
            compare(lambda batch: tuner.run(batch, batch_size=len(batch)), requests, args.rounds)
        source.close()


def devices(args) -> None:
    from device_trio import Ids, model

    from proxytune.backends.transformers import TransformersSource
    from proxytune.engine.decoding import Decoding, Request
    from proxytune.engine.settings import Settings
    from proxytune.engine.roles import ExpertPair

    if args.base_device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--setting devices needs a CUDA GPU (or --base-device cpu for a smoke run)")
    base_device = torch.device(args.base_device)
    pair_device = torch.device(args.pair_device or ("cuda:1" if torch.cuda.device_count() > 1 else "cpu"))
    dtype = getattr(torch, args.dtype)
    shrink = args.shrink  # 1: the realistic shapes; larger: a smoke run's small models
    base = TransformersSource(model(2048 // shrink, 22 // shrink, base_device, dtype, 0), name="base")
    pair_dtype = dtype if pair_device.type == "cuda" else torch.float32
    expert = TransformersSource(model(1024 // shrink, 12 // shrink, pair_device, pair_dtype, 1), name="expert")
    anti = TransformersSource(model(1024 // shrink, 12 // shrink, pair_device, pair_dtype, 2), name="anti_expert")

    def run(requests):
        decoding = Decoding(base, [ExpertPair(expert, anti)], requests, Ids(), eos_ids=set())
        for _ in decoding.steps():
            pass
        return decoding.outputs()
    print(f"base on {base_device} ({args.dtype}), pair on {pair_device}; greedy, EOS ignored; {args.rounds} rounds")
    print("| rows | tokens | ms/token one after another | ms/token concurrent | concurrent/sequential | identical |")
    print("|---|---|---|---|---|---|")
    for rows in args.rows:
        prompt = list(range(10, 42))
        requests = [Request({"base": prompt, "expert": prompt, "anti_expert": prompt},
                            Settings(args.tokens, alpha=(1.0,))) for _ in range(rows)]
        compare(run, requests, args.rounds, base_device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=["remote", "devices"], default="remote")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--base-device", default="cuda:0", help="--setting devices: where the base runs")
    parser.add_argument("--pair-device", default=None, help="--setting devices: where the pair runs (default: cuda:1, "
                                                            "or the CPU with one GPU)")
    parser.add_argument("--shrink", type=int, default=1, help="--setting devices: divide the models' sizes (smoke runs)")
    args = parser.parse_args()
    (remote if args.setting == "remote" else devices)(args)


if __name__ == "__main__":
    main()
