"""Choose the demo expert's training recipe on VALIDATION templates, never on the held-out ones.

Every candidate (learning rate × LoRA rank × epochs) trains the 0.5B on the same FIT examples
(`scripts/train_demo_expert.py --split fit`, resumable: a killed search goes on where it stopped, each run from its
last checkpoint) and is scored on the VALIDATION templates: by its accuracy there, greedy, as an expert alone
(`proxytune eval gsm --split validation --roles expert`), ties broken by its loss on their reference solutions. Loss
alone misleads here: a model that memorised the FIT templates' wording is surer and wronger about another
template's wording while it may still solve the problem. The shipped expert trained on 320 examples of every
TRAIN template, the validation ones included, so its own validation numbers are not comparable; its recipe
retrained on FIT templates (320 examples) is the baseline candidate, the one a new recipe has to beat. The table
goes to results/recipe/ (summary.json and README.md).

    python scripts/choose_demo_recipe.py                                  # lr 3e-5 / 1e-4 / 3e-4, 1,500 examples
    python scripts/choose_demo_recipe.py --learning-rates 3e-4 --ranks 16 --epochs 1 2
    python scripts/choose_demo_recipe.py --report                          # only the table of what has finished

The winner's adapter (in ~/.cache/proxytune/recipes/) becomes the demo expert only if it is a new recipe on at
least 1,500 examples that beats the baseline on validation: copy it with --ship. The anchor is then trained with the same recipe:
`python scripts/train_demo_expert.py --anchor --split fit --train-examples N --learning-rate LR --rank R --epochs E`.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proxytune.datasets import gsm  # noqa: E402
from proxytune.evaluation.stats import paired  # noqa: E402
from proxytune.models.registry import ADAPTERS  # noqa: E402
from proxytune.models.specs import adapter_digest  # noqa: E402

RUNS = Path.home() / ".cache" / "proxytune" / "recipes"
RESULTS = ROOT / "results" / "recipe"
MODEL = "qwen2.5-coder-0.5b-instruct"
SHIPPED = "gsm-qwen2.5-coder-0.5b"


def run_name(lr: float, rank: int, epochs: float, examples: int) -> str:
    return f"n{examples}-lr{lr:g}-r{rank}-e{epochs:g}"


def train(directory: Path, examples: int, lr: float, rank: int, epochs: float, args) -> None:
    """One candidate, resumed from its checkpoint when a previous search was stopped."""
    command = [sys.executable, str(ROOT / "scripts" / "train_demo_expert.py"), "--split", "fit",
               "--train-examples", str(examples), "--validation-examples", str(args.validation_examples),
               "--learning-rate", str(lr), "--rank", str(rank), "--epochs", str(epochs), "--output", str(directory),
               "--card", "expert", "--threads", str(args.threads)]
    if (directory / "checkpoint").exists() or (directory / "checkpoint.old").exists():
        command.append("--resume")
    print("+", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def validation_accuracy(adapter: Path, output: Path, name: str, args) -> dict:
    """The adapter as an expert alone on the validation templates, greedy (resumable like any eval)."""
    command = [sys.executable, "-m", "proxytune", "eval", "gsm", "--split", "validation",
               "--limit", str(args.validation_examples), "--roles", "expert", "--base", MODEL, "--anti-expert", MODEL,
               "--expert", str(adapter), "--dtype", "bfloat16", "--max-new-tokens", str(args.max_new_tokens),
               "--batch-size", "32", "--threads", str(args.threads), "--output", str(output), "--no-progress"]
    if not (output / "summary.json").exists() or json.loads((output / "summary.json").read_text())["examples"] \
            < args.validation_examples:
        print("+", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    # every answer beside the table, as results/ keeps an evaluation's records
    records = RESULTS / "validation" / f"{name}.jsonl.gz"
    records.parent.mkdir(parents=True, exist_ok=True)
    records.write_bytes(gzip.compress((output / "results.jsonl").read_bytes(), mtime=0))
    expert = json.loads((output / "summary.json").read_text())["roles"]["expert"]
    return {key: expert[key] for key in ("n", "correct", "accuracy", "format_rate")}


def shipped_validation_loss(args) -> float:
    """The shipped expert's loss on the same validation examples the candidates are scored on."""
    import torch
    from peft import PeftModel

    from proxytune.models.loading import load_plain
    from proxytune.training.data import tokenize
    from proxytune.training.tuning import heldout_loss

    torch.set_num_threads(args.threads)
    model, tokenizer = load_plain(MODEL, torch.device("cpu"), torch.bfloat16)
    model = PeftModel.from_pretrained(model, str(ADAPTERS[SHIPPED])).eval()
    rows = tokenize([e.row() for e in gsm.validation_examples(args.validation_examples, seed=0)], tokenizer, 320)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return heldout_loss(model, rows, pad, 4)


