"""Trio configs: a TOML file naming every role, how it is placed, and the α of each expert pair.

    alpha = 1.0                          # the pair's α (or per pair, below)
    byte_level = false                   # optional: true | false, like prune (a number in (0, 1)) and
                                         # backend ("transformers" | "llama.cpp")

    [base]
    model = "Qwen/Qwen2.5-Coder-7B"      # a path, Hub id, registered name, gguf:..., openai:... spec
    device_map = "auto"                  # any placement key: device, dtype, device_map, quantize
    chat_template = "{% for m in messages %}..."   # optional: this role's chat template instead of its own

    [expert]
    model = "my-gsm-expert"
    device = "cuda:1"

    [anti_expert]                        # or [anti-expert]
    model = "Qwen/Qwen2.5-Coder-0.5B"

Several pairs: instead of [expert]/[anti_expert], one [[pairs]] table per pair with `alpha`, `expert = {...}` and
`anti_expert = {...}`. Every verb takes `--config FILE`; `proxytune models add NAME FILE` registers it so that
`--model NAME` (and `ProxyTuner.from_pretrained(NAME)`) load it. Unknown keys are refused, naming the file.

Values are typed (pydantic, strict): `byte_level = "false"` is refused, not read as true. A file never sets
trust_remote_code: a registered config would run a checkpoint's own code for whoever loads it by name; only
`--trust-remote-code` on the command line (or the API's argument) does.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ProxyTuneError, validation_problem
from .placement import Placement, placement_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

ROLE_KEYS = {"model", "device", "dtype", "device_map", "quantize", "chat_template"}
TOP_KEYS = {"alpha", "byte_level", "prune", "backend", "base", "expert", "anti_expert", "anti-expert", "pairs"}


class TrioOptions(BaseModel):
    """The options a trio config may set, typed: what from_pretrained takes for them."""
    model_config = ConfigDict(extra="forbid", strict=True)
    byte_level: bool | None = None
    prune: float | None = Field(None, gt=0, lt=1)
    backend: Literal["transformers", "llama.cpp"] | None = None


def read_options(data: dict, where: str) -> dict:
    try:
        options = TrioOptions.model_validate({key: data[key] for key in TrioOptions.model_fields if key in data})
    except ValidationError as error:
        raise ProxyTuneError(f"{where}: {validation_problem(error)}") from None
    return options.model_dump(exclude_none=True)


@dataclass
class TrioConfig:
    path: Path
    specs: dict[str, str]  # role -> spec: base, expert, anti_expert, expert_2, anti_expert_2, ...
    alphas: list[float]  # one per pair
    placements: dict[str, Placement] = field(default_factory=dict)
    chat_templates: dict[str, str] = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # byte_level, prune, backend (TrioOptions)


def user_trios_dir() -> Path:
    return Path(os.environ.get("PROXYTUNE_CONFIG") or Path.home() / ".config" / "proxytune").expanduser() / "trios"


def user_trio(name: str) -> Path | None:
    """The config file registered as `name` by `proxytune models add`, if any."""
    path = user_trios_dir() / f"{name}.toml"
    return path if path.is_file() else None


def add_user_trio(name: str, source) -> Path:
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ProxyTuneError(f"a trio name is letters, digits, '-', '_' and '.', got {name!r}")
    read_config(source)  # only a valid config is registered
    target = user_trios_dir() / f"{name}.toml"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def _role(table, where: str, role: str) -> tuple[str, Placement, str | None]:
    if not isinstance(table, dict) or not isinstance(table.get("model"), str) or not table["model"]:
        raise ProxyTuneError(f"{where}: the {role} needs model = \"...\" (a path, Hub id, registered name, gguf: or "
                             f"openai: spec)")
    unknown = sorted(set(table) - ROLE_KEYS)
    if unknown:
        raise ProxyTuneError(f"{where}: unknown key {unknown[0]!r} for the {role}; use {', '.join(sorted(ROLE_KEYS))}")
    template = table.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ProxyTuneError(f"{where}: the {role}'s chat_template must be a string")
    placement = placement_of({k: v for k, v in table.items() if k not in ("model", "chat_template")},
                             f"{where}: the {role} placement")
    return table["model"], placement, template


def _alpha(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProxyTuneError(f"{where}: alpha must be a finite number, got {value!r}")
    return float(value)


def read_config(path) -> TrioConfig:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ProxyTuneError(f"trio config {path}: no such file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ProxyTuneError(f"trio config {path} is not valid TOML: {error}") from None
    where = f"trio config {path}"
    if "trust_remote_code" in data:
        raise ProxyTuneError(f"{where}: trust_remote_code cannot be set in a trio config (a registered file would run "
                             f"a checkpoint's own code for whoever loads it by name): remove it and pass "
                             f"--trust-remote-code on the command line, or trust_remote_code=True to from_pretrained")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ProxyTuneError(f"{where}: unknown key {unknown[0]!r}; use {', '.join(sorted(TOP_KEYS - {'anti-expert'}))}")
    if "anti-expert" in data:
        data["anti_expert"] = data.pop("anti-expert")
    pairs = data.get("pairs")
    if pairs is not None and ("expert" in data or "anti_expert" in data):
        raise ProxyTuneError(f"{where}: give [expert]/[anti_expert] or [[pairs]], not both")
    if pairs is None:
        pairs = [{"alpha": data.get("alpha", 1.0), "expert": data.get("expert"), "anti_expert": data.get("anti_expert")}]
    elif "alpha" in data:
        raise ProxyTuneError(f"{where}: with [[pairs]], give each pair its own alpha")
    if not isinstance(pairs, list) or not pairs:
        raise ProxyTuneError(f"{where}: [[pairs]] must list at least one pair")
    roles = [("base", data.get("base"))]
    alphas = []
    for index, pair in enumerate(pairs):
        suffix = "" if index == 0 else f"_{index + 1}"
        if not isinstance(pair, dict) or set(pair) - {"alpha", "expert", "anti_expert", "anti-expert"}:
            raise ProxyTuneError(f"{where}: pair {index + 1} takes alpha, expert and anti_expert")
        alphas.append(_alpha(pair.get("alpha", 1.0), f"{where}, pair {index + 1}"))
        roles += [(f"expert{suffix}", pair.get("expert")),
                  (f"anti_expert{suffix}", pair.get("anti_expert", pair.get("anti-expert")))]
    config = TrioConfig(path, {}, alphas)
    for role, table in roles:
        spec, placement, template = _role(table, where, role)
        config.specs[role] = spec
        if placement != Placement():
            config.placements[role] = placement
        if template is not None:
            config.chat_templates[role] = template
    config.options = read_options(data, where)
    return config
