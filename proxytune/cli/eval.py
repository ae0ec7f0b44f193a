"""`proxytune eval TASK`: base alone, expert alone and proxy-tuned (and a tuned anchor) on one task."""
from __future__ import annotations

import argparse

from ._evaluation import add_evaluation_options, add_roles_option, load_runner, parse_roles, prepare


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate base, expert and proxy-tuned on gsm, humaneval or mmlu",
                                   description="Evaluate base alone, expert alone, proxy-tuned (and --tuned) on a "
                                               "task; resumable per-example results in --output.")
    add_evaluation_options(parser)
    add_roles_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import eval_roles, evaluate, summarize
    from ..evaluation.report import summary_table

    wanted = parse_roles(args.roles, bool(args.tuned))
    task, store, specs = prepare(args, "eval", {"alpha": args.alpha})
    roles = [r for r in eval_roles(args.alpha, bool(args.tuned)) if wanted is None or r.name in wanted]
    runner = load_runner(args, specs, base_only=wanted is not None and wanted <= {"base", "tuned"})
    evaluate(runner, task, roles, store, args.limit, args.batch_size, progress=not args.no_progress)
    # The summary covers every role with results in the directory, including roles earlier runs computed.
    present = {record["role"] for record in store.records}
    summary = summarize(task, [r for r in eval_roles(args.alpha, bool(args.tuned)) if r.name in present],
                        store.records, [ex.id for ex in task.examples(args.limit)])
    path = store.write_summary(summary)
    print(summary_table(summary))
    print(f"results: {store.results_path}\nsummary: {path}")
    return 0
