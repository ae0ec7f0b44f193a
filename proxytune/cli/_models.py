"""Model options shared by every verb that runs models: --model NAME | --base/--expert/--anti-expert."""
from __future__ import annotations

import argparse

from ..errors import ProxyTuneError


def add_model_options(parser: argparse.ArgumentParser) -> None:
    from ..models.backend_registry import BACKENDS, every_role_names

    group = parser.add_argument_group("models")
    group.add_argument("--model", help="a registered trio name (e.g. demo, or one added with `proxytune models add`) "
                                       "giving all three roles")
    group.add_argument("--config", metavar="TRIO.toml", help="a trio config: every role, its placement, α per pair "
                                                              "(docs/hardware.md; models/trio_config.py)")
    group.add_argument("--base", help="large untuned model: directory, .gguf file or registered name")
    group.add_argument("--expert", help="small tuned model (or a peft adapter directory)")
    group.add_argument("--anti-expert", dest="anti_expert", help="small untuned model")
    group.add_argument("--alpha", type=float, default=None,
                       help="strength of the expert's shift (default: the config's, else 1.0)")
    parser.set_defaults(model_options=True)
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16 (default auto: each "
                                                     "checkpoint's own, e.g. bf16 for the demo models)")
    group.add_argument("--place", action="append", metavar="ROLE:KEY=VALUE[,...]",
                       help="one role's placement over --device/--dtype (repeatable): device, dtype, device_map "
                            "(auto, balanced, sequential or a JSON {module: device} map), quantize (4bit, 8bit: "
                            "bitsandbytes on CUDA); e.g. --place base:device_map=auto --place expert:device=cuda:1")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="let checkpoints run their own modelling code (off: only transformers' own models)")
    group.add_argument("--dry-run", action="store_true",
                       help="print each role's placement, dtype, weight and KV-cache bytes, and load nothing")
    every_role = [backend for backend in BACKENDS if backend.every_role]
    by_prefix = "; ".join(f"{b.prefix}SPEC runs one role in {b.name}" for b in every_role if b.prefix)
    needs = "; ".join(f"{b.name} needs pip install 'proxytune[{b.extra}]'" for b in every_role if b.extra)
    group.add_argument("--backend", choices=every_role_names(), default=None,
                       help=f"run every role in this backend (default: per spec; {by_prefix}); {needs}")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads for computing: torch's (transformers models) and, unless --llama-threads, "
                            "llama.cpp's per model (default: all cores), as in `demo` and `tune`")
    group.add_argument("--llama-threads", type=int, default=None,
                       help="llama.cpp threads per model when they should differ from --threads")
    group.add_argument("--ctx", type=int, default=None, dest="n_ctx",
                       help="llama.cpp KV cells per model, shared by the rows of a batch (default: 8192)")
    level = group.add_mutually_exclusive_group()
    level.add_argument("--byte-level", dest="byte_level", action="store_const", const=True, default=None,
                       help="combine the roles byte by byte even when they share a vocabulary (default: only when "
                            "their vocabularies differ; lengths then count bytes)")
    level.add_argument("--token-level", dest="byte_level", action="store_const", const=False,
                       help="refuse roles whose vocabularies differ instead of decoding byte by byte")
    group.add_argument("--prune", type=float, default=1e-5,
                       help="byte level: drop token paths below this share of the text's probability (default 1e-5; "
                            "0 keeps every path)")


def add_decoding_option(parser: argparse.ArgumentParser) -> None:
    from ..engine.settings import MODES

    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--decoding", choices=MODES, default="plain",
                       help="plain (default); speculative: the expert drafts, base and anti-expert verify a whole "
                            "draft per forward (same output, fewer large-model steps); auto: speculative where it is "
                            "exact and possible, plain otherwise. A remote base always drafts its own continuation "
                            "instead (see its spec's chunk=)")
    modes.add_argument("--speculative", dest="decoding", action="store_const", const="speculative",
                       help="--decoding speculative")


def trio_config(args: argparse.Namespace):
    """The TrioConfig behind --config, or behind --model NAME registered with `models add`; None otherwise."""
    from ..models import registry
    from ..models.trio_config import read_config, user_trio

    if args.config:
        if args.model or args.base or args.expert or args.anti_expert:
            raise ProxyTuneError("give either --config or --model / --base, --expert, --anti-expert, not both")
        return read_config(args.config)
    if args.model and registry.resolve_trio(args.model) is None and user_trio(args.model) is not None:
        return read_config(user_trio(args.model))
    return None


