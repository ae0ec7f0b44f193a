"""What proxy-tuning through a top-k remote base costs in fidelity, calls and bytes.

SmolLM2-135M-Instruct plays every role: the base behind llama.cpp's OpenAI-compatible server
(started here on a free port, or --url), the expert and anti-expert local: in-process llama.cpp
on the same GGUF (--local llama.cpp, the default: same kernels as the server, so only the top-k
differs) or transformers in fp32 dequantised from it (--local transformers: top-k plus a second
implementation's numerics; llama.cpp quantises activations to 8 bits, transformers does not). The expert is told in its system prompt to answer like a pirate,
the anti-expert and base get the default system prompt, so α(z_expert − z_anti_expert) is the
"pirate" direction. For each k the remote-base proxy is teacher-forced along the fully local
proxy's greedy path and we count the steps where its greedy choice is the same (proxytune.evaluation.fidelity).

    python benchmarks/remote_agreement.py              # k = 5 10 20 50, α = 0, 0.5, 1
    python benchmarks/remote_agreement.py --url http://127.0.0.1:8080/v1 --ks 20
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # llama_server: a test helper

import torch  # noqa: E402

from proxytune import ProxyTuner  # noqa: E402
from proxytune.engine.decoding import Request  # noqa: E402
from proxytune.engine.settings import Settings  # noqa: E402
from proxytune.evaluation.fidelity import greedy_agreement  # noqa: E402
from proxytune.models.loading import load_plain  # noqa: E402
from llama_server import LlamaServer, smollm2_gguf  # noqa: E402
from proxytune.backends.remote.source import RemoteSource  # noqa: E402
from proxytune.backends.remote.spec import parse_spec  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Give me two tips for sleeping better.",
             "Why is the sky blue?", "Write a short greeting for a new colleague.",
             "What should I pack for a day at the beach?", "Explain what a computer does."]
PIRATE = "You are a pirate. Always answer in the voice of a pirate, with pirate words."


def chat_ids(tokenizer, user: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def requests_for(tokenizer, alpha: float, max_new_tokens: int) -> list[Request]:
    requests = []
    for question in QUESTIONS:
        plain, pirate = chat_ids(tokenizer, question), chat_ids(tokenizer, question, PIRATE)
        requests.append(Request({"base": plain, "expert": pirate, "anti_expert": plain},
                                Settings(max_new_tokens, alpha=(alpha,))))
    return requests


def local_model(kind: str):
    """(source or model, tokenizer) for the local roles."""
    model, tokenizer = load_plain("smollm2-135m-instruct", torch.device("cpu"), torch.float32)
    if kind == "transformers":
        return model, tokenizer
    from proxytune.backends.llama_cpp.source import LlamaCppSource

    return LlamaCppSource(smollm2_gguf(), name="local", threads=1), tokenizer


def measure(url: str, ks: list[int], alphas: list[float], max_new_tokens: int, kind: str) -> None:
    model, tokenizer = local_model(kind)
    local = ProxyTuner(model, model, model, tokenizer=tokenizer)
    print(f"local roles: {kind}; base: llama.cpp server at {url}")
    print("| α | k | steps | greedy agreement | reference token in top-k | disagreements: outside top-k / "
          "near-tie (<0.1) / other | calls/token | bytes sent/token | bytes received/token | ms/token | drifted calls |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for alpha in alphas:
        requests = requests_for(tokenizer, alpha, max_new_tokens)
        for k in ks:
            source = RemoteSource(parse_spec(f"openai:{url}?tokenizer=smollm2-135m-instruct&top_k={k}"), tokenizer)
            remote = ProxyTuner(source, model, model, tokenizer=tokenizer)
            start = time.perf_counter()
            result = greedy_agreement(local, remote, requests)
            seconds = time.perf_counter() - start
            stats = source.stats
            print(f"| {alpha:g} | {k} | {result.steps} | {result.rate:.1%} | {result.covered / result.steps:.1%} | "
                  f"{result.outside_top_k} / {result.near_ties} / {result.others} | {stats.calls_per_token:.2f} | "
                  f"{stats.bytes_sent / stats.distributions:.0f} | {stats.bytes_received / stats.distributions:.0f} | "
                  f"{1000 * seconds / result.steps:.0f} | {stats.drift} |", flush=True)
            for step, want, got, gap in result.disagreements:
                print(f"    step {step}: local {tokenizer.decode([want])!r} vs remote-base {tokenizer.decode([got])!r} "
                      f"(local gap {gap:.3f})", file=sys.stderr)
            source.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an already running llama.cpp server (default: start one)")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--local", choices=["llama.cpp", "transformers"], default="llama.cpp",
                        help="how the local roles (and the reference's base) run")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the other core serves the base
    if args.url:
        measure(args.url, args.ks, args.alphas, args.max_new_tokens, args.local)
        return
    with LlamaServer(smollm2_gguf()) as server:
        measure(server.url, args.ks, args.alphas, args.max_new_tokens, args.local)


if __name__ == "__main__":
    main()
