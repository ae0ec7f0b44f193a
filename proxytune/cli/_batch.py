"""`generate --input prompts.jsonl --output out.jsonl`: an offline batch, as vLLM and lm-eval users run them.

Each input line is a JSON object: {"prompt": "..."} or {"messages": [...]}, an optional "id" (default: the
line number), and any of the per-row settings below (the command's flags are the defaults). Rows decode
with continuous batching (a finished row's place goes to the next one at once) and each is appended to
the output as it finishes, with its id, text, finish reason and token counts. Rerunning the same command
resumes: rows already in the output with a result are skipped; a row that failed is tried again.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ProxyTuneError

ROW_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "alpha",
                "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias", "response_format")


def read_rows(path: Path) -> list[dict]:
    from ..jsonlines import json_lines

    rows, ids = [], set()
    for number, row in json_lines(path, "--input"):
        if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
            raise ProxyTuneError(f"--input {path}, line {number}: give an object with \"prompt\" or \"messages\"")
        unknown = sorted(set(row) - {"id", "prompt", "messages", *ROW_SETTINGS})
        if unknown:
            raise ProxyTuneError(f"--input {path}, line {number}: unknown field {unknown[0]!r}; a row may set "
                                 f"id, prompt or messages, {', '.join(ROW_SETTINGS)}")
        row.setdefault("id", str(number))
        if row["id"] in ids:
            raise ProxyTuneError(f"--input {path}, line {number}: id {row['id']!r} appears twice")
        ids.add(row["id"])
        row["line"] = number
        rows.append(row)
    if not rows:
        raise ProxyTuneError(f"--input {path} has no rows")
    return rows


def finished_ids(path: Path) -> set:
    """Ids the output already holds a result for (a last line cut short by a kill is dropped)."""
    if not path.exists():
        return set()
    done, good = set(), 0
    raw = path.read_bytes()
    for line in raw.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith(b"\n"):
            break
        good += len(line)
        if record.get("finish_reason") != "error":
            done.add(record["id"])
    if good < len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(good)
    return done


def run_batch(tuner, args, defaults: dict, chat_roles) -> int:
    from tqdm import tqdm

    rows = read_rows(Path(args.input))
    output = Path(args.output)
    done = finished_ids(output)
    todo = [row for row in rows if row["id"] not in done]
    requests = []
    for row in todo:  # every row is checked before any decoding starts
        settings = {**defaults, **{key: row[key] for key in ROW_SETTINGS if key in row}}
        try:
            if "messages" in row:
                requests.append(tuner.request(messages=row["messages"], chat_roles=chat_roles,
                                              label=f"line {row['line']}", **settings))
            else:
                requests.append(tuner.request(row["prompt"], label=f"line {row['line']}", **settings))
        except ProxyTuneError as error:
            raise ProxyTuneError(f"--input {args.input}, line {row['line']}: {error}") from None
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="generate", unit="row")

    def write(out, index: int, result) -> None:
        record = {"id": todo[index]["id"], "text": result.text, "finish_reason": result.finish_reason,
                  "prompt_tokens": len(requests[index].prompts["base"]), "completion_tokens": len(result.token_ids)}
        if result.error:
            record["error"] = result.error
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        bar.update(1)

    with open(output, "a") as out:
        queued = 0
        while queued < len(requests):  # one decoding, rows joining as others finish (a new one if it cannot)
            first = queued
            queued = min(len(requests), queued + args.batch_size)
            decoding = tuner.decoding(requests[first:queued], speculative=args.speculative)
            rows_of = list(range(first, queued))  # decoding row -> request index
            for events in decoding.steps():
                for event in events:
                    if event.finish_reason is not None:
                        write(out, rows_of[event.row], decoding.output(event.row))
                room = args.batch_size - decoding.running
                if queued < len(requests) and room > 0 and decoding.accepts_new_rows:
                    decoding.add(requests[queued:queued + room])
                    rows_of += range(queued, min(len(requests), queued + room))
                    queued = min(len(requests), queued + room)
    bar.close()
    return 0
