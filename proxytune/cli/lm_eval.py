"""`proxytune lm-eval ...`: lm-evaluation-harness with the "proxytune" model registered.

Everything after `lm-eval` goes to lm-eval unchanged, e.g.
  proxytune lm-eval --model proxytune --model_args model=demo,alpha=1.0,dtype=bfloat16 --tasks my_task
"""
from __future__ import annotations

import argparse
import sys

from ..errors import ProxyTuneError


def register(subparsers) -> None:
    parser = subparsers.add_parser("lm-eval", add_help=False, prefix_chars="\0",
                                   help="run lm-evaluation-harness with --model proxytune available",
                                   description="Passes every argument through to lm-eval.")
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate

        from ..integrations import lm_eval as lm_eval_adapter  # noqa: F401 — registers the "proxytune" model
    except ImportError as error:
        raise ProxyTuneError(f"lm-eval is not installed ({error}): pip install 'proxytune[eval]' "
                             f"or pip install lm-eval==0.4.13") from None
    saved = sys.argv
    sys.argv = ["lm-eval", *args.lm_eval_args]
    try:
        cli_evaluate()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0