def validation_answers(name: str) -> dict[str, bool]:
    """A candidate's validation answers as results/recipe keeps them: example id -> right."""
    lines = gzip.decompress((RESULTS / "validation" / f"{name}.jsonl.gz").read_bytes()).splitlines()
    return {record["id"]: bool(record["correct"]) for record in map(json.loads, lines)}


def recorded(args) -> dict:
    """What an earlier search wrote to results/ (the run directories in ~/.cache do not travel; results/ does),
    if it was scored the same way."""
    summary = RESULTS / "summary.json"
    if not summary.exists():
        return {}
    out = json.loads(summary.read_text())
    same = (out.get("validation_examples"), out.get("max_new_tokens")) == (args.validation_examples,
                                                                          args.max_new_tokens)
    return out if same else {}


def report(args, candidates) -> dict:
    # a finished candidate's row stays in the table on a machine without its run directory, and so do the shipped
    # expert's numbers while it is the same adapter
    earlier = recorded(args)
    finished = {row["directory"]: row for row in earlier.get("candidates", [])}
    rows = []
    for examples, lr, rank, epochs in candidates:
        summary_file = RUNS / run_name(lr, rank, epochs, examples) / "tune_summary.json"
        if not summary_file.exists():
            if summary_file.parent.name in finished:
                rows.append(finished[summary_file.parent.name])
            continue
        summary = json.loads(summary_file.read_text())
        validation = validation_accuracy(summary_file.parent, summary_file.parent / "validation-eval",
                                         summary_file.parent.name, args)
        rows.append({"learning_rate": lr, "rank": rank, "epochs": epochs, "train_examples": summary["train_examples"],
                     "validation_accuracy": validation["accuracy"], "validation_correct": validation["correct"],
                     "validation_format_rate": validation["format_rate"],
                     "validation_loss": summary["losses"]["validation"]["after"],
                     "validation_loss_before": summary["losses"]["validation"]["before"],
                     "heldout_loss": summary["heldout_loss_after"], "steps": summary["steps"],
                     "train_seconds": summary.get("train_seconds"), "peak_rss_gb": summary.get("peak_rss_gb"),
                     "directory": summary_file.parent.name})
    rows.sort(key=lambda row: (-row["validation_accuracy"], row["validation_loss"]))
    digest = adapter_digest(str(ADAPTERS[SHIPPED]))  # as an eval's config records it
    if earlier.get("shipped", {}).get("digest") == digest:
        shipped = earlier["shipped"]
    else:
        accuracy = validation_accuracy(ADAPTERS[SHIPPED], RUNS / "shipped-validation-eval", "shipped", args)
        shipped = {"adapter": SHIPPED, "digest": digest, "train_examples": 320,
                   "label": "shipped expert (3e-4, r 16, 1 epoch; trained on the validation templates too: "
                            "not comparable)",
                   "validation_loss": shipped_validation_loss(args), "validation_accuracy": accuracy["accuracy"],
                   "validation_correct": accuracy["correct"]}
    baseline = next((row for row in rows if row["train_examples"] == 320), None)
    if baseline is not None:  # each candidate against the baseline on the same validation problems
        reference = validation_answers(baseline["directory"])
        for row in rows:
            if row is not baseline:
                mine = validation_answers(row["directory"])
                row["vs_baseline"] = paired([mine[i] for i in reference], list(reference.values()))
    best = rows[0] if rows else None
    better = (best is not None and best is not baseline and best["train_examples"] >= 1500 and baseline is not None
              and (best["validation_accuracy"], -best["validation_loss"])
              > (baseline["validation_accuracy"], -baseline["validation_loss"]))
    out = {"model": MODEL, "fit_templates": list(gsm.FIT_TEMPLATES), "validation_templates": list(gsm.VALIDATION_TEMPLATES),
           "validation_examples": args.validation_examples,
           "max_new_tokens": args.max_new_tokens, "candidates": rows,
           "shipped": shipped,
           "baseline": baseline, "best": best, "best_beats_baseline": better}
    if "previous_shipped" in earlier:
        out["previous_shipped"] = earlier["previous_shipped"]
    write_table(args, out)
    return out


