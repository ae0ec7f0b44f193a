"""Loading a trio for the tuner: by role specs (model directories, .gguf files, adapters, registered names,
remote servers) or from a trio config (models/trio_config.py). What each spec means is the models layer's."""
from __future__ import annotations

import copy
from typing import Sequence

from ..engine.roles import Roles
from ..errors import ProxyTuneError
from ..models.placement import Placement


def load_pretrained(cls, base: str, expert: str | None, anti_expert: str | None, alpha: float, device, dtype,
                    experts: Sequence[tuple] | None, backend: str | None, threads: int | None, n_ctx: int | None,
                    byte_level: bool | None, prune: float, placement: dict | None, trust_remote_code: bool):
    """ProxyTuner.from_pretrained (its docstring says what each argument does)."""
    from ..models import registry
    from ..models.loading import load_roles
    from ..models.placement import placements_of
    from ..models.trio_config import user_trio

    if expert is None and anti_expert is None and experts is None:
        trio = registry.resolve_trio(base)
        if trio is None and user_trio(base) is not None:  # registered with `proxytune models add`
            return load_config(cls, user_trio(base), device=device, dtype=dtype, placement=placement,
                               backend=backend, threads=threads, n_ctx=n_ctx)
        if trio is None:
            raise ProxyTuneError(f"{base!r} is not a registered trio; give expert= and anti_expert= too")
        base, expert, anti_expert = trio["base"], trio["expert"], trio["anti_expert"]
    pair_specs = experts if experts is not None else [(expert, anti_expert, alpha)]
    schema = Roles(len(pair_specs))
    specs = {"base": base}
    for (expert_role, anti_role), (e, a, _) in zip(schema.pairs, pair_specs):
        specs[expert_role], specs[anti_role] = e, a
    loaded = load_roles(specs, schema.pairs, device=device, dtype=dtype, backend=backend, threads=threads,
                        n_ctx=n_ctx, placements=placements_of(placement, schema.names),
                        trust_remote_code=trust_remote_code)
    pairs = [(loaded[e][0], loaded[a][0], alpha) for (e, a), (_, _, alpha) in zip(schema.pairs, pair_specs)]
    return cls(loaded["base"][0], experts=pairs, tokenizers={r: loaded[r][1] for r in schema},
               byte_level=byte_level, prune=prune)


def load_config(cls, config, device=None, dtype=None, placement: dict | None = None, **options):
    """ProxyTuner.from_config (its docstring says what each argument does)."""
    from ..models.placement import placement_of
    from ..models.trio_config import TrioConfig, read_config

    config = config if isinstance(config, TrioConfig) else read_config(config)
    placements = {role: placement_of(value, f"the {role} placement").over(config.placements.get(role, Placement()))
                  for role, value in (placement or {}).items()}
    schema = Roles(len(config.alphas))
    experts = [(config.specs[e], config.specs[a], alpha) for (e, a), alpha in zip(schema.pairs, config.alphas)]
    tuner = cls.from_pretrained(config.specs["base"], experts=experts, device=device, dtype=dtype,
                                placement={**config.placements, **placements},
                                **{**config.options, **{k: v for k, v in options.items() if v is not None}})
    for role, template in config.chat_templates.items():  # a copy: roles may share one tokenizer object
        tokenizer = copy.deepcopy(tuner.tokenizers[role])
        tokenizer.chat_template = template
        tuner.tokenizers[role] = tokenizer
    return tuner
