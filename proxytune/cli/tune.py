"""`proxytune tune --anti-expert M --data train.jsonl --output DIR`: fine-tune a small model into an expert.

The model tuned is the small untuned one, the future anti-expert: `--anti-expert` names it (a registered name,
a directory or a .gguf file); `--model TRIO` means what it means in every verb, a trio, and tunes its
anti-expert."""
from __future__ import annotations

import argparse
import json

from ..errors import ProxyTuneError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune", help="fine-tune a small model (LoRA by default) into an expert usable as --expert",
        description="Fine-tune on JSONL rows {\"prompt\", \"completion\"} or {\"messages\"}; the loss covers "
                    "completion tokens only. Writes a peft adapter directory (or, with --full, a model directory).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--anti-expert", "--anti_expert", dest="anti_expert",
                       help="the small untuned model to tune: registered name, directory or .gguf file")
    which.add_argument("--model", help="a trio (registered or added with `models add`): tune its anti-expert")
    parser.add_argument("--data", required=True, help="training data, JSON lines")
    parser.add_argument("--output", required=True, help="directory for the tuned expert")
    parser.add_argument("--heldout-data", help="held-out JSON lines (default: a fraction of --data)")
    parser.add_argument("--heldout-fraction", type=float, default=0.05)
    parser.add_argument("--full", action="store_true", help="tune all weights instead of a LoRA adapter")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=None,
                        help="peak learning rate (default 2e-4 LoRA, 1e-5 full)")
    parser.add_argument("--max-length", type=int, default=320, help="tokens per example (longer ones are cut)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="weights dtype (default: bfloat16 for LoRA on CPU, else float32)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (on a busy shared CPU, 1 can be several times faster than 2)")
    parser.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (0: none)")
    parser.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --output")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    parser.set_defaults(func=run)


def check_numbers(args: argparse.Namespace) -> None:
    for name in ("lora_r", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise ProxyTuneError(f"--{name.replace('_', '-')} must be at least 1")
    if args.epochs <= 0:
        raise ProxyTuneError("--epochs must be positive")
    if args.save_every < 0:
        raise ProxyTuneError("--save-every must be >= 0")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise ProxyTuneError("--learning-rate must be positive")


def model_to_tune(args: argparse.Namespace) -> str:
    if args.model is None:
        return args.anti_expert
    from ..models import registry
    from ..models.trio_config import read_config, user_trio

    trio = registry.resolve_trio(args.model)
    if trio is not None:
        return trio["anti_expert"]
    if user_trio(args.model) is not None:
        return read_config(user_trio(args.model)).specs["anti_expert"]
    raise ProxyTuneError(f"--model names a trio ({', '.join(registry.TRIOS)}, or one added with `proxytune models "
                         f"add`), and {args.model!r} is none; to tune one model give --anti-expert {args.model}")


def run(args: argparse.Namespace) -> int:
    from ..training.tuning import TuneConfig, tune

    check_numbers(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = TuneConfig(model=model_to_tune(args), data=args.data, output=args.output, heldout_data=args.heldout_data,
                        heldout_fraction=args.heldout_fraction, full=args.full, lora_r=args.lora_r,
                        lora_alpha=args.lora_alpha, epochs=args.epochs, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, max_length=args.max_length, seed=args.seed,
                        dtype=args.dtype, device=args.device, save_every=args.save_every, resume=args.resume,
                        overwrite=args.overwrite)
    summary = tune(config)
    shown = {k: summary[k] for k in ("steps", "heldout_loss_before", "heldout_loss_after", "train_tokens_per_second",
                                     "train_seconds_this_run")}
    print(json.dumps(shown))
    print(f"expert written to {args.output}: use it as --expert {args.output}")
    return 0
