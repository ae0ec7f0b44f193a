"""Options and setup shared by `proxytune eval` and `proxytune sweep-alpha`."""
from __future__ import annotations

import argparse

from ..errors import ProxyTuneError
from ._models import add_model_options, model_specs


def add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    from ..evaluation import TASKS

    parser.add_argument("task", help=f"one of: {', '.join(TASKS)}")
    add_model_options(parser)
    parser.add_argument("--tuned", help="a directly tuned large model (directory or peft adapter): the upper anchor "
                                        "for gap closed")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples (gsm default: 200)")
    parser.add_argument("--output", required=True, help="output directory (rerun the same command to resume)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows decoded together (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (gsm 512, humaneval 384)")
    parser.add_argument("--samples", type=int, default=0, help="humaneval: sampled completions per problem for pass@k "
                                                               "(T=0.8, top-p 0.95), besides the greedy one")
    parser.add_argument("--seed", type=int, default=0, help="gsm: which held-out problems (default 0)")
    parser.add_argument("--split", choices=("held-out", "validation"), default=None,
                        help="gsm: held-out templates (the default, what results report) or validation templates "
                             "(TRAIN templates kept out of a recipe's training, to choose the recipe on)")
    parser.add_argument("--until-answered", action="store_true",
                        help="end a row once nothing it writes next can change how it is judged (gsm: its first "
                             "'#### number' is complete), recorded as finish_reason 'answered': the same judgements "
                             "without decoding what a model repeats after its answer (byte-level proxies loop there)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_roles_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--roles", default=None,
                        help="comma-separated subset of base,expert,proxy,tuned to run now (default: all); later "
                             "runs with the same --output add the others. --roles base loads only the base model")


def parse_roles(text: str | None, with_tuned: bool) -> set[str] | None:
    if text is None:
        return None
    roles = {part.strip() for part in text.split(",") if part.strip()}
    known = {"base", "expert", "proxy"} | ({"tuned"} if with_tuned else set())
    if not roles or roles - known:
        raise ProxyTuneError(f"--roles takes a comma-separated subset of {', '.join(sorted(known))}, got {text!r}"
                             + ("" if with_tuned or "tuned" not in roles else " (tuned needs --tuned)"))
    return roles


def prepare(args: argparse.Namespace, command: str, extra_config: dict):
    """(task, store, specs), checked before any model loads: bad input fails in a second, not after loading."""
    from ..evaluation import ResultStore, get_task
    from ..evaluation.runner import check_limit
    from ..models.specs import adapter_digest

    check_limit(args.limit)
    if args.batch_size < 1:
        raise ProxyTuneError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ProxyTuneError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    task = get_task(args.task, samples=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed,
                    split=args.split)
    specs = model_specs(args)
    config = {"command": command, "task": task.name, "task_settings": task.settings(), "models": specs,
              "tuned": args.tuned, "dtype": args.dtype or "auto", **extra_config}
    # which weights an adapter spec held: a registered name may ship other weights later (a run is never resumed
    # or reused across that change)
    adapters = {role: digest for role, spec in {**specs, "tuned": args.tuned}.items()
                if spec is not None and (digest := adapter_digest(spec)) is not None}
    if adapters:
        config["adapters"] = adapters
    # settings that change results, recorded where they are not the default (older directories stay valid);
    # the decoding level is recorded per result and checked by the runner (--roles base cannot detect it)
    config.update({name: value for name, value, default in (("backend", args.backend, None),
                                                            ("prune", args.prune, 1e-5),
                                                            ("place", args.place, None),
                                                            ("config", args.config, None),
                                                            ("until_answered", args.until_answered, False))
                   if value != default})
    store = ResultStore(args.output, config)
    return task, store, specs


def load_runner(args: argparse.Namespace, specs: dict, base_only: bool = False):
    """The trio (or, with base_only, the base model standing in for all three roles) and the tuned model,
    with every model option (backend, byte level, pruning) as `generate` takes them."""
    from ..evaluation import RoleRunner
    from ..models.loading import load_roles
    from ..facade.tuner import ProxyTuner
    from ..models.placement import parse_place, placements_of
    from ._models import load_tuner, set_threads

    def alone(role: str, spec: str, byte_level) -> ProxyTuner:
        # the base keeps its --place; the anchor is placed like the base
        placements = placements_of({role: parse_place(args.place).get("base", {})}, [role])
        source, tokenizer = load_roles({role: spec}, device=args.device, dtype=args.dtype, backend=args.backend,
                                       threads=set_threads(args), n_ctx=args.n_ctx, placements=placements,
                                       trust_remote_code=args.trust_remote_code)[role]
        return ProxyTuner(source, source, source, tokenizer=tokenizer, alpha=0.0, byte_level=byte_level,
                          prune=args.prune)

    tuner = alone("base", specs["base"], args.byte_level) if base_only else load_tuner(args)
    # the anchor decodes over what the trio decodes over, so its greedy answers compare with theirs
    tuned = alone("tuned", args.tuned, tuner.byte_level) if args.tuned else None
    return RoleRunner(tuner, tuned)


def reuse(store, source: str) -> None:
    """--reuse: another eval's rows copied into this store, role by role, saying which roles were not and why."""
    from ..evaluation.records import import_eval_results

    added, skipped = import_eval_results(store, source)
    print(f"reused {added} results from {source}")
    for role, why in skipped.items():
        print(f"  not its {role} results: {why}")


def run_roles(args: argparse.Namespace, task, roles, store, specs: dict, base_only: bool = False) -> dict:
    """Every role on every example not done yet, then the summary; models load only when something is left to
    compute (a finished run, or one completed by --reuse, is summarised in a second)."""
    from ..evaluation import evaluate, summarize
    from ..evaluation.runner import check_limit, pending

    examples = task.examples(check_limit(args.limit))
    if not pending(examples, roles, store):
        return summarize(task, roles, store.records, [ex.id for ex in examples])
    runner = load_runner(args, specs, base_only=base_only)
    return evaluate(runner, task, roles, store, args.limit, args.batch_size, progress=not args.no_progress,
                    until_answered=args.until_answered)
