"""Recreate the shipped demo expert: a LoRA of Qwen2.5-Coder-0.5B-Instruct tuned on GSM-style math.

    python scripts/train_demo_expert.py            # writes proxytune/adapters/gsm-qwen2.5-coder-0.5b/
    python scripts/train_demo_expert.py --anchor   # the same tuning on the 1.5B base: the upper anchor for
                                                   # "gap closed", in ~/.cache/proxytune/adapters/ (37 MB, not shipped)

Data: reasoning-gym gsm_symbolic, TRAIN templates only (proxytune.datasets.gsm), the paper's zero-shot
prompt, chain of thought ending in "#### <answer>"; held-out loss is measured on HELD-OUT templates.
Everything is seeded; CPU float arithmetic makes the result bit-for-bit-ish, not bit-exact.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
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

Recreate it from a clean checkout: `python scripts/train_demo_expert.py` (≈ {minutes:.0f} min on the
2-core CPU it was trained on).
""",
    "cross-family": """# {name} — an expert of another family, for byte-level proxy-tuning

A LoRA adapter on **Gemma-3-270M**, a real *untuned* base model (the registered model `{model}`, vocabulary
of 262,144 tokens), tuned exactly like the demo expert (same data, same hyperparameters). It is the
expert of the `gemma` trio: base = Qwen2.5-Coder-1.5B-Instruct (another vocabulary), anti-expert =
Gemma-3-270M without this adapter; the roles are combined byte by byte (docs/byte-level.md).

Recreate it from a clean checkout: `python scripts/train_demo_expert.py --model gemma-3-270m --card cross-family
--output proxytune/adapters/gsm-gemma-3-270m` (≈ {minutes:.0f} min on the 2-core CPU it was trained on).
""",
    "anchor": """# {name} — the upper anchor of the demo trio

A LoRA adapter on **the demo's base model** (the registered model `{model}`), tuned exactly like the
demo expert (same data, same hyperparameters). It is what proxy-tuning imitates: `proxytune eval gsm
--model demo --tuned THIS_DIRECTORY` reports gap closed = (proxy − base) / (tuned − base).

Recreate it from a clean checkout: `python scripts/train_demo_expert.py --anchor` (≈ {minutes:.0f} min on the
2-core CPU it was trained on).
""",
}

CARD = """{header}
## Data
- reasoning-gym {rg_version} `gsm_symbolic`, **train templates only**: {n_train_templates} of its 85 usable
  templates (`proxytune.datasets.gsm.TRAIN_TEMPLATES`); the other {n_heldout_templates} are held out for evaluation.
- {n_train} training examples (`gsm.train_examples({n_train}, seed={seed})`), prompt
  `Answer the following question.\\n\\nQuestion: ...\\nAnswer:`, completion `" " + chain of thought + "\\n#### <n>"` + EOS,
  loss on completion tokens only.
- Held-out loss: {n_heldout} examples from the held-out templates (`gsm.heldout_examples({n_heldout}, seed={seed})`).

## Hyperparameters
LoRA r={lora_r}, alpha={lora_alpha}, dropout 0, all linear layers; AdamW, peak learning rate {lr}, 5% linear warm-up then
cosine to 10%; batch {batch_size}; {epochs} epoch(s) = {steps} steps; max length {max_length} tokens; seed {seed};
base weights {dtype}, adapter weights trained in fp32 and shipped in bf16.

## Result
| | held-out loss (nats per completion token) |
|---|---|
| before tuning (the plain `{model}`) | {before:.4f} |
| after tuning | {after:.4f} |

Training took {seconds:.0f} s ({tokens_per_second:.0f} training tokens/s, {threads} torch thread(s)) on {machine}, torch {torch_version},
transformers {transformers_version}, peft {peft_version}.
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
    parser.add_argument("--train-examples", type=int, default=320)
    parser.add_argument("--heldout-examples", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared, "
                        "busy CPU one thread trained 5x faster than two, see docs/demo.md)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--card", choices=sorted(ROLES), default=None,
                        help="which model card to write (default: anchor with --anchor, else expert)")
    args = parser.parse_args()
    args.model = args.model or ("qwen2.5-coder-1.5b-instruct" if args.anchor else "qwen2.5-coder-0.5b-instruct")
    args.output = args.output or str(ANCHOR if args.anchor else ADAPTERS["gsm-qwen2.5-coder-0.5b"])

    import peft
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(tempfile.mkdtemp(prefix="gsm-demo-data-"))
    train = write_jsonl(data / "train.jsonl", gsm.train_examples(args.train_examples, seed=args.seed))
    heldout = write_jsonl(data / "heldout.jsonl", gsm.heldout_examples(args.heldout_examples, seed=args.seed))
    config = TuneConfig(model=args.model, data=str(train), output=args.output, heldout_data=str(heldout),
                        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                        max_length=args.max_length, seed=args.seed, dtype="bfloat16", save_every=20,
                        overwrite=not args.resume, resume=args.resume)
    began = time.perf_counter()
    summary = tune(config)
    store_in_bf16(Path(args.output))
    card = CARD.format(
        header=ROLES[args.card or ("anchor" if args.anchor else "expert")].format(
            name=Path(args.output).name, model=args.model, minutes=(time.perf_counter() - began) / 60),
        model=args.model, minutes=(time.perf_counter() - began) / 60, rg_version=importlib.metadata.version("reasoning-gym"),
        n_train_templates=len(gsm.TRAIN_TEMPLATES), n_heldout_templates=len(gsm.HELDOUT_TEMPLATES),
        n_train=args.train_examples, n_heldout=args.heldout_examples, seed=args.seed, lora_r=config.lora_r,
        lora_alpha=config.lora_alpha, lr=args.learning_rate, batch_size=args.batch_size, epochs=args.epochs,
        steps=summary["steps"], max_length=args.max_length, dtype=summary["dtype"],
        before=summary["heldout_loss_before"], after=summary["heldout_loss_after"],
        seconds=summary["train_seconds_this_run"], tokens_per_second=summary["train_tokens_per_second"],
        machine=f"{platform.machine()} × {os.cpu_count()} CPUs", threads=torch.get_num_threads(), torch_version=torch.__version__,
        transformers_version=transformers.__version__, peft_version=peft.__version__)
    (Path(args.output) / "README.md").write_text(card)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
