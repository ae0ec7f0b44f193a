"""How much memory and time does a LoRA training step take with transformers' loss vs proxytune's chunked one?

    python scripts/bench_tune_memory.py --model qwen2.5-coder-0.5b-instruct --rounds 2 --steps 2 --threads 1

transformers' loss builds the [batch, length, vocab] logits of every position and keeps them (and the float32
copies the loss makes) for the backward pass; `completion_loss` (proxytune/training/tuning.py) runs the output
layer only on positions that predict a completion token, 256 at a time, recomputed in the backward pass. Peak
resident memory is per process, so each variant runs in a fresh process, in alternating rounds; each reports
its peak RSS after loading the model and after the training steps, and the seconds per step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("transformers", "chunked")


def one(args) -> dict:
    """Train `args.steps` steps with one loss in this process; what it cost."""
    import torch

    from proxytune.datasets import gsm
    from proxytune.training.data import batches, collate, tokenize
    from proxytune.training.tuning import TuneConfig, build_model, completion_loss
    from proxytune.usage import peak_rss_gb

    torch.set_num_threads(args.threads)
    model, tokenizer = build_model(TuneConfig(model=args.model, data="", output=""), torch.device("cpu"))
    model.train()
    loaded = peak_rss_gb()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    rows = tokenize([e.row() for e in gsm.fit_examples(args.batch_size * args.steps, seed=1)], tokenizer, 320)
    losses, began = [], time.perf_counter()
    for examples in batches(rows, args.batch_size, seed=0, epoch=0):
        batch = collate(examples, tokenizer.pad_token_id)
        if args.variant == "transformers":
            loss = model(**batch).loss
        else:
            summed, count = completion_loss(model, batch, full=False)
            loss = summed / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    return {"variant": args.variant, "loaded_gb": round(loaded, 2), "peak_gb": round(peak_rss_gb(), 2),
            "seconds_per_step": round((time.perf_counter() - began) / args.steps, 2), "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one(args)))
        return 0
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        for name in VARIANTS:
            command = [sys.executable, __file__, "--variant", name, "--model", args.model, "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(output.strip().splitlines()[-1]))
        old, new = results["transformers"][-1], results["chunked"][-1]
        print(f"round {round_index + 1}: " + "; ".join(
            f"{r['variant']} peak {r['peak_gb']:.2f} GB (loaded {r['loaded_gb']:.2f}), {r['seconds_per_step']:.1f} "
            f"s/step, losses {r['losses']}" for r in (old, new))
              + f"; chunked/transformers: training memory above loading "
              f"{(new['peak_gb'] - new['loaded_gb']) / (old['peak_gb'] - old['loaded_gb']):.2f}x, "
              f"time {new['seconds_per_step'] / old['seconds_per_step']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
