"""Recreate the shipped demo expert: a LoRA of Qwen2.5-Coder-0.5B-Instruct tuned on GSM-style math.

    python scripts/train_demo_expert.py            # writes proxytune/adapters/gsm-qwen2.5-coder-0.5b/
    python scripts/train_demo_expert.py --anchor   # the same tuning on the 1.5B base: the upper anchor for
                                                   # "gap closed", in ~/.cache/proxytune/adapters/ (37 MB, not shipped)

Data: reasoning-gym gsm_symbolic, TRAIN templates only (proxytune.datasets.gsm), the paper's zero-shot
prompt, chain of thought ending in "#### <answer>"; held-out loss is measured on HELD-OUT templates.
With `--split fit` the model trains on the FIT templates only and its loss on the VALIDATION templates
(the rest of TRAIN) is reported too: that is how scripts/choose_demo_recipe.py compares recipes.
Everything is seeded; CPU float arithmetic makes the result bit-for-bit-ish, not bit-exact. A killed run
continues from its last checkpoint with --resume (the reported time and memory cover every run).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proxytune.datasets import gsm  # noqa: E402
from proxytune.models.registry import ADAPTERS  # noqa: E402
from proxytune.training.tuning import TuneConfig, tune  # noqa: E402

ANCHOR = Path.home() / ".cache" / "proxytune" / "adapters" / "gsm-qwen2.5-coder-1.5b-anchor"

ROLES = {
    "expert": """# gsm-qwen2.5-coder-0.5b — the demo expert

A LoRA adapter on **Qwen2.5-Coder-0.5B-Instruct** (the registered model `{model}`), tuned by
`proxytune tune` on GSM-style grade-school math so that it answers with a short chain of thought ending
in `#### <answer>`. It is the *expert* of the `demo` trio: base = Qwen2.5-Coder-1.5B-Instruct,
anti-expert = the same 0.5B without this adapter (the paper's task-finetuning setting).

Recreate it from a clean checkout: `{command}` (≈ {minutes:.0f} min on the
2-core CPU it was trained on).
""",
    "cross-family": """# {name} — an expert of another family, for byte-level proxy-tuning

A LoRA adapter on **Gemma-3-270M**, a real *untuned* base model (the registered model `{model}`, vocabulary
of 262,144 tokens), tuned exactly like the demo expert (same data, same hyperparameters). It is the
expert of the `gemma` trio: base = Qwen2.5-Coder-1.5B-Instruct (another vocabulary), anti-expert =
Gemma-3-270M without this adapter; the roles are combined byte by byte (docs/byte-level.md).

Recreate it from a clean checkout: `{command}` (≈ {minutes:.0f} min on the 2-core CPU it was trained on).
""",
    "anchor": """# {name} — the upper anchor of the demo trio

A LoRA adapter on **the demo's base model** (the registered model `{model}`), tuned exactly like the
demo expert (same data, same hyperparameters). It is what proxy-tuning imitates: `proxytune eval gsm
--model demo --tuned THIS_DIRECTORY` reports gap closed = (proxy − base) / (tuned − base).

Recreate it from a clean checkout: `{command}` (≈ {minutes:.0f} min on the
2-core CPU it was trained on).
""",
}

CARD = """{header}
## Data
- reasoning-gym {rg_version} `gsm_symbolic`, **{split_name} templates only**: {n_train_templates} of its 85 usable
  templates (`proxytune.datasets.gsm.{split_constant}`); the {n_heldout_templates} held-out templates are never trained on.
- {n_train} training examples (`gsm.{split_function}({n_train}, seed={seed})`), prompt
  `Answer the following question.\\n\\nQuestion: ...\\nAnswer:`, completion `" " + chain of thought + "\\n#### <n>"` + EOS,
  loss on completion tokens only.
- Held-out loss: {n_heldout} examples from the held-out templates (`gsm.heldout_examples({n_heldout}, seed={seed})`).{validation_line}

## Hyperparameters
LoRA r={lora_r}, alpha={lora_alpha}, dropout 0, all linear layers; AdamW, peak learning rate {lr}, 5% linear warm-up then
cosine to 10%; batch {batch_size}; {epochs} epoch(s) = {steps} steps; max length {max_length} tokens; seed {seed};
base weights {dtype}, adapter weights trained in fp32 and shipped in bf16.

## Result
| | held-out loss (nats per completion token) |{validation_header}
|---|---|{validation_rule}
| before tuning (the plain `{model}`) | {before:.4f} |{validation_before}
| after tuning | {after:.4f} |{validation_after}

Training took {seconds:.0f} s (last run: {tokens_per_second:.0f} training tokens/s, {threads} torch thread(s)), peak RSS
{peak_rss_gb:.1f} GB, on {machine}, torch {torch_version}, transformers {transformers_version}, peft {peft_version}.
"""


def write_jsonl(path: Path, examples) -> Path:
    path.write_text("".join(json.dumps(example.row()) + "\n" for example in examples))
    return path


def store_in_bf16(adapter: Path) -> None:
    """Ship the adapter matrices in bf16 (the demo runs in bf16): half of fp32's 35 MB in git."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    tensors = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchor", action="store_true",
                        help="tune the demo's 1.5B base instead (the upper anchor for gap closed); default output "
                             f"{ANCHOR}")
    parser.add_argument("--output", default=None, help="default: the shipped expert's directory (or, with "
                                                       "--anchor, the anchor's)")
    parser.add_argument("--model", default=None, help="default: qwen2.5-coder-0.5b-instruct (--anchor: "
                                                      "qwen2.5-coder-1.5b-instruct)")
    parser.add_argument("--split", choices=["train", "fit"], default="train",
                        help="train: every TRAIN template; fit: all but the VALIDATION ones, whose loss is then "
                             "reported too (how recipes are compared)")
    parser.add_argument("--train-examples", type=int, default=320)
    parser.add_argument("--heldout-examples", type=int, default=32)
    parser.add_argument("--validation-examples", type=int, default=96, help="with --split fit")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (its alpha is twice the rank)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared, "
                        "busy CPU one thread trained 5x faster than two, see docs/demo.md)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--card", choices=sorted(ROLES) + ["none"], default=None,
                        help="which model card to write (default: anchor with --anchor, else expert)")
    args = parser.parse_args()
    args.model = args.model or ("qwen2.5-coder-1.5b-instruct" if args.anchor else "qwen2.5-coder-0.5b-instruct")
    args.output = args.output or str(ANCHOR if args.anchor else ADAPTERS["gsm-qwen2.5-coder-0.5b"])

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(tempfile.mkdtemp(prefix="gsm-demo-data-"))
    examples = gsm.SPLITS[args.split]
    train = write_jsonl(data / "train.jsonl", examples(args.train_examples, seed=args.seed))
    heldout = write_jsonl(data / "heldout.jsonl", gsm.heldout_examples(args.heldout_examples, seed=args.seed))
    loss_sets = {}
    if args.split == "fit":
        loss_sets["validation"] = str(write_jsonl(data / "validation.jsonl",
                                                  gsm.validation_examples(args.validation_examples, seed=args.seed)))
    config = TuneConfig(model=args.model, data=str(train), output=args.output, heldout_data=str(heldout),
                        loss_sets=loss_sets, lora_r=args.rank, lora_alpha=2 * args.rank,
                        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                        max_length=args.max_length, seed=args.seed, dtype="bfloat16", save_every=20,
                        overwrite=not args.resume, resume=args.resume)
    summary = tune(config)
    store_in_bf16(Path(args.output))
    role = args.card or ("anchor" if args.anchor else "expert")
    if role != "none":
        (Path(args.output) / "README.md").write_text(card(args, config, summary, role))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    return 0


