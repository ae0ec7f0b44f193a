"""`proxytune eval TASK`: base alone, expert alone and proxy-tuned (and a tuned anchor) on one task."""
from __future__ import annotations

import argparse

from ._evaluation import add_evaluation_options, load_runner, prepare


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate base, expert and proxy-tuned on gsm, humaneval or mmlu",
                                   description="Evaluate base alone, expert alone, proxy-tuned (and --tuned) on a "
                                               "task; resumable per-example results in --output.")
    add_evaluation_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import eval_roles, evaluate
    from ..evaluation.report import summary_table

    task, store, specs = prepare(args, "eval", {"alpha": args.alpha})
    runner = load_runner(args, specs)
    summary = evaluate(runner, task, eval_roles(args.alpha, bool(args.tuned)), store, args.limit, args.batch_size,
                       progress=not args.no_progress)
    path = store.write_summary(summary)
    print(summary_table(summary))
    print(f"results: {store.results_path}\nsummary: {path}")
    return 0
