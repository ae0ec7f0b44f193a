"""GSM-style math word problems from reasoning-gym's `gsm_symbolic`, split by template.

`gsm_symbolic` instantiates 100 templates abstracted from GSM8K with fresh names and numbers (85 of
them are marked usable by reasoning-gym). Items from one template share their reasoning, so an honest
held-out set must use templates never seen in training: every fifth usable template is HELD-OUT, the
other 68 are TRAIN. Recipes (learning rate, rank, epochs) are chosen on VALIDATION templates, every sixth
TRAIN template, with the model trained on the other 56 (FIT), so nothing is ever tuned on HELD-OUT. The prompt is the paper's zero-shot GSM prompt; the target is the template's
chain of thought ending in "#### <answer>" (GSM8K's convention), which answer extraction reads back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from random import Random

from ..errors import ProxyTuneError

HELDOUT_TEMPLATES = (2, 7, 12, 17, 22, 27, 33, 40, 45, 50, 55, 60, 68, 73, 82, 89, 95)
TRAIN_TEMPLATES = (0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16, 18, 19, 20, 21, 23, 24, 25, 26, 28, 29, 30, 31,
                   34, 36, 38, 39, 41, 42, 43, 44, 46, 47, 48, 49, 51, 52, 53, 54, 56, 57, 58, 59, 62, 64, 66, 67,
                   69, 70, 71, 72, 75, 78, 80, 81, 83, 84, 85, 88, 91, 92, 93, 94, 96, 99)
# every sixth TRAIN template: where a training recipe is chosen; FIT: what a model is trained on while choosing
VALIDATION_TEMPLATES = TRAIN_TEMPLATES[::6]
FIT_TEMPLATES = tuple(t for t in TRAIN_TEMPLATES if t not in VALIDATION_TEMPLATES)

PROMPT = "Answer the following question.\n\nQuestion: {question}\nAnswer:"
# reasoning-gym appends this to every question; the paper's prompt has no such instruction.
RG_SUFFIX = " Give the result as your final answer. Do not include units."

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
FINAL = re.compile(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")
BOXED = re.compile(r"\\boxed\{\s*\\?\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


@dataclass(frozen=True)
class GSMExample:
    question: str
    answer: str  # the number, as reasoning-gym gives it (e.g. "288")
    target: str  # chain of thought ending in "#### <answer>"
    template: int

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)

    @property
    def completion(self) -> str:
        return " " + self.target

    def row(self) -> dict:
        """A `proxytune tune` JSONL row."""
        return {"prompt": self.prompt, "completion": self.completion}


def _generators() -> dict:
    try:
        from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import GSMSymbolicDataset, GSMSymbolicDatasetConfig
    except ImportError as error:
        raise ProxyTuneError("GSM data needs reasoning-gym: pip install reasoning-gym==0.1.25") from error
    return GSMSymbolicDataset(GSMSymbolicDatasetConfig(size=1, seed=0)).generators


def _normalize(number: str) -> str:
    value = number.replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def _example(generators: dict, template: int, rng: Random) -> GSMExample:
    item = generators[template](rng, 1.0)
    question = item["question"].removesuffix(RG_SUFFIX)
    answer = _normalize(str(item["answer"]))
    cot = item["metadata"]["answer_cot"].rstrip()
    reasoning = cot[:cot.rfind("####")].rstrip() if "####" in cot else cot
    return GSMExample(question, answer, f"{reasoning}\n#### {answer}", template)


def examples(templates: tuple[int, ...], n: int, seed: int) -> list[GSMExample]:
    """n examples cycling through `templates` in a seeded shuffled order, each with its own seeded numbers."""
    if n < 0:
        raise ProxyTuneError(f"n must be >= 0, got {n}")
    generators = _generators()
    order = list(templates)
    Random(seed).shuffle(order)
    return [_example(generators, order[i % len(order)], Random(f"gsm-{seed}-{i}")) for i in range(n)]


def train_examples(n: int, seed: int = 0) -> list[GSMExample]:
    return examples(TRAIN_TEMPLATES, n, seed)


def heldout_examples(n: int, seed: int = 0) -> list[GSMExample]:
    return examples(HELDOUT_TEMPLATES, n, seed)


def fit_examples(n: int, seed: int = 0) -> list[GSMExample]:
    return examples(FIT_TEMPLATES, n, seed)


def validation_examples(n: int, seed: int = 0) -> list[GSMExample]:
    return examples(VALIDATION_TEMPLATES, n, seed)


SPLITS = {"train": train_examples, "fit": fit_examples, "validation": validation_examples, "held-out": heldout_examples}


def extract_answer(text: str) -> str | None:
    """The number after the first "####", else the last number in the text, else None."""
    final = FINAL.search(text)
    if final:
        return _normalize(final.group(1))
    numbers = NUMBER.findall(text)
    return _normalize(numbers[-1]) if numbers else None


def answer_settled(text: str) -> bool:
    """Whether nothing written after `text` can change how it is judged: its first "#### number" is complete
    (a character follows that cannot continue the number). extract_answer reads that first one, the lenient
    reading defers to it, and the "####" format check is already met; a model that goes on writing "#### 62"
    lines to the end of its budget (the byte-level proxy does) changes nothing after this point."""
    final = FINAL.search(text)
    if final is None:
        return False
    after = text[final.end():]  # the number took every digit and comma; a "." may still start decimals
    return bool(after) and after != "."


def extract_answer_lenient(text: str) -> str | None:
    """A diagnostic, not the protocol: "####", else the first LaTeX \\boxed{number} (how instruction-tuned
    models mark an answer before they ramble on), else the last number."""
    if FINAL.search(text) is None:
        boxed = BOXED.search(text)
        if boxed:
            return _normalize(boxed.group(1))
    return extract_answer(text)


def is_correct(text: str, answer: str, lenient: bool = False) -> bool:
    predicted = extract_answer_lenient(text) if lenient else extract_answer(text)
    if predicted is None:
        return False
    try:
        return abs(float(predicted) - float(_normalize(answer))) < 1e-6
    except ValueError:
        return False
