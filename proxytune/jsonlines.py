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
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ProxyTuneError(f"{path}:{number}: not UTF-8 text (byte {error.start + 1} of the line); "
                                     f"save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ProxyTuneError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            except RecursionError:
                raise ProxyTuneError(f"{path}:{number}: JSON nested too deep") from None
