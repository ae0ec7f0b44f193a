"""What loading a trio would take, without loading it: each role's placement, dtype, weight bytes and KV cache.

Each role's backend (backend_registry.py) plans it from its files (footprint.py measures them); roles sharing
one loaded model count it once.
"""
from __future__ import annotations

from typing import Sequence

from .backend import RolePlan
from .backend_registry import backend_of, with_backend
from .footprint import weight_bytes  # noqa: F401  (the plan's measure of a checkpoint, as callers import it)
from .placement import Placement


def plan_roles(specs: dict[str, str], placements: dict[str, Placement], backend: str | None = None) -> list[RolePlan]:
    """One RolePlan per role, in order; nothing is loaded or converted."""
    counted: set = set()  # the weights an earlier role already counted
    plans = []
    for role, raw_spec in specs.items():
        spec = with_backend(raw_spec, backend)
        plans.append(backend_of(spec).plan(role, raw_spec, spec, placements[role], counted))
    return plans


def table(plans: Sequence[RolePlan], batch: int, context: int) -> str:
    def size(n):
        return "?" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    lines = [f"{'role':<12} {'runs in':<12} {'where':<22} {'dtype':<16} {'weights':>11} "
             f"{f'KV (batch {batch} x {context})':>22}  spec"]
    total = 0
    for p in plans:
        kv = None if p.kv_per_token is None else p.kv_per_token * batch * context
        total += (p.weights or 0) + (kv or 0)
        lines.append(f"{p.role:<12} {p.runs_in:<12} {p.where:<22} {p.dtype:<16} {size(p.weights):>11} "
                     f"{size(kv):>22}  {p.spec}" + (f"  ({p.note})" if p.note else ""))
    lines.append(f"total known: {size(total)} (activations and logits come on top: batch x vocabulary x 4 bytes "
                 f"per step and role)")
    return "\n".join(lines)
