"""Named models and trios (filled in by the model registry)."""
from __future__ import annotations

from pathlib import Path

TRIOS: dict[str, dict[str, str]] = {}


def resolve_model(name: str) -> Path | None:
    """A local directory for a registered model name, or None when the name is not registered."""
    return None


def resolve_trio(name: str) -> dict[str, str] | None:
    return TRIOS.get(name)
