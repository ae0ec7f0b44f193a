"""PNG plots of the analyses (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_change_by_position(result: dict, path: Path) -> Path:
    plt = _pyplot()
    buckets = result["top_token_change"]["by_position"]
    names = [name for name, entry in buckets.items() if entry["positions"]]
    shares = [100 * buckets[name]["share"] for name in names]
    figure, axes = plt.subplots(figsize=(6, 3.6))
    bars = axes.bar(names, shares, color="#4c72b0")
    for bar, name in zip(bars, names):
        axes.annotate(f"n={buckets[name]['positions']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=7)
    overall = result["top_token_change"]["overall"]
    axes.set_title(f"proxy's top token ≠ base's top token (overall {100 * (overall or 0):.1f}%)", fontsize=10)
    axes.set_xlabel("position in the response (tokens)")
    axes.set_ylabel("positions changed (%)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_shift_histogram(traces: list[dict], path: Path) -> Path:
    plt = _pyplot()
    shifts = [t["chosen"]["proxy"] - t["chosen"]["base"] for trace in traces for t in trace["tokens"]]
    figure, axes = plt.subplots(figsize=(6, 3.6))
    axes.hist(shifts, bins=40, range=(-1, 1), color="#55a868")
    mean = sum(shifts) / len(shifts) if shifts else 0.0
    axes.axvline(mean, color="black", linestyle="--", label=f"mean {mean:+.3f}")
    axes.set_yscale("log")
    axes.set_xlabel("p_proxy(chosen token) − p_base(chosen token)")
    axes.set_ylabel("tokens")
    axes.set_title("how far proxy-tuning moved each generated token", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_equation_shift(result: dict, path: Path) -> Path:
    plt = _pyplot()
    sides = result["equation_shift"]
    names = ["left-hand side", "right-hand side"]
    values = [sides[s]["mean_shift"] or 0.0 for s in ("lhs", "rhs")]
    figure, axes = plt.subplots(figsize=(4.5, 3.6))
    bars = axes.bar(names, values, color=["#c44e52", "#8172b2"])
    for bar, side in zip(bars, ("lhs", "rhs")):
        axes.annotate(f"{sides[side]['tokens']} tokens", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=7)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_ylabel("mean p_proxy − p_base of chosen tokens")
    axes.set_title(f"equations ({sides['equations']}): reasoning vs arithmetic", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
