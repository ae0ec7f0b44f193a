"""What an evaluation task is: examples, and how to judge a model's answer to one.

Two kinds. A *generation* task decodes from a prompt and judges the text (GSM, HumanEval).
A *choice* task scores each option as a continuation of the prompt and picks the most likely (MMLU).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    id: str
    prompt: str
    gold: object
    data: dict = field(default_factory=dict)  # what the judge needs beyond the prompt (tests, options)


class GenerationTask:
    name = "generation"
    kind = "generate"
    max_new_tokens = 256
    stop: tuple[str, ...] = ()
    samples = 0  # extra sampled completions per example (pass@k); 0 = greedy only
    temperature = 0.8
    top_p = 0.95

    def examples(self, limit: int | None) -> list[Example]:
        raise NotImplementedError

    def judge(self, example: Example, output: str) -> dict:
        """At least {"answer": ..., "correct": bool}; may add task-specific fields."""
        raise NotImplementedError

    def settings(self) -> dict:
        """Everything that changes results: an output dir made with other settings is refused."""
        return {"max_new_tokens": self.max_new_tokens, "stop": list(self.stop), "samples": self.samples,
                **({"temperature": self.temperature, "top_p": self.top_p} if self.samples else {})}

    def summarize(self, records: list[dict]) -> dict:
        """Task-specific numbers for one role's records (beyond accuracy)."""
        return {}

    def readings(self) -> dict:
        """Other ways to judge a record than the protocol's `correct`, by name: {name: (description,
        record -> bool)}. Each gets its own accuracies, paired tests and gap closed beside the protocol's."""
        return {}

    def settled(self, text: str) -> bool:
        """Whether nothing a model writes after `text` can change how `judge` and every reading judge it
        (`eval --until-answered` ends a row there). Never, unless a task knows better."""
        return False


class ChoiceTask:
    name = "choice"
    kind = "choice"
    samples = 0  # one scored choice per example

    def examples(self, limit: int | None) -> list[Example]:
        raise NotImplementedError

    def options(self, example: Example) -> list[str]:
        """Continuations to score; example.gold is the index of the right one."""
        raise NotImplementedError

    def settings(self) -> dict:
        return {}

    def summarize(self, records: list[dict]) -> dict:
        return {}

    def readings(self) -> dict:
        return {}


def take(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]