def settle_model_options(args: argparse.Namespace) -> None:
    """Before a verb runs: --alpha defaults to the config's α (one pair), else 1.0; a verb that takes its αs
    elsewhere (sweep-alpha) refuses it."""
    refused = getattr(args, "alpha_refused", None)
    if refused and args.alpha is not None:
        raise ProxyTuneError(f"--alpha {args.alpha:g}: {refused}")
    config = trio_config(args)
    if args.alpha is None:
        args.alpha = config.alphas[0] if config is not None and len(config.alphas) == 1 else 1.0
    elif config is not None and len(config.alphas) > 1:
        raise ProxyTuneError(f"{config.path} has {len(config.alphas)} expert pairs, each with its α: set them there")


def model_specs(args: argparse.Namespace) -> dict[str, str]:
    """role -> spec, from --config, --model or the three role options."""
    from ..models import registry

    config = trio_config(args)
    if config is not None:
        return dict(config.specs)
    if args.model:
        if args.base or args.expert or args.anti_expert:
            raise ProxyTuneError("give either --model or --base/--expert/--anti-expert, not both")
        trio = registry.resolve_trio(args.model)
        if trio is None:
            known = ", ".join(sorted(registry.TRIOS)) or "none"
            raise ProxyTuneError(f"unknown trio {args.model!r}; known trios: {known}")
        return dict(trio)
    missing = [f"--{name.replace('_', '-')}" for name in ("base", "expert", "anti_expert") if not getattr(args, name)]
    if missing:
        raise ProxyTuneError(f"missing {', '.join(missing)} (or give --model NAME)")
    return {"base": args.base, "expert": args.expert, "anti_expert": args.anti_expert}


def set_threads(args: argparse.Namespace) -> int | None:
    """--threads: torch's CPU threads; returns llama.cpp's (--llama-threads, else --threads)."""
    if args.threads is not None:
        if args.threads < 1:
            raise ProxyTuneError(f"--threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    return args.llama_threads if args.llama_threads is not None else args.threads


def load_tuner(args: argparse.Namespace):
    from ..facade.tuner import ProxyTuner
    from ..models.placement import parse_place

    config = trio_config(args)
    if config is not None:
        if len(config.alphas) == 1:
            config.alphas = [args.alpha]
        return ProxyTuner.from_config(config, device=args.device, dtype=args.dtype, placement=parse_place(args.place),
                                      backend=args.backend, threads=set_threads(args), n_ctx=args.n_ctx,
                                      byte_level=args.byte_level, trust_remote_code=args.trust_remote_code or None,
                                      prune=args.prune if args.prune != 1e-5 else None)
    specs = model_specs(args)
    return ProxyTuner.from_pretrained(specs["base"], specs["expert"], specs["anti_expert"], alpha=args.alpha,
                                      device=args.device, dtype=args.dtype, backend=getattr(args, "backend", None),
                                      threads=set_threads(args), n_ctx=args.n_ctx,
                                      byte_level=getattr(args, "byte_level", None), prune=getattr(args, "prune", 1e-5),
                                      placement=parse_place(args.place), trust_remote_code=args.trust_remote_code)


def show_plan(args: argparse.Namespace) -> int:
    """--dry-run: the loading plan of the roles the verb would load (models/plan.py), nothing loaded."""
    from ..models.loading import Loader
    from ..models.placement import Placement, placements_of
    from ..models.placement import parse_place
    from ..models.plan import plan_roles, table

    specs = model_specs(args)
    config = trio_config(args)
    given = placements_of(parse_place(args.place), list(specs))
    placements = {role: given.get(role, Placement()).over(config.placements.get(role, Placement()))
                  for role in specs} if config is not None else given
    loader = Loader(args.device, args.dtype, placements=placements)
    placements = {role: loader.placement(role) for role in specs}
    # rows decoded together: serve's --max-batch, eval's or a batch file's --batch-size, else one prompt
    batch = getattr(args, "max_batch", None) or (getattr(args, "batch_size", 1) if getattr(args, "input", True) else 1)
    context = args.n_ctx or 4096
    print(table(plan_roles(specs, placements, args.backend), batch, context))
    return 0


def byte_usage(tuner) -> list[str]:
    """One line per role read byte by byte: forwards and token paths per byte, hypotheses, pruned mass."""
    if not tuner.byte_level:
        return []
    lines, seen = [], set()
    for role, source in tuner.sources.items():
        if id(source) in seen:
            continue
        seen.add(id(source))
        s = source.stats.as_dict()
        lines.append(f"{role} (bytes): {s['bytes']} bytes, {s['forwards']} forwards, {s['paths_per_byte']} token paths "
                     f"per byte, {s['mean_hypotheses']} hypotheses per byte (most {s['most_hypotheses']}), pruned "
                     f"mass {s['pruned_mass']:.1e}")
    return lines


def remote_usage(tuner) -> list[str]:
    """One line per role behind an OpenAI-compatible server: calls, tokens, bytes, wall time (RemoteStats)."""
    return [source.server_calls.summary(role) for role, source in tuner.remote_sources().items()]