def card(args, config: TuneConfig, summary: dict, role: str) -> str:
    import peft
    import torch
    import transformers

    minutes = summary["train_seconds"] / 60
    words, skip = ["python", "scripts/train_demo_expert.py"], False
    for word in sys.argv[1:]:  # this run's command, without what only concerns this machine
        if skip or word == "--resume":
            skip = False
            continue
        if word == "--threads":
            skip = True
            continue
        path = Path(word).expanduser()
        if path.is_absolute() and path.is_relative_to(ROOT):
            word = str(path.relative_to(ROOT))
        elif path.is_absolute() and path.is_relative_to(Path.home()):
            word = "~/" + str(path.relative_to(Path.home()))
        words.append(word)
    validation = summary["losses"].get("validation")
    templates = gsm.FIT_TEMPLATES if args.split == "fit" else gsm.TRAIN_TEMPLATES
    return CARD.format(
        header=ROLES[role].format(name=Path(args.output).name, model=args.model, minutes=minutes,
                                  command=" ".join(words)),
        model=args.model, rg_version=importlib.metadata.version("reasoning-gym"),
        split_name=args.split.upper(), split_constant=f"{args.split.upper()}_TEMPLATES",
        split_function=f"{args.split}_examples", n_train_templates=len(templates),
        n_heldout_templates=len(gsm.HELDOUT_TEMPLATES),
        validation_line="" if validation is None else (
            f"\n- Validation loss (where the recipe was chosen): {args.validation_examples} examples from the "
            f"{len(gsm.VALIDATION_TEMPLATES)} VALIDATION templates (`gsm.validation_examples({args.validation_examples}, "
            f"seed={args.seed})`), never trained on."),
        validation_header="" if validation is None else " validation loss |",
        validation_rule="" if validation is None else "---|",
        validation_before="" if validation is None else f" {validation['before']:.4f} |",
        validation_after="" if validation is None else f" {validation['after']:.4f} |",
        n_train=args.train_examples, n_heldout=args.heldout_examples, seed=args.seed, lora_r=config.lora_r,
        lora_alpha=config.lora_alpha, lr=args.learning_rate, batch_size=args.batch_size, epochs=args.epochs,
        steps=summary["steps"], max_length=args.max_length, dtype=summary["dtype"],
        before=summary["heldout_loss_before"], after=summary["heldout_loss_after"],
        seconds=summary["train_seconds"], tokens_per_second=summary["train_tokens_per_second"] or 0,
        peak_rss_gb=summary["peak_rss_gb"], machine=f"{platform.machine()} × {os.cpu_count()} CPUs",
        threads=torch.get_num_threads(), torch_version=torch.__version__,
        transformers_version=transformers.__version__, peft_version=peft.__version__)


if __name__ == "__main__":
    raise SystemExit(main())
