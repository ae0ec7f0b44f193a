"""GSM (reasoning-gym gsm_symbolic): zero-shot paper prompt, exact match of the number after "####" (else
the last number), how often the answer came in that format, how often it ended within the token budget, and
beside it a lenient reading that also takes \\boxed{} answers. Reported on HELD-OUT templates; a training
recipe is chosen on VALIDATION templates (`split="validation"`), never on the held-out ones."""
from __future__ import annotations

from ..datasets import gsm
from ..errors import ProxyTuneError
from .task import Example, GenerationTask

DEFAULT_SIZE = 200
# the splits an evaluation can run on: name -> (how config.json names it, its templates)
SPLITS = {"held-out": ("held-out templates", gsm.HELDOUT_TEMPLATES),
          "validation": ("validation templates", gsm.VALIDATION_TEMPLATES)}


def steps(target: str) -> int:
    """Reasoning steps of a reference solution: its lines before the "#### answer" line."""
    return sum(1 for line in target.split("####")[0].splitlines() if line.strip())


class GSMTask(GenerationTask):
    name = "gsm"
    max_new_tokens = 512  # the paper's budget
    stop = ("\nQuestion:",)  # a model that starts the next question has answered this one

    def __init__(self, seed: int = 0, max_new_tokens: int | None = None, split: str = "held-out"):
        if split not in SPLITS:
            raise ProxyTuneError(f"unknown gsm split {split!r}; use one of: {', '.join(SPLITS)}")
        self.seed, self.split = seed, split
        if max_new_tokens is not None:
            if max_new_tokens < 1:
                raise ProxyTuneError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
            self.max_new_tokens = max_new_tokens

    def examples(self, limit: int | None) -> list[Example]:
        # Item i depends only on (seed, i): a larger --limit extends a run, never reshuffles it.
        items = gsm.SPLITS[self.split](DEFAULT_SIZE if limit is None else limit, seed=self.seed)
        prefix = "gsm" if self.split == "held-out" else f"gsm-{self.split}"
        return [Example(f"{prefix}-{self.seed}-{i}", item.prompt, item.answer,
                        {"template": item.template, "steps": steps(item.target)}) for i, item in enumerate(items)]

    def judge(self, example: Example, output: str) -> dict:
        return {"answer": gsm.extract_answer(output), "correct": gsm.is_correct(output, example.gold),
                "format_ok": "####" in output}

    def settings(self) -> dict:
        name, templates = SPLITS[self.split]
        return {**super().settings(), "split": name, "seed": self.seed, "templates": list(templates)}

    def summarize(self, records: list[dict]) -> dict:
        """`####` format rate; the share of answers that ended by themselves before the token budget, and
        (--until-answered) the share cut once their answer was settled, which may or may not have ended."""
        if not records:
            return {}
        n = len(records)
        summary = {"format_rate": sum(r["format_ok"] for r in records) / n}
        if all("finish_reason" in r for r in records):
            summary["finished_rate"] = sum(r["finish_reason"] not in ("length", "answered") for r in records) / n
            answered = sum(r["finish_reason"] == "answered" for r in records)
            if answered:
                summary["answered_rate"] = answered / n
        return summary

    def settled(self, text: str) -> bool:
        return gsm.answer_settled(text)

    def readings(self) -> dict:
        # a model that never learned "####" but boxes its answer (the demo's base does) is read as it meant
        return {"lenient": ("also a LaTeX \\boxed{} answer when there is no ####",
                            lambda record: gsm.is_correct(record["output"], record["gold"], lenient=True))}
