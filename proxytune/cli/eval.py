"""`proxytune eval TASK`: base alone, expert alone and proxy-tuned (and a tuned anchor) on one task."""
from __future__ import annotations

import argparse

from ._evaluation import add_evaluation_options, add_roles_option, parse_roles, prepare, reuse, run_roles


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate base, expert and proxy-tuned on gsm, humaneval or mmlu",
                                   description="Evaluate base alone, expert alone, proxy-tuned (and --tuned) on a "
                                               "task; resumable per-example results in --output.")
    add_evaluation_options(parser)
    add_roles_option(parser)
    parser.add_argument("--alpha-schedule", metavar="POS:ALPHA,...", default=None,
                        help="the proxy's α changes by output position: '0:2,32:1' is α = 2 for the first 32 "
                             "tokens, then 1 (before the first position given: --alpha); a key that is not a number "
                             "is a text marker: '0:2,####:1' is α = 2 until the output contains '####', then 1; "
                             "part of the configuration")
    parser.add_argument("--reuse", metavar="EVAL_DIR",
                        help="another `eval` output with the same task and dtype: each role's results are copied, "
                             "not recomputed, when the models that role depends on are the same (the proxy's also "
                             "need the same α and α schedule), e.g. to try an α schedule or a new expert against "
                             "the same base")
    parser.add_argument("--by", action="append", default=[], metavar="KEY",
                        help="also break the results down by a property of the problems (gsm: steps, template): "
                             "every role's accuracy and the proxy's fixed/broken vs base and expert per group")
    parser.set_defaults(func=run)


def check_by(task, keys) -> None:
    from ..errors import ProxyTuneError

    example = task.examples(1)[0]
    known = sorted(k for k, v in example.data.items() if isinstance(v, (int, str)))
    for key in keys:
        if key not in known:
            raise ProxyTuneError(f"--by {key}: {task.name} problems can be grouped by {', '.join(known) or 'nothing'}")


def parse_schedule(text: str | None) -> tuple[tuple[int | str, float], ...]:
    """'0:2,32:1' -> ((0, 2.0), (32, 1.0)); '0:2,####:1' -> ((0, 2.0), ('####', 1.0)): a key that is a number is
    a position, any other a text marker; ordered and checked as ProxyTuner.request orders and checks them."""
    from ..errors import ProxyTuneError
    from ..engine.settings import check_alpha, order_schedule, schedule_from_text

    if text is None:
        return ()
    schedule = {}
    for part in text.split(","):
        key, _, alpha = part.rpartition(":")
        try:
            value = float(alpha)
        except ValueError:
            raise ProxyTuneError(f"--alpha-schedule takes POSITION:ALPHA (or MARKER:ALPHA) pairs, e.g. 0:2,32:1 or "
                                 f"0:2,####:1; got {part!r}") from None
        if not key:
            raise ProxyTuneError(f"--alpha-schedule: {part!r} names no position or marker before its ':'")
        schedule[key] = value
    return order_schedule(schedule_from_text(schedule), check_alpha)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import eval_roles, summarize
    from ..evaluation.report import summary_table
    from ..evaluation.transfer import breakdown, breakdown_table

    wanted = parse_roles(args.roles, bool(args.tuned))
    schedule = parse_schedule(args.alpha_schedule)
    task, store, specs = prepare(args, "eval", {"alpha": args.alpha,
                                                **({"alpha_schedule": [list(s) for s in schedule]} if schedule else {})})
    check_by(task, args.by)
    if args.reuse:
        reuse(store, args.reuse)
    roles = [r for r in eval_roles(args.alpha, bool(args.tuned), schedule) if wanted is None or r.name in wanted]
    run_roles(args, task, roles, store, specs, base_only=wanted is not None and wanted <= {"base", "tuned"})
    # The summary covers every role with results in the directory, including roles earlier runs computed.
    present = {record["role"] for record in store.records}
    summary = summarize(task, [r for r in eval_roles(args.alpha, bool(args.tuned), schedule) if r.name in present],
                        store.records, [ex.id for ex in task.examples(args.limit)])
    examples = task.examples(args.limit)
    summary["by"] = {key: breakdown(store.records, examples, key) for key in args.by}
    path = store.write_summary(summary)
    print(summary_table(summary))
    for key, rows in summary["by"].items():
        print(f"\nby {key}\n" + breakdown_table(rows, key))
    print(f"results: {store.results_path}\nsummary: {path}")
    return 0
