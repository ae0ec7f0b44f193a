"""Token-level analysis of what proxy-tuning changes (the paper's §7): numbers, PNG plots, an HTML page."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .measures import analyze
from .page import write_page
from .plots import plot_change_by_position, plot_equation_shift, plot_shift_histogram
from .traces import collect


def summary_lines(result: dict) -> list[str]:
    change, moved = result["top_token_change"], result["probability_shift"]
    lines = [f"{result['generations']} generations, {change['positions']} generated tokens.",
             f"Top token changed vs base at {100 * (change['overall'] or 0):.1f}% of positions (paper: 13.5% GSM, "
             f"17-25% elsewhere); by position: " + ", ".join(
                 f"{name}: {100 * e['share']:.1f}%" for name, e in change["by_position"].items() if e["positions"]),
             f"Mean shift of the chosen token's probability, proxy − base: {moved['mean'] or 0:+.3f}."]
    if "equation_shift" in result:
        eq = result["equation_shift"]
        fmt = lambda side: "—" if eq[side]["mean_shift"] is None else f"{eq[side]['mean_shift']:+.3f}"  # noqa: E731
        lines.append(f"Equations ({eq['equations']}): mean shift on left-hand sides {fmt('lhs')} "
                     f"({eq['lhs']['tokens']} tokens), right-hand sides {fmt('rhs')} ({eq['rhs']['tokens']} tokens); "
                     f"paper: +0.131 vs +0.056.")
    return lines


def run_analysis(tuner, prompts: Sequence[str], output_dir, labels: Sequence[str] | None = None, math: bool = False,
                 max_new_tokens: int = 256, stop: Sequence[str] = (), top_k: int = 5, alpha=None,
                 batch_size: int = 8) -> dict:
    """Generate, measure, and write traces.jsonl, analysis.json, *.png and tokens.html into output_dir."""
    traces = collect(tuner, prompts, labels, max_new_tokens, stop, top_k, alpha, batch_size)
    return write_analysis(traces, output_dir, math, tuner.alphas[0] if alpha is None else alpha)


def write_analysis(traces: list[dict], output_dir, math: bool, alpha: float) -> dict:
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "traces.jsonl", "w") as handle:
        for trace in traces:
            handle.write(json.dumps(trace, ensure_ascii=False) + "\n")
    result = analyze(traces, math)
    result["alpha"] = alpha
    files = {"top_token_change": plot_change_by_position(result, output / "top_token_change.png"),
             "probability_shift": plot_shift_histogram(traces, output / "probability_shift.png")}
    if math:
        files["equation_shift"] = plot_equation_shift(result, output / "equation_shift.png")
    lines = summary_lines(result)
    files["page"] = write_page(traces, lines, output / "tokens.html")
    result["files"] = {name: str(path) for name, path in files.items()}
    result["summary"] = lines
    (output / "analysis.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


__all__ = ["run_analysis", "write_analysis", "analyze", "collect", "summary_lines"]
