"""`proxytune analyze PROMPTS_OR_TASK --output DIR`: where and how much proxy-tuning changes the base model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ProxyTuneError
from ._models import add_model_options, load_tuner

GENERATION_TASKS = ("gsm", "humaneval")


def register(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help="token-level analysis: top-token changes, probability shifts, "
                                                   "plots and an HTML page",
                                   description="The paper's section 7 analyses on proxy-tuned greedy generations.")
    add_model_options(parser)
    parser.add_argument("source", metavar="PROMPTS_OR_TASK",
                        help=f"a task ({', '.join(GENERATION_TASKS)}), a file of prompts (.txt: one per line; "
                             f".jsonl: a 'prompt' field per line), or an `eval` output directory: its proxy "
                             f"answers are re-scored (one forward per model) with the models of its config")
    parser.add_argument("--output", required=True, help="directory for analysis.json, PNGs and tokens.html")
    parser.add_argument("--limit", type=int, default=20, help="how many task examples / prompts (default 20)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=5, help="top tokens per role shown on hover (default 5)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--math", action="store_true", help="also measure equation left- vs right-hand sides "
                                                            "(automatic for gsm)")
    parser.set_defaults(func=run)


def read_prompts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        from ..jsonlines import json_lines

        prompts = []
        for number, row in json_lines(path, "prompts file"):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ProxyTuneError(f"{path} line {number} has no string 'prompt' field")
            prompts.append(row["prompt"])
    else:
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ProxyTuneError(f"{path} holds no prompts")
    return prompts


def prompts_of(source: str, limit: int) -> tuple[list[str], list[str], tuple, bool]:
    """(prompts, labels, stop strings, math?) from a task name or a prompts file."""
    if source in GENERATION_TASKS:
        from ..evaluation import get_task

        task = get_task(source)
        examples = task.examples(limit)
        return [e.prompt for e in examples], [e.id for e in examples], task.stop, source == "gsm"
    path = Path(source)
    if not path.is_file():
        raise ProxyTuneError(f"{source!r} is neither a task ({', '.join(GENERATION_TASKS)}) nor a prompts file")
    prompts = read_prompts(path)[:limit]
    return prompts, [f"{path.name}:{i + 1}" for i in range(len(prompts))], (), False


def eval_records(directory: Path, limit: int) -> tuple[dict, list[dict]]:
    config = json.loads((directory / "config.json").read_text())
    if config.get("command") != "eval":
        raise ProxyTuneError(f"{directory} is not the output of `proxytune eval`")
    from ..evaluation.records import read_records

    records = read_records(directory)
    proxy = [r for r in records if r["role"] == "proxy" and "token_ids" in r][:limit]
    if not proxy:
        raise ProxyTuneError(f"{directory} has no proxy-tuned results with token ids to analyse")
    return config, proxy


def run_from_eval(args: argparse.Namespace, directory: Path) -> dict:
    from ..evaluation.analysis import write_analysis
    from ..evaluation.analysis.traces import rescored_trace
    from ..facade.tuner import ProxyTuner
    from ..models.placement import parse_place
    from ..models.specs import adapter_digest

    if args.model or args.base or args.expert or args.anti_expert:
        raise ProxyTuneError("with an eval directory the models come from its config.json; drop the model options")
    config, records = eval_records(directory, args.limit)
    models = config["models"]
    for role, digest in config.get("adapters", {}).items():  # the weights that wrote the answers, not only the name
        now = adapter_digest(models[role]) if role in models else digest
        if now != digest:
            state = "is not on this machine" if now is None else f"holds other weights now (adapter digest {now})"
            raise ProxyTuneError(f"{directory}'s {role} {models[role]!r} {state}; its answers were written by the "
                                 f"adapter with digest {digest}")
    dtype = config.get("dtype")
    if dtype == "default":  # written before the default became each checkpoint's own dtype
        import torch
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    tuner = ProxyTuner.from_pretrained(models["base"], models["expert"], models["anti_expert"], alpha=config["alpha"],
                                       device=args.device, dtype=dtype, backend=config.get("backend"),
                                       prune=config.get("prune", 1e-5), placement=parse_place(config.get("place")))
    from tqdm import tqdm

    traces = [rescored_trace(tuner, r["prompt"], r["token_ids"], config["alpha"], args.top_k, r["id"])
              for r in tqdm(records, desc=f"analyze: rescoring {directory.name}'s proxy answers", unit="answer")]
    return write_analysis(traces, args.output, config["task"] == "gsm" or args.math, config["alpha"])


def run(args: argparse.Namespace) -> int:
    from ..evaluation.analysis import run_analysis

    for name in ("limit", "max_new_tokens", "top_k", "batch_size"):
        if getattr(args, name) < 1:
            raise ProxyTuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    directory = Path(args.source)
    if directory.is_dir() and (directory / "config.json").exists():
        result = run_from_eval(args, directory)
        print("\n".join(result["summary"]))
        for name, path in result["files"].items():
            print(f"{name}: {path}")
        return 0
    prompts, labels, stop, math = prompts_of(args.source, args.limit)
    tuner = load_tuner(args)
    result = run_analysis(tuner, prompts, args.output, labels, math or args.math, args.max_new_tokens, stop,
                          args.top_k, batch_size=args.batch_size)
    print("\n".join(result["summary"]))
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0
