"""Bring a byte-level evaluation decoded to its budget under the `--until-answered` rule, exactly, so it can go on
with that rule instead of starting over.

Greedy decoding writes the same prefix whenever it stops, so a record decoded to its budget holds the record the
rule would have written: its output up to the first byte where `task.settled` holds (the text as a row has it:
whole characters only), finish_reason "answered". Every cut record is judged again and must be judged the same
(answer, correct, format and every reading), or nothing is written. The directory's config gains
"until_answered": true; the records before the cut are kept beside as results.jsonl.uncut.

    python scripts/cut_when_answered.py /path/to/eval-output
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxytune.engine.bytelevel import ByteTokenizer  # noqa: E402
from proxytune.engine.text import TextTracker  # noqa: E402
from proxytune.evaluation import get_task  # noqa: E402
from proxytune.evaluation.task import Example  # noqa: E402


def cut(record: dict, task) -> dict:
    """The record the rule would have written (the same record when the rule would not have cut it)."""
    if record.get("level") != "bytes":
        raise SystemExit(f"{record['id']} ({record['role']}) was decoded over tokens: this script replays bytes only")
    tracker = TextTracker(ByteTokenizer(), task.stop)
    for n, byte in enumerate(record["token_ids"], 1):
        tracker.add(byte)
        if task.settled(tracker.text):
            # the same token ending the row by its budget or a stop string: it ended as it did
            if tracker.stopped or (n == len(record["token_ids"]) and record["finish_reason"] == "length"):
                return record
            example = Example(record["id"], record["prompt"], record["gold"])
            new = {**record, "output": tracker.text, **task.judge(example, tracker.text), "finish_reason": "answered",
                   "new_tokens": n, "token_ids": record["token_ids"][:n]}
            same = all(new[k] == record[k] for k in task.judge(example, record["output"]))
            readings = all(judge(new) == judge(record) for _, judge in task.readings().values())
            if not (same and readings):
                raise SystemExit(f"{record['id']} ({record['role']}): cut at byte {n} it would be judged otherwise; "
                                 "nothing written")
            return new
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    args = parser.parse_args()
    directory = Path(args.directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("until_answered"):
        print(f"{directory} is already decoded under --until-answered")
        return 0
    task = get_task(config["task"])
    records = [json.loads(line) for line in (directory / "results.jsonl").read_text().splitlines() if line.strip()]
    new = [cut(record, task) for record in records]
    (directory / "results.jsonl.uncut").write_text((directory / "results.jsonl").read_text())
    (directory / "results.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
    (directory / "config.json").write_text(json.dumps({**config, "until_answered": True}, indent=2) + "\n")
    changed = [r for r, o in zip(new, records) if r is not o]
    saved = sum(o["new_tokens"] - r["new_tokens"] for r, o in zip(new, records))
    print(f"{len(changed)} of {len(records)} records cut where their answer settled ({saved} bytes fewer), each "
          f"judged as before; config: until_answered")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
