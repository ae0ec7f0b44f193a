"""Where and how each role's weights live: device, dtype, an accelerate device map, quantisation.

One convention everywhere: a `Placement` per role, over a default for every role.

    Python   ProxyTuner.from_pretrained(..., device="cuda", placement={"base": {"device_map": "auto"}})
    CLI      --device cuda --place base:device_map=auto --place expert:device=cuda:1,dtype=float16
    configs  the same keys per role

Keys: `device` (cpu, cuda, cuda:N, mps), `dtype` (auto: the checkpoint's own; float32, bfloat16, float16),
`device_map` ("auto", "balanced", "balanced_low_0", "sequential", or an explicit {module: device} map, as
transformers users write it; accelerate places the layers) and `quantize` ("4bit" or "8bit": bitsandbytes,
CUDA only). Everything is checked before any weights load, so a wrong device is a one-line error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ProxyTuneError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
QUANTIZE = ("4bit", "8bit")
ROLE_SPELLINGS = {"anti-expert": "anti_expert"}  # the CLI's spelling of a role, accepted as the API's


@dataclass(frozen=True)
class Placement:
    device: str | None = None
    dtype: str | None = None  # None or "auto": the checkpoint's own
    device_map: str | dict | None = None
    quantize: str | None = None

    def over(self, default: "Placement") -> "Placement":
        """This placement, with what it leaves unset taken from `default`."""
        return replace(default, **{f.name: getattr(self, f.name) for f in fields(self)
                                   if getattr(self, f.name) is not None})

    @property
    def key(self) -> str:
        """A hashable form: roles whose spec and placement agree share one loaded model."""
        return json.dumps([getattr(self, f.name) for f in fields(self)], sort_keys=True)


def placement_of(value, what: str = "placement") -> Placement:
    """A Placement from a Placement, a mapping of its keys, or None; unknown keys and values refused."""
    if value is None:
        return Placement()
    if isinstance(value, Placement):
        return check(value, what)
    if not isinstance(value, Mapping):
        raise ProxyTuneError(f"{what} must be a mapping of device/dtype/device_map/quantize, got {value!r}")
    known = {f.name for f in fields(Placement)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ProxyTuneError(f"{what}: unknown key {unknown[0]!r}; use {', '.join(sorted(known))}")
    return check(Placement(**value), what)


def placements_of(per_role: Mapping | None, roles) -> dict[str, Placement]:
    """role -> Placement for the roles named in `per_role` (the CLI's anti-expert spelling accepted)."""
    out: dict[str, Placement] = {}
    for name, value in (per_role or {}).items():
        role = ROLE_SPELLINGS.get(name, name)
        if role not in roles:
            raise ProxyTuneError(f"placement for an unknown role {name!r}; the roles are {', '.join(roles)}")
        out[role] = placement_of(value, f"the {role} placement")
    return out


def check(placement: Placement, what: str = "placement") -> Placement:
    if placement.device is not None:
        try:
            check_device(placement.device)
        except ProxyTuneError as error:
            raise ProxyTuneError(f"{what}: {error}") from None
    if placement.dtype not in (None, "auto") and placement.dtype not in DTYPES:
        raise ProxyTuneError(f"{what}: unknown dtype {placement.dtype!r}; use auto (the checkpoint's own) or one "
                             f"of {', '.join(sorted(DTYPES))}")
    device_map = placement.device_map
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ProxyTuneError(f"{what}: device_map {device_map!r} is not one of {', '.join(DEVICE_MAPS)} nor a "
                             f"{{module: device}} map")
    if isinstance(device_map, Mapping):
        for device in device_map.values():
            check_device(str(device) if not isinstance(device, int) else f"cuda:{device}")
    elif device_map is not None and not isinstance(device_map, str):
        raise ProxyTuneError(f"{what}: device_map must be a name or a {{module: device}} map, got {device_map!r}")
    if device_map is not None and placement.device is not None:
        raise ProxyTuneError(f"{what}: give device or device_map, not both (a device map places every layer)")
    if placement.quantize is not None:
        if placement.quantize not in QUANTIZE:
            raise ProxyTuneError(f"{what}: quantize {placement.quantize!r} is not one of {', '.join(QUANTIZE)}")
        if not torch.cuda.is_available():
            raise ProxyTuneError(f"{what}: quantize={placement.quantize} uses bitsandbytes, which needs a CUDA GPU; "
                                 f"this machine has none (on CPU use a GGUF model in llama.cpp: gguf:SPEC)")
    return placement


def check_device(device: str) -> torch.device:
    """A torch device this machine has, or a one-line error saying what it has."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ProxyTuneError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ProxyTuneError(f"device {device!r} asks for CUDA, but {built}; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ProxyTuneError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ProxyTuneError(f"device {device!r}: MPS is not available here; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ProxyTuneError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")
    return parsed


def torch_device(placement: Placement) -> torch.device:
    if placement.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(placement.device)


def where(placement: Placement) -> str:
    """Where a placement puts a model, for messages and plans: its device map, or its device."""
    if placement.device_map is not None:
        device_map = placement.device_map
        return f"device_map={json.dumps(device_map) if isinstance(device_map, dict) else device_map}"
    return str(torch_device(placement))


def torch_dtype(placement: Placement, checkpoint: Path | None) -> torch.dtype:
    """The dtype to load in: the one asked for, else the checkpoint's own (config.json's dtype; float32
    when it names none, and for GGUF files, whose quantised weights transformers computes in float32)."""
    if placement.dtype not in (None, "auto"):
        return DTYPES[placement.dtype]
    config = checkpoint / "config.json" if checkpoint is not None and checkpoint.is_dir() else None
    if config is not None and config.exists():
        settings = json.loads(config.read_text())
        name = settings.get("dtype") or settings.get("torch_dtype")
        if isinstance(name, str) and name in DTYPES:
            return DTYPES[name]
    return torch.float32


def parse_place(items) -> dict[str, dict]:
    """`--place ROLE:KEY=VALUE[,KEY=VALUE...]` (repeatable) -> {role: {key: value}}. A device_map value may
    be a JSON object ({"model.layers.0": "cuda:0", ...}), commas and all."""
    out: dict[str, dict] = {}
    for item in items or ():
        role, colon, rest = item.partition(":")
        if not colon or not role or not rest:
            raise ProxyTuneError(f"--place {item!r}: write ROLE:KEY=VALUE[,KEY=VALUE...], e.g. base:device_map=auto")
        settings = out.setdefault(role, {})
        while rest:
            key, equals, rest = rest.partition("=")
            if not equals or not key:
                raise ProxyTuneError(f"--place {item!r}: {key!r} has no =VALUE")
            if rest.startswith("{"):
                try:
                    value, end = json.JSONDecoder().raw_decode(rest)
                except json.JSONDecodeError as error:
                    raise ProxyTuneError(f"--place {item!r}: the {key} map is not valid JSON ({error})") from None
                rest = rest[end:]
            else:
                value, _, rest = rest.partition(",")
                rest = "," + rest if rest else ""
            if rest and not rest.startswith(","):
                raise ProxyTuneError(f"--place {item!r}: expected a comma after {key}=...")
            rest = rest[1:]
            settings[key.strip()] = value
    return out
