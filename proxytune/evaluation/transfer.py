"""Where proxy-tuning transfers and where it does not: an evaluation's per-example results grouped by a property
of the problem (gsm: its template, its number of reasoning steps), each group with every role's accuracy and
the proxy's problems fixed and broken against the base and against the expert."""
from __future__ import annotations

from typing import Sequence

from .report import table
from .stats import paired


def breakdown(records: Sequence[dict], examples, key: str) -> list[dict]:
    """One row per value of `key` in the examples' data, over the examples every role present finished."""
    by_role: dict[str, dict[str, bool]] = {}
    for record in records:
        by_role.setdefault(record["role"], {})[record["id"]] = bool(record["correct"])
    complete = [e for e in examples if all(e.id in results for results in by_role.values())]
    groups: dict = {}
    for example in complete:
        groups.setdefault(example.data[key], []).append(example.id)
    rows = []
    for value in sorted(groups):
        ids = groups[value]
        row = {key: value, "n": len(ids),
               **{role: sum(results[i] for i in ids) / len(ids) for role, results in by_role.items()}}
        for other in ("base", "expert"):
            if "proxy" in by_role and other in by_role:
                row[f"proxy_vs_{other}"] = paired([by_role["proxy"][i] for i in ids], [by_role[other][i] for i in ids])
        rows.append(row)
    return rows


def breakdown_table(rows: list[dict], key: str) -> str:
    roles = [k for k in rows[0] if k not in (key, "n") and not k.startswith("proxy_vs_")] if rows else []
    rows_shown = []
    for row in rows:
        versus = [f"+{row[k]['fixed']}/-{row[k]['broken']}" if k in row else "" for k in ("proxy_vs_base",
                                                                                            "proxy_vs_expert")]
        rows_shown.append([str(row[key]), str(row["n"]), *(f"{100 * row[r]:.0f}%" for r in roles), *versus])
    return table([key, "n", *roles, "proxy vs base", "proxy vs expert"], rows_shown)
