"""Why speculative decoding barely helps on llama.cpp, and whether k now follows what each backend costs.

    python benchmarks/speculative_costs.py                   # demo trio on llama.cpp (demo-gguf), 2 threads
    python benchmarks/speculative_costs.py --model demo      # the same trio on transformers (bf16)

1. Verification cost by width: the base's time to score w tokens per row (w = 1, 2, 4, 8) in one call,
   against w one-token calls. A memory-bound backend reads its weights once for all w (t(w) ≈ t(1));
   a compute-bound one pays per token (t(w) ≈ w·t(1)), and then a draft buys almost nothing.
2. Decoding speed, batch 1, greedy, EOS ignored: plain; speculative with k from the acceptance rate and
   fixed cost guesses (what proxytune did before: a draft step = 0.3 verifications, +5 % per extra token);
   speculative with k from measured step times (now). Alternating rounds, ratios within each round.
The last line: RESULT prior_speedup=X measured_speedup=Y identical=true|false
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from proxytune import ProxyTuner  # noqa: E402
from proxytune.engine.speculative import SpeculativeDecoding  # noqa: E402
from run import proxy_decode  # noqa: E402  (benchmarks/run.py: one decode timing for every benchmark)

PROMPT = ("Answer the following question.\n\nQuestion: Tom has 3 boxes with 12 pencils each. He gives away 7 "
          "pencils. How many pencils does he have left?\nAnswer:")


def width_costs(tuner: ProxyTuner, widths=(1, 2, 4, 8), repeats: int = 3) -> dict[int, float]:
    session = tuner.sources["base"].open([tuner.encode(PROMPT)])
    session.prefill()
    costs = {}
    for width in widths:
        times = []
        for _ in range(repeats):
            tokens = torch.randint(100, 1000, (1, width))
            start = time.perf_counter()
            session.advance(tokens)
            times.append(time.perf_counter() - start)
            session.rewind([0])
        costs[width] = min(times)
    return costs


def decode(tuner: ProxyTuner, n: int, mode: str) -> tuple[float, list[int], str]:
    """run.py's decode timing; "prior costs" keeps k on the acceptance rate and the fixed guesses alone."""
    measure = SpeculativeDecoding._measure
    if mode == "speculative, prior costs":
        SpeculativeDecoding._measure = lambda self: None
    try:
        seconds, outputs, decoding = proxy_decode(tuner, [PROMPT], n, speculative=mode != "plain")
    finally:
        SpeculativeDecoding._measure = measure
    note = ""
    if mode != "plain":
        note = f"acceptance {decoding.acceptance_rate:.2f}, {decoding.rounds} rounds, last k {decoding.draft_length.next()}"
    return seconds, outputs[0].token_ids, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-gguf")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"threads": args.threads} if args.model.endswith("gguf") else {"dtype": args.dtype}
    tuner = ProxyTuner.from_pretrained(args.model, **options)
    tuner.eos_token_ids = set()
    costs = width_costs(tuner)
    print(f"{args.model}: base verification of w tokens in one call vs w one-token calls")
    for width, seconds in costs.items():
        print(f"  w = {width}: {1000 * seconds:7.1f} ms = {seconds / costs[1]:.2f} x t(1)   "
              f"(w calls: {width:.0f} x t(1))")
    modes = ["plain", "speculative, prior costs", "speculative, measured costs"]
    ratios = {mode: [] for mode in modes[1:]}
    identical = True
    for r in range(args.rounds):
        order = modes[r % 3:] + modes[: r % 3]
        results = {mode: decode(tuner, args.tokens, mode) for mode in order}
        plain_time, plain_ids, _ = results["plain"]
        line = [f"plain {1000 * plain_time:.0f} ms/token"]
        for mode in modes[1:]:
            seconds, ids, note = results[mode]
            identical &= ids == plain_ids
            ratios[mode].append(plain_time / seconds)
            line.append(f"{mode} {1000 * seconds:.0f} ms/token ({ratios[mode][-1]:.2f}x; {note})")
        print(f"round {r + 1}: " + "; ".join(line), flush=True)
    summary = {mode: statistics.median(values) for mode, values in ratios.items()}
    for mode, value in summary.items():
        print(f"{mode}: {value:.2f}x plain (rounds {', '.join(f'{v:.2f}' for v in ratios[mode])})")
    print(f"RESULT prior_speedup={summary[modes[1]]:.2f} measured_speedup={summary[modes[2]]:.2f} "
          f"identical={str(identical).lower()}")


if __name__ == "__main__":
    main()
