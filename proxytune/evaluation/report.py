"""Printing an evaluation summary as a table, and the α-sweep table and plot."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

STANDARD = {"title", "alpha", "n", "correct", "accuracy", "ci95", "gap_closed", "fixed_vs_base", "broken_vs_base",
            "mcnemar_p_vs_base", "gap_closed_ci95"}


def percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_table(summary: dict) -> str:
    """The protocol's table, then one per other reading of the same records (e.g. gsm's lenient one)."""
    title = f"{summary['task']}: {summary['examples']} examples finished by every role"
    if summary["examples"] < summary["examples_requested"]:
        title += f" (of {summary['examples_requested']} requested)"
    text = title + "\n" + _reading_table(summary)
    for name, reading in summary.get("readings", {}).items():
        text += f"\n\n{name} reading ({reading['description']}), the same examples\n" + _reading_table(reading)
    return text


def _reading_table(summary: dict) -> str:
    entries = summary["roles"]
    extras = sorted({key for entry in entries.values() for key in entry} - STANDARD)
    with_gap = any("gap_closed" in entry for entry in entries.values())
    header = ["role", "n", "accuracy", "95% CI", *extras, "fixed/broken vs base", "McNemar p"] + (
        ["gap closed [95% bootstrap]"] if with_gap else [])
    rows = []
    for entry in entries.values():
        low, high = entry["ci95"]
        row = [entry["title"], str(entry["n"]), percent(entry["accuracy"]), f"[{100 * low:.1f}, {100 * high:.1f}]"]
        row += [percent(entry.get(key)) for key in extras]
        row.append(f"+{entry['fixed_vs_base']}/-{entry['broken_vs_base']}" if "fixed_vs_base" in entry else "")
        row.append(f"{entry['mcnemar_p_vs_base']:.3g}" if "mcnemar_p_vs_base" in entry else "")
        if with_gap:
            row.append(_gap(entry) if "gap_closed" in entry else "")
        rows.append(row)
    text = table(header, rows)
    others = [p for p in summary.get("paired", []) if p["versus"] != "base"]
    if others:
        names = {name: entry["title"] for name, entry in entries.items()}
        text += "\n\npaired, other than against the base\n" + table(
            ["role", "versus", "fixed/broken", "McNemar p"],
            [[names[p["role"]], names[p["versus"]], f"+{p['fixed']}/-{p['broken']}", f"{p['mcnemar_p']:.3g}"]
             for p in others])
    return text


def _gap(entry: dict) -> str:
    interval = entry.get("gap_closed_ci95")
    shown = percent(entry.get("gap_closed"))
    return shown if not interval else f"{shown} [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]"


def sweep_points(summary: dict, alphas: Sequence[float]) -> list[dict]:
    """One point per α; α = 0 is the base model's result (z = z_base exactly)."""
    entries = summary["roles"]
    points = []
    for alpha in alphas:
        entry = entries["base"] if alpha == 0 else entries[f"proxy@{alpha:g}"]
        points.append({"alpha": alpha, **{k: v for k, v in entry.items() if k not in ("title", "alpha")}})
    return points


def sweep_table(summary: dict, alphas: Sequence[float]) -> str:
    points = sweep_points(summary, alphas)
    extras = sorted({k for p in points for k in p} - STANDARD - {"alpha"})
    header = ["alpha", "accuracy", "95% CI", *extras] + (["gap closed"] if any("gap_closed" in p for p in points) else [])
    rows = []
    for p in points:
        row = [f"{p['alpha']:g}", percent(p["accuracy"]), f"[{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}]"]
        row += [percent(p.get(k)) for k in extras]
        if len(header) > 3 + len(extras):
            row.append(percent(p.get("gap_closed")) if "gap_closed" in p else "")
        rows.append(row)
    anchors = [f"{e['title']}: {percent(e['accuracy'])}" for name, e in summary["roles"].items()
               if name in ("expert", "tuned")]
    return (f"{summary['task']} α sweep over {summary['examples']} examples (α = 0 is the base model)\n"
            + table(header, rows) + ("\n" + "; ".join(anchors) if anchors else ""))


def plot_sweep(summary: dict, alphas: Sequence[float], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sweep_points(summary, alphas)
    xs = [p["alpha"] for p in points]
    ys = [100 * p["accuracy"] for p in points]
    errors = [[max(0.0, y - 100 * p["ci95"][0]) for y, p in zip(ys, points)],
              [max(0.0, 100 * p["ci95"][1] - y) for y, p in zip(ys, points)]]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label="proxy-tuned (95% CI)")
    for name, style in (("expert", "--"), ("tuned", ":")):
        if name in summary["roles"]:
            entry = summary["roles"][name]
            axes.axhline(100 * entry["accuracy"], linestyle=style, color="grey", label=entry["title"])
    axes.set_xlabel("α (strength of the expert's shift; 0 = base model)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{summary['task']}: accuracy vs α ({summary['examples']} examples)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
