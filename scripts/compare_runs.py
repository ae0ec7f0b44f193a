"""Paired comparison of roles from two evaluation directories on the examples both have finished.

`proxytune eval` pairs the roles of one run; this pairs a role of one run with a role of another (the gemma
trio's byte-level proxy against the demo trio's token-level base, say): examples matched by id, every reading
of the task (strict, and gsm's lenient one), fixed/broken and McNemar's exact p, Wilson intervals.

    python scripts/compare_runs.py results/gsm-gemma:proxy results/gsm-demo:base results/gsm-demo:proxy

The first DIR:ROLE is compared with each of the others. The runs must be of the same task; their other
settings (budgets, decodings) are printed, not checked: comparing them is the point.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from proxytune.errors import ProxyTuneError
from proxytune.evaluation import get_task
from proxytune.evaluation.records import read_records
from proxytune.evaluation.report import percent, table
from proxytune.evaluation.stats import accuracy, paired


def read_run(spec: str) -> tuple[str, dict, dict[str, dict]]:
    """DIR:ROLE -> (label, config, {example id: record})."""
    directory, _, role = spec.rpartition(":")
    if not directory or not role:
        raise ProxyTuneError(f"expected DIR:ROLE (e.g. results/gsm-demo:base), got {spec!r}")
    path = Path(directory)
    if not (path / "config.json").exists():
        raise ProxyTuneError(f"{path} has no config.json: not an evaluation output directory")
    config = json.loads((path / "config.json").read_text())
    records = {r["id"]: r for r in read_records(path) if r["role"] == role}
    if not records:
        raise ProxyTuneError(f"{path} has no records of role {role!r}")
    return spec, config, records


def interval(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['correct']} ({percent(entry['accuracy'])}, CI {100 * low:.0f}–{100 * high:.0f}%)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="DIR:ROLE")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two DIR:ROLE")
    runs = [read_run(spec) for spec in args.runs]
    tasks = {config["task"] for _, config, _ in runs}
    if len(tasks) != 1:
        raise ProxyTuneError(f"the runs are of different tasks ({', '.join(sorted(tasks))})")
    task = get_task(tasks.pop())  # only for its readings, which judge a record whatever the run's settings
    readings = {"strict": lambda record: record["correct"],
                **{name: judge for name, (_, judge) in task.readings().items()}}
    for label, config, records in runs:
        level = next(iter(records.values())).get("level", "tokens")
        print(f"{label}: decoded over {level}, budget {config['task_settings'].get('max_new_tokens')}, "
              f"models {config['models']}")
    first_label, _, first = runs[0]
    for label, _, records in runs[1:]:
        shared = sorted(set(first) & set(records))
        print(f"\n{first_label} versus {label}: {len(shared)} examples both finished")
        rows = []
        for name, judge in readings.items():
            a = [bool(judge(first[i])) for i in shared]
            b = [bool(judge(records[i])) for i in shared]
            ours, theirs, versus = accuracy(a), accuracy(b), paired(a, b)
            rows.append([name, interval(ours), interval(theirs), f"+{versus['fixed']}/-{versus['broken']}",
                         f"{versus['mcnemar_p']:.3g}"])
        print(table(["reading", first_label, label, "fixed/broken", "McNemar p"], rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ProxyTuneError as error:
        sys.exit(f"compare_runs: {error}")
