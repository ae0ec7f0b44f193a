"""Chunked vs plain remote-base decoding on a real llama.cpp server: calls, wall time, identity.

The pirate setting of docs/remote.md: SmolLM2-135M-Instruct in every role, the base behind
llama-cpp-python's OpenAI-compatible server (started here, one thread), the expert (system prompt:
answer like a pirate) and the anti-expert (default system prompt) local: transformers fp32 (default)
or in-process llama.cpp on the same GGUF (--local llama.cpp), one thread. For each α and top-k the same greedy requests are decoded plainly (chunk=0: one call
per token) and in chunks (chunk=auto, or the --chunks given), in alternating rounds, and we report calls
per generated token, wall time per token, chunked/plain ratios, and whether every reply is identical.
Where a reply differs, the first differing step is shown with the plain decoding's margin there (log p̃
of its token minus that of the chunked one): llama.cpp's logprobs move by ~0.01-0.07 with how a prefix
was evaluated (a prompt batch vs one token at a time vs its prefix cache), so only a near-tie can flip.

--latency S puts a forwarding proxy in front of the server that holds every request S seconds, as a
hosted API's round trip does (0.2-1 s): llama-cpp-python on this machine answers a cached-prefix call
in ~3 ms, but computes its logprobs in Python at ~40 ms per returned position, so here a chunk of n
costs about n one-token calls and only the round trip can be saved.

    python benchmarks/remote_chunked.py                      # α 0.5 1, k 5 20, chunk auto
    python benchmarks/remote_chunked.py --chunks auto 8 --rounds 2 --latency 0.2
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # llama_server: a test helper

import torch  # noqa: E402

from proxytune import ProxyTuner  # noqa: E402
from proxytune.backends.llama_cpp.source import LlamaCppSource  # noqa: E402
from proxytune.backends.remote.source import RemoteSource  # noqa: E402
from proxytune.backends.remote.spec import parse_spec  # noqa: E402
from proxytune.models.loading import load_plain  # noqa: E402
from proxytune.models.tokenizers import load_tokenizer  # noqa: E402
from llama_server import LlamaServer, smollm2_gguf  # noqa: E402

from remote_agreement import requests_for  # noqa: E402


class Latency:
    """A forwarding proxy that holds each request `seconds` before passing it on: a remote round trip."""

    def __init__(self, upstream: str, seconds: float):
        import httpx

        client, root = httpx.Client(timeout=600), upstream.rsplit("/v1", 1)[0]

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self, method: str):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(seconds)
                answer = client.request(method, root + self.path, content=body,
                                        headers={"Content-Type": "application/json"})
                self.send_response(answer.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def do_GET(self):
                self.forward("GET")

            def do_POST(self):
                self.forward("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


def noise(plain, chunked, role: str) -> float:
    """The largest |log p plain − log p chunked| of a chosen token under `role` over the steps both replies
    took alike: how much the two call patterns move that role's numbers (the server's: its prefix cache
    and batch splits; the local pair's: one n-token forward instead of n one-token steps)."""
    worst = 0.0
    for a, b in zip(plain, chunked):
        for step, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                break
            p, q = a.details[step].chosen_prob[role], b.details[step].chosen_prob[role]
            if p > 0 and q > 0:
                worst = max(worst, abs(math.log(p) - math.log(q)))
    return worst


def decode(url: str, tokenizer, local, alpha: float, k: int, chunk: str, max_new_tokens: int):
    """(outputs, stats, seconds) of one pass over the requests, a batch at a time."""
    source = RemoteSource(parse_spec(f"openai:{url}?tokenizer=smollm2-135m-instruct&top_k={k}&chunk={chunk}"),
                          tokenizer)
    tuner = ProxyTuner(source, local, local, tokenizer=tokenizer)
    requests = requests_for(tokenizer, alpha, max_new_tokens)
    for request in requests:
        request.details = 5
    start = time.perf_counter()
    outputs = tuner.run(requests, batch_size=1)  # one row at a time: llama.cpp's one-slot prefix cache holds
    seconds = time.perf_counter() - start
    stats = source.stats
    source.close()
    return outputs, stats, seconds


def first_difference(tokenizer, plain, chunked) -> str:
    step = next(i for i, (a, b) in enumerate(zip(plain.token_ids + [None], chunked.token_ids + [None])) if a != b)
    detail = plain.details[step]
    ranked = dict(detail.top_logprobs)
    other = chunked.token_ids[step] if step < len(chunked.token_ids) else None
    margin = (ranked[detail.token_id] - ranked[other]) if other in ranked else float("nan")
    def show(t):
        return "EOS" if t is None else repr(tokenizer.decode([t]))
    return f"step {step}: plain {show(plain.token_ids[step] if step < len(plain.token_ids) else None)} " \
           f"vs chunked {show(other)}, plain margin {margin:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--chunks", nargs="+", default=["auto"], help="chunk= values to compare with chunk=0")
    parser.add_argument("--rounds", type=int, default=2, help="alternating plain/chunked rounds per setting")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--local", choices=["llama.cpp", "transformers"], default="transformers",
                        help="the local pair: transformers fp32 (default: a one-n-token forward equals n one-token "
                             "steps to ~1e-6) or in-process llama.cpp (its Q4 kernels differ by batch width)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each call is held (a remote round trip)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the other core serves the base
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    if args.local == "llama.cpp":
        local = LlamaCppSource(smollm2_gguf(), name="local", threads=1)
    else:
        local, _ = load_plain("smollm2-135m-instruct", torch.device("cpu"), torch.float32)
    print(f"local pair: {args.local}")
    print(f"round trip added: {1000 * args.latency:.0f} ms per call")
    print("| α | k | chunk | tokens | calls/token plain | calls/token chunked | tokens/call | ms/token plain | "
          "ms/token chunked | wall chunked/plain | identical replies | noise: base (server) / expert (local) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with LlamaServer(smollm2_gguf()) as llama:
        server = Latency(llama.url, args.latency) if args.latency else llama
        for alpha in args.alphas:
            for k in args.ks:
                for chunk in args.chunks:
                    totals = {"0": [0, 0, 0.0], chunk: [0, 0, 0.0]}  # calls, tokens, seconds
                    replies = {}
                    for _ in range(args.rounds):
                        for mode in ("0", chunk):  # alternating: the machine's load hits both alike
                            outputs, stats, seconds = decode(server.url, tokenizer, local, alpha, k, mode,
                                                             args.max_new_tokens)
                            totals[mode][0] += stats.calls
                            totals[mode][1] += stats.tokens
                            totals[mode][2] += seconds
                            replies[mode] = outputs
                    plain, chunked = replies["0"], replies[chunk]
                    same = sum(a.token_ids == b.token_ids for a, b in zip(plain, chunked))
                    (pc, pt, ps), (cc, ct, cs) = totals["0"], totals[chunk]
                    print(f"| {alpha:g} | {k} | {chunk} | {ct // args.rounds} | {pc / pt:.2f} | {cc / ct:.2f} | "
                          f"{ct / cc:.1f} | {1000 * ps / pt:.0f} | {1000 * cs / ct:.0f} | "
                          f"{(cs / ct) / (ps / pt):.2f} | {same} of {len(plain)} | "
                          f"{noise(plain, chunked, 'base'):.3f} / {noise(plain, chunked, 'expert'):.3f} |",
                          flush=True)
                    for index, (a, b) in enumerate(zip(plain, chunked)):
                        if a.token_ids != b.token_ids:
                            print(f"    reply {index}: {first_difference(tokenizer, a, b)}", flush=True)


if __name__ == "__main__":
    main()
