"""What one decoding forward costs by batch size: the reason a larger batch is cheaper per row on a CPU.

Opens the model's own session (the one decoding uses) over B rows of a `--context`-token prompt, then times
`--steps` one-token advances; batch sizes alternate within each round (this machine's load changes; only
ratios mean much). Prints ms per forward and per row, and each size's time relative to one row.

    python benchmarks/batch_forward.py --model qwen2.5-coder-1.5b-instruct --sizes 1,4,8,16
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from proxytune.models.loading import load_roles  # noqa: E402


def time_size(source, rows: int, context: int, steps: int) -> float:
    """Seconds per one-token advance of `rows` rows after a `context`-token prefill."""
    generator = torch.Generator().manual_seed(rows)
    prompts = torch.randint(100, 1000, (rows, context), generator=generator).tolist()
    session = source.open(prompts)
    session.prefill()
    start = time.perf_counter()
    for _ in range(steps):
        session.advance(torch.randint(100, 1000, (rows, 1), generator=generator))
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--sizes", default="1,4,8,16")
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(size) for size in args.sizes.split(",")]
    source, _ = load_roles({"base": args.model}, [], dtype="bfloat16")["base"]
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    for round_ in range(args.rounds):
        for size in sizes if round_ % 2 == 0 else reversed(sizes):
            seconds[size].append(time_size(source, size, args.context, args.steps))
            print(f"round {round_ + 1} batch {size}: {1000 * seconds[size][-1]:.0f} ms per forward", flush=True)
    one = min(seconds[sizes[0]])
    print(f"\n{args.model}, bf16, {args.context}-token context, {torch.get_num_threads()} torch threads, best of "
          f"{args.rounds} rounds")
    print(f"{'rows':>5}  {'ms/forward':>10}  {'ms/row':>7}  {'× ' + str(sizes[0]) + ' row(s)':>10}")
    for size in sizes:
        best = min(seconds[size])
        print(f"{size:>5}  {1000 * best:>10.0f}  {1000 * best / size:>7.0f}  {best / one:>10.2f}")


if __name__ == "__main__":
    main()
