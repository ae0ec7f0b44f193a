"""Which weight dtype trains a LoRA fastest on this machine? Alternating rounds, per-round ratios.

    python scripts/bench_tune.py --model qwen2.5-coder-0.5b-instruct --rounds 3 --steps 3 [--autocast]

Variants: fp32 weights; bf16 weights (LoRA matrices fp32); with --autocast, fp32 weights under bf16 autocast.
Each step is a full LoRA training step (forward, backward, AdamW) on a batch of GSM training examples.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from proxytune.datasets import gsm  # noqa: E402
from proxytune.training.data import batches, collate, tokenize  # noqa: E402
from proxytune.training.tuning import TuneConfig, build_model  # noqa: E402


def make_variant(model_spec: str, dtype: str):
    config = TuneConfig(model=model_spec, data="", output="", dtype=dtype)
    model, tokenizer = build_model(config, torch.device("cpu"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, tokenizer, optimizer


def timed_steps(model, optimizer, plan, pad_id, autocast: bool) -> tuple[float, int]:
    tokens, began = 0, time.perf_counter()
    for batch_examples in plan:
        batch = collate(batch_examples, pad_id)
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return time.perf_counter() - began, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--autocast", action="store_true", help="also time fp32 weights under bf16 autocast "
                        "(one more model in memory)")
    args = parser.parse_args()

    variants = {"fp32": ("float32", False), "bf16 weights": ("bfloat16", False)}
    if args.autocast:
        variants["fp32 + bf16 autocast"] = ("float32", True)
    loaded = {name: make_variant(args.model, dtype) for name, (dtype, _) in variants.items()}
    tokenizer = next(iter(loaded.values()))[1]
    examples = tokenize([e.row() for e in gsm.train_examples(args.batch_size * args.steps, seed=1)], tokenizer, 320)
    plan = batches(examples, args.batch_size, seed=0, epoch=0)
    for name, (model, _, optimizer) in loaded.items():  # warm-up: first-call allocations
        timed_steps(model, optimizer, plan[:1], tokenizer.pad_token_id, variants[name][1])
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, (model, _, optimizer) in loaded.items():
            seconds, tokens = timed_steps(model, optimizer, plan, tokenizer.pad_token_id, variants[name][1])
            rates[name].append(tokens / seconds)
        ratios = {name: rates[name][-1] / rates["fp32"][-1] for name in variants}
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {rates[n][-1]:.0f} tok/s ({ratios[n]:.2f}x fp32)"
                                                       for n in variants), flush=True)
    for name in variants:
        per_round = [rates[name][i] / rates["fp32"][i] for i in range(args.rounds)]
        print(f"{name:22s} median {statistics.median(rates[name]):6.0f} train tok/s, vs fp32 per round: "
              + ", ".join(f"{r:.2f}" for r in per_round))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
