"""`generate --input prompts.jsonl --output out.jsonl`: an offline batch, as vLLM and lm-eval users run them.

Each input line is a JSON object: {"prompt": "..."} or {"messages": [...]}, an optional "id" (default: the
line number), and any of the per-row settings below (the command's flags are the defaults). Rows decode
with continuous batching (a finished row's place goes to the next one at once) and each is appended to
the output as it finishes, with its id, text, finish reason and token counts. Rerunning the same command
resumes: rows already in the output with a result are skipped; a row that failed is tried again.

Nothing is destroyed: an existing output that is not this command's results (a line that is not one of its
records) or that is the input itself is refused, not truncated; a second run on an output another run is
writing is refused (outputs.exclusive). Rows are checked (types, ranges) with their line numbers before any
model loads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine.settings import MODES, Settings
from ..errors import ProxyTuneError, validation_problem
from ..facade.tuner import by_mode

ROW_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "alpha",
                "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias", "response_format",
                "decoding")


Finite = Annotated[float, Field(allow_inf_nan=False)]


class Row(BaseModel):
    """One input line, typed (strict: no "8" for 8, no true for 1); the engine checks the ranges it owns."""
    model_config = ConfigDict(extra="forbid", strict=True)
    id: Union[str, int, None] = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: Finite | None = None
    top_p: Finite | None = None
    top_k: int | None = Field(None, ge=0)
    min_p: Finite | None = None
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    stop: Union[str, list[str], None] = None
    alpha: Union[Finite, list[Finite], None] = None
    repetition_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    presence_penalty: Finite | None = None
    logit_bias: dict[str, Finite] | None = None
    response_format: dict[str, Any] | None = None
    decoding: Literal[MODES] | None = None


def check_row(row, path: Path, number: int, defaults: Settings) -> Settings:
    """The row's Settings: the command's flags with the row's own fields over them."""
    where = f"--input {path}, line {number}"
    if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
        raise ProxyTuneError(f"{where}: give an object with \"prompt\" or \"messages\"")
    unknown = sorted(set(row) - {"id", "prompt", "messages", *ROW_SETTINGS})
    if unknown:
        raise ProxyTuneError(f"{where}: unknown field {unknown[0]!r}; a row may set id, prompt or messages, "
                             f"{', '.join(ROW_SETTINGS)}")
    try:
        Row.model_validate(row)
    except ValidationError as error:
        raise ProxyTuneError(f"{where}: {validation_problem(error)}") from None
    options = {key: row[key] for key in ROW_SETTINGS if row.get(key) is not None}
    if "decoding" in options:
        options["mode"] = options.pop("decoding")
    try:
        return defaults.with_options(**options)
    except ProxyTuneError as error:
        raise ProxyTuneError(f"{where}: {error}") from None


def read_rows(path: Path, defaults: Settings) -> list[dict]:
    """The rows of a batch file, each with its "settings" (check_row), checked before any model loads."""
    from ..jsonlines import json_lines

    rows, ids = [], set()
    for number, row in json_lines(path, "--input"):
        settings = check_row(row, path, number, defaults)
        if row.get("id") is None:
            row["id"] = str(number)
        if row["id"] in ids:
            raise ProxyTuneError(f"--input {path}, line {number}: id {row['id']!r} appears twice")
        ids.add(row["id"])
        row["line"], row["settings"] = number, settings
        rows.append(row)
    if not rows:
        raise ProxyTuneError(f"--input {path} has no rows")
    return rows


RECORD_KEYS = {"id", "text", "finish_reason", "prompt_tokens", "completion_tokens"}


def record_of(line: bytes) -> dict | None:
    """The result a line of the output holds, or None when it is not one of this command's records."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and RECORD_KEYS <= set(record) else None


def finished_ids(path: Path) -> set:
    """Ids the output already holds a result for (a last line cut short by a kill is dropped). An output that
    is not this command's results is refused whole: nothing of it is truncated."""
    if not path.exists():
        return set()
    if not path.is_file():
        raise ProxyTuneError(f"--output {path} is not a file; choose a JSONL path")
    done, good = set(), 0
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        record = record_of(line)
        if not line.endswith(b"\n") and number == len(lines):  # the last line, cut short by a kill
            break
        if record is None:
            raise ProxyTuneError(f"--output {path} exists and line {number} is not a result of generate --input: "
                                 f"it is not this command's output, so it is left as it is; choose another --output")
        good += len(line)
        if record["finish_reason"] != "error":
            done.add(record["id"])
    if good < len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(good)
    return done


def check_output(input_path: Path, output: Path) -> None:
    """Before any model loads: the output is not the input, and holds this command's results or nothing."""
    if output.exists() and input_path.exists() and output.resolve() == input_path.resolve():
        raise ProxyTuneError(f"--output {output} is the --input file: results would be appended to the prompts; "
                             f"choose another --output")
    if output.exists():
        with open(output, "rb") as handle:
            first = handle.readline()
        if first.strip() and record_of(first) is None:
            raise ProxyTuneError(f"--output {output} exists and is not a results file of generate --input (its first "
                                 f"line is not one of its records): it is left as it is; choose another --output")


def run_batch(tuner, args, rows: list[dict], chat_roles) -> int:
    from ..outputs import exclusive

    with exclusive(args.output):
        return _run_batch(tuner, args, rows, chat_roles)


def _run_batch(tuner, args, rows: list[dict], chat_roles) -> int:
    from tqdm import tqdm

    output = Path(args.output)
    check_output(Path(args.input), output)
    done = finished_ids(output)
    todo = [row for row in rows if row["id"] not in done]
    requests = []
    for row in todo:  # every row is checked before any decoding starts
        try:
            if "messages" in row:
                requests.append(tuner.request(messages=row["messages"], chat_roles=chat_roles,
                                              label=f"line {row['line']}", settings=row["settings"]))
            else:
                requests.append(tuner.request(row["prompt"], label=f"line {row['line']}", settings=row["settings"]))
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
        for group in by_mode(requests, None):  # a decoding per mode the rows ask for
            decode(tuner, group, args.batch_size, lambda index, result: write(out, index, result))
    bar.close()
    return 0


def decode(tuner, group: list[tuple[int, Any]], batch_size: int, write) -> None:
    """(index, request) pairs in one decoding, rows joining as others finish (a new decoding if it cannot);
    write(index, output) as each finishes."""
    queued = 0
    while queued < len(group):
        first = queued
        queued = min(len(group), queued + batch_size)
        decoding = tuner.decoding([request for _, request in group[first:queued]])
        rows_of = [index for index, _ in group[first:queued]]  # decoding row -> request index
        for events in decoding.steps():
            for event in events:
                if event.finish_reason is not None:
                    write(rows_of[event.row], decoding.take(event.row))
            room = batch_size - decoding.running
            if queued < len(group) and room > 0 and decoding.accepts_new_rows:
                joining = group[queued:queued + room]
                decoding.add([request for _, request in joining])
                rows_of += [index for index, _ in joining]
                queued += len(joining)
