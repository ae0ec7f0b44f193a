"""The paper's §7 analyses over traces.

- How often proxy-tuning changes the decision: share of positions where the proxy's top token differs
  from the base model's top token (on the proxy's own path), by position in the response. The paper:
  13.5 % on GSM, 17–25 % elsewhere, concentrated early.
- How much it moves the chosen tokens: mean of p_proxy(x_t) − p_base(x_t).
- For math (GSM): that shift on equations' left-hand sides (the reasoning: which numbers, which
  operation) against their right-hand sides (the arithmetic result). The paper: +0.131 vs +0.056.
"""
from __future__ import annotations

import re
from typing import Iterable

BUCKETS = ((0, 10), (10, 20), (20, 50), (50, 100), (100, 200), (200, None))

NUMBER = r"\$?-?\d[\d,]*(?:\.\d+)?%?"
OPERATOR = r"[+\-*/×÷x]"
# "48 / 2 = 24", "(3 + 4) × 2 = 14", "$12.50*4 = $50": an expression with at least one operator, "=", a number.
EQUATION = re.compile(rf"((?:\(\s*)*{NUMBER}(?:\s*\)*\s*{OPERATOR}\s*\(*\s*{NUMBER})+(?:\s*\))*)\s*=\s*({NUMBER})")


def bucket_name(low: int, high: int | None) -> str:
    return f"{low}+" if high is None else f"{low}-{high - 1}"


def shift(token: dict) -> float:
    return token["chosen"]["proxy"] - token["chosen"]["base"]


def top_token_changed(token: dict) -> bool:
    return token["top_id"]["proxy"] != token["top_id"]["base"]


def change_by_position(traces: Iterable[dict]) -> dict:
    counts = {bucket_name(*b): [0, 0] for b in BUCKETS}
    changed_total = total = 0
    for trace in traces:
        for position, token in enumerate(trace["tokens"]):
            low, high = next(b for b in BUCKETS if b[1] is None or position < b[1])
            entry = counts[bucket_name(low, high)]
            entry[0] += top_token_changed(token)
            entry[1] += 1
            changed_total += top_token_changed(token)
            total += 1
    return {"overall": changed_total / total if total else None, "positions": total,
            "by_position": {name: {"changed": c, "positions": n, "share": c / n if n else None}
                            for name, (c, n) in counts.items()}}


def probability_shift(traces: Iterable[dict]) -> dict:
    shifts = [shift(token) for trace in traces for token in trace["tokens"]]
    if not shifts:
        return {"mean": None, "positions": 0}
    return {"mean": sum(shifts) / len(shifts), "positions": len(shifts),
            "raised": sum(s > 0.01 for s in shifts) / len(shifts), "lowered": sum(s < -0.01 for s in shifts) / len(shifts)}


def equation_sides(text: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Character spans (left-hand side, right-hand side) of each equation in `text`."""
    return [(match.span(1), match.span(2)) for match in EQUATION.finditer(text)]


def _side_of(token: dict, sides) -> str | None:
    stripped = token["piece"].lstrip()
    if not stripped.strip():
        return None
    first = token["start"] + len(token["piece"]) - len(stripped)  # the token's first visible character
    for (left_start, left_end), (right_start, right_end) in sides:
        if left_start <= first < left_end:
            return "lhs"
        if right_start <= first < right_end:
            return "rhs"
    return None


def equation_shift(traces: Iterable[dict]) -> dict:
    values: dict[str, list[float]] = {"lhs": [], "rhs": []}
    equations = 0
    for trace in traces:
        text = "".join(token["piece"] for token in trace["tokens"])
        sides = equation_sides(text)
        equations += len(sides)
        for token in trace["tokens"]:
            side = _side_of(token, sides)
            if side:
                values[side].append(shift(token))
    result = {"equations": equations}
    for side, shifts in values.items():
        result[side] = {"mean_shift": sum(shifts) / len(shifts) if shifts else None, "tokens": len(shifts)}
    return result


def analyze(traces: list[dict], math: bool) -> dict:
    result = {"generations": len(traces), "top_token_change": change_by_position(traces),
              "probability_shift": probability_shift(traces)}
    if math:
        result["equation_shift"] = equation_shift(traces)
    return result
