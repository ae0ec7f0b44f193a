"""`proxytune VERB ...`: one module per verb in this package, each defining `register(subparsers)`.

A verb module's `register` adds its subparser and sets `func=run(args) -> int`. Errors the user can
fix (ProxyTuneError) print one line and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import warnings
import pkgutil
import sys

from ..errors import ProxyTuneError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxytune", description="Proxy-tuning: steer a large language model "
                                     "with a small tuned expert and its untuned twin, at decoding time.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"proxytune {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
        importlib.import_module(f"{__name__}.{module}").register(subparsers)
    parser.verbs = subparsers.choices  # verb -> its parser, for errors in the verb's own words
    return parser


def refuse_unknown(parser: argparse.ArgumentParser, verb: str | None, unknown: list[str]) -> None:
    """An option argparse does not know, reported by the verb's own parser with the closest known spelling
    (argparse alone shows the top-level usage, and a typo'd option's value is taken for the prompt)."""
    where = parser.verbs.get(verb, parser)
    flag = next((item.split("=")[0] for item in unknown if item.startswith("-")), None)
    if flag is None:
        where.error(f"unexpected argument(s): {' '.join(unknown)}")
    known = [option for action in where._actions for option in action.option_strings]
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
    where.error(f"unknown option {flag}" + (f"; did you mean {close[0]}?" if close else f"; see proxytune {verb} --help"))


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (main() may run many times in one process, e.g. in tests
    that capture it), not to the stream that was current when the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def quiet_libraries(verbose: bool) -> None:
    """What a command prints is its own: one line per model loaded ("loading NAME (dtype on device)") instead
    of the libraries' unnamed "Loading weights" bars, deprecation notices and advisory warnings; `--verbose`
    (or PROXYTUNE_VERBOSE=1) keeps them all."""
    loading = logging.getLogger("proxytune.models")
    if not loading.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("proxytune: %(message)s"))
        loading.addHandler(handler)
        loading.setLevel(logging.INFO)
        loading.propagate = False
    if verbose:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        refuse_unknown(parser, getattr(args, "verb", None), unknown)
    quiet_libraries(bool(getattr(args, "verbose", False)) or os.environ.get("PROXYTUNE_VERBOSE") == "1")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "model_options", False):  # verbs that load models (cli/_models.py)
            from ._models import settle_model_options
            settle_model_options(args)
        if getattr(args, "dry_run", False):  # every verb that loads models takes --dry-run (cli/_models.py)
            from ._models import show_plan
            return show_plan(args)
        return int(args.func(args) or 0)
    except ProxyTuneError as error:
        print(f"proxytune {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"proxytune {args.verb}: interrupted", file=sys.stderr)
        return 130
