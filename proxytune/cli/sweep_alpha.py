"""`proxytune sweep-alpha TASK --alphas 0,0.5,1,...`: accuracy against α, as a table and a PNG plot."""
from __future__ import annotations

import argparse
import math

from ..errors import ProxyTuneError
from ._evaluation import add_evaluation_options, prepare, reuse, run_roles


def register(subparsers) -> None:
    parser = subparsers.add_parser("sweep-alpha", help="accuracy of proxy-tuning against alpha (table + PNG)",
                                   description="Run a task at several alphas (base and expert alone once); "
                                               "resumable, and more alphas can be added to the same --output.")
    add_evaluation_options(parser)
    parser.add_argument("--alphas", default="0,0.25,0.5,1,1.5,2", help="comma-separated (default 0,0.25,0.5,1,1.5,2)")
    parser.add_argument("--reuse", metavar="EVAL_DIR", help="an `eval` output with the same task and dtype: "
                                                            "each role's results are copied, not recomputed, when the "
                                                            "models that role depends on are the same")
    # the sweep's αs come from --alphas: --alpha is refused (cli/_models.settle_model_options)
    parser.set_defaults(func=run, alpha_refused="sweep-alpha runs every α of --alphas: put it in --alphas instead")


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ProxyTuneError(f"--alphas must be comma-separated numbers, got {text!r}") from None
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise ProxyTuneError(f"--alphas must be finite numbers, got {text!r}")
    return sorted(set(alphas))


def run(args: argparse.Namespace) -> int:
    from ..evaluation import sweep_roles
    from ..evaluation.report import plot_sweep, sweep_table

    alphas = parse_alphas(args.alphas)
    task, store, specs = prepare(args, "sweep-alpha", {})
    if args.reuse:
        reuse(store, args.reuse)
    summary = run_roles(args, task, sweep_roles(alphas, bool(args.tuned)), store, specs)
    summary["alphas"] = alphas
    store.write_summary(summary)
    print(sweep_table(summary, alphas), flush=True)  # the table first: a plotting failure cannot hide it
    plot = plot_sweep(summary, alphas, store.directory / "alpha_sweep.png")
    print(f"plot: {plot}")
    return 0