def write_table(args, out: dict) -> None:
    rows, shipped, best = out["candidates"], out["shipped"], out["best"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = ["# The demo expert's recipe, chosen on validation templates", "",
             f"Written by `python scripts/choose_demo_recipe.py`. Each candidate trains {MODEL} on FIT templates "
             f"({len(gsm.FIT_TEMPLATES)} of the 68 TRAIN ones) and is scored on {args.validation_examples} examples of "
             f"the {len(gsm.VALIDATION_TEMPLATES)} VALIDATION templates: accuracy as an expert alone (greedy, "
             f"{args.max_new_tokens} new tokens, the `####` answer) decides, loss on the reference solutions breaks ties; "
             "held-out templates are only reported, never used to choose. The 320-example row is the shipped "
             "expert's recipe on FIT templates, the baseline a new recipe has to beat.", "",
             "| learning rate | rank | epochs | examples | validation accuracy | vs baseline (fixed / broken, "
             "McNemar p) | validation loss | held-out loss | training time | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        versus = row.get("vs_baseline")
        versus = f"+{versus['fixed']} / −{versus['broken']}, p {versus['mcnemar_p']:.2g}" if versus else "—"
        lines.append(f"| {row['learning_rate']:g} | {row['rank']} | {row['epochs']:g} | {row['train_examples']} | "
                     f"{row['validation_accuracy']:.1%} ({row['validation_correct']}) | {versus} | "
                     f"{row['validation_loss']:.4f} | {row['heldout_loss']:.4f} | "
                     f"{(row['train_seconds'] or 0) / 60:.0f} min | {row['peak_rss_gb'] or 0:.1f} GB |")
    for entry in (out.get("previous_shipped"), shipped):
        if entry is None:
            continue
        lines.append(f"| {entry['label']} | | | {entry['train_examples']} | {entry['validation_accuracy']:.1%} "
                     f"({entry['validation_correct']}) | | {entry['validation_loss']:.4f} | | | |")
    lines += ["", f"Best: {best['directory'] if best else 'none'}; "
              + ("it beats the baseline on validation and ships (`--ship`)." if out["best_beats_baseline"] else
                 "the shipped expert stays (no candidate on >= 1,500 examples beats the baseline on validation).")]
    (RESULTS / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 3e-4 (the shipped rate) at 1,500 examples memorised the FIT templates (results/recipe): gentler rates next
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--epochs", type=float, nargs="+", default=[1.0])
    parser.add_argument("--train-examples", type=int, default=1500)
    parser.add_argument("--validation-examples", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=384, help="budget of the validation evaluation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the shipped expert's own recipe (320 examples) retrained on FIT templates")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: evaluate (on validation) and table the finished candidates")
    parser.add_argument("--ship", action="store_true",
                        help="copy the best candidate over the shipped expert, if it beats the baseline on validation")
    args = parser.parse_args()
    if args.train_examples < 1500:
        print(f"note: {args.train_examples} training examples (issue 19 asks for at least 1,500)", file=sys.stderr)
    # the shipped expert's own recipe (320 examples) on FIT templates: the honest baseline, since the shipped
    # expert itself trained on the validation templates
    candidates = [(320, 3e-4, 16, 1.0)] if args.baseline else []
    candidates += [(args.train_examples, lr, rank, epochs)
                   for lr in args.learning_rates for rank in args.ranks for epochs in args.epochs]
    finished = {row["directory"] for row in recorded(args).get("candidates", [])}
    if not args.report:
        for examples, lr, rank, epochs in candidates:
            directory = RUNS / run_name(lr, rank, epochs, examples)
            done = (directory / "tune_summary.json").exists() or directory.name in finished
            if not done:
                train(directory, examples, lr, rank, epochs, args)
    out = report(args, candidates)
    if args.ship:
        if not out["best_beats_baseline"]:
            print("no candidate on >= 1,500 examples beats the baseline on validation: nothing copied", file=sys.stderr)
            return 1
        target, best = ADAPTERS[SHIPPED], RUNS / out["best"]["directory"]
        for name in ("adapter_model.safetensors", "adapter_config.json", "tune_summary.json"):
            shutil.copy(best / name, target / name)
        # its card's command, as it would be typed to write the shipped directory itself
        card = (best / "README.md").read_text()
        card = card.replace(f" --output ~/.cache/proxytune/recipes/{best.name}", "").replace(" --card expert", "")
        (target / "README.md").write_text(card)
        print(f"copied {out['best']['directory']} to {target}", file=sys.stderr)
        if out["shipped"]["digest"] != adapter_digest(str(target)):  # the table says which adapter ships now
            out["previous_shipped"] = out["shipped"]
            out["shipped"] = {"adapter": SHIPPED, "digest": adapter_digest(str(target)),
                              "train_examples": out["best"]["train_examples"],
                              "label": f"shipped expert now: {out['best']['directory']}",
                              **{key: out["best"][key] for key in ("validation_loss", "validation_accuracy",
                                                                    "validation_correct")}}
            write_table(args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
