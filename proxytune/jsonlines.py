"""JSON Lines files (batch prompts, analysis prompts, training data): each object with its line number."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .errors import ProxyTuneError


def json_lines(path, what: str = "file") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line; a line that is not JSON is a ProxyTuneError
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ProxyTuneError(f"{what} {path} does not exist")
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ProxyTuneError(f"{path}:{number}: not valid JSON ({error.msg})") from None
