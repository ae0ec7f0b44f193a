"""Running a task for every role, resumably, and summarising the results.

Examples go in chunks; within a chunk every role runs before the next chunk starts, so a run that
is stopped early still compares the roles on the same examples. Each (example, role) is written to
results.jsonl the moment its decoding row finishes.
"""
from __future__ import annotations

import zlib
from typing import Callable, Sequence

from ..errors import ProxyTuneError
from .records import ResultStore
from .roles import Role, RoleRunner
from .stats import accuracy, gap_closed, gap_closed_interval, paired
from .task import Example


def check_limit(limit) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ProxyTuneError(f"--limit must be a positive number of examples, got {limit!r}")
    return limit


def sample_seed(example_id: str, sample: int) -> int:
    # Fixed per example and sample, whatever the chunking: a resumed run draws the same samples.
    return zlib.crc32(f"{example_id}/{sample}".encode())


def evaluate(runner: RoleRunner, task, roles: Sequence[Role], store: ResultStore, limit: int | None = None,
             batch_size: int = 8, progress: bool = True, until_answered: bool = False) -> dict:
    """Every role on every example not done yet, appended to `store` as it finishes; the summary.
    until_answered: a row ends as soon as `task.settled` says nothing it writes next can change its judgement
    (finish_reason "answered"): the same judgements, without paying for what a model rambles after its answer."""
    limit = check_limit(limit)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ProxyTuneError(f"batch size must be >= 1, got {batch_size!r}")
    examples = task.examples(limit)
    if not examples:
        raise ProxyTuneError(f"task {task.name} has no examples")
    check_level(store, runner.level)
    done = store.done()
    units = len(examples) * len(roles)
    bar = _progress_bar(units, units - pending(examples, roles, store), task.name, progress)
    # Chunks of several batches keep continuous batching busy; every role finishes a chunk before the next.
    # One role needs no chunks: a chunk's end leaves the batch to its longest rows alone.
    per_chunk = len(examples) if len(roles) == 1 else max(1, 4 * batch_size // (1 + task.samples))

    def write(record: dict) -> None:
        store.append(record)
        bar.update(1)

    try:
        for start in range(0, len(examples), per_chunk):
            chunk = examples[start:start + per_chunk]
            if task.kind == "choice":  # one forward per model serves every role
                choose_options(runner, task, roles, chunk, done, write)
                continue
            for role in roles:
                waiting = [ex for ex in chunk if (ex.id, role.name) not in done]
                if waiting:
                    generate(runner, task, role, waiting, write, batch_size, until_answered)
    finally:
        bar.close()
    return summarize(task, roles, store.records, [ex.id for ex in examples])


def pending(examples: Sequence[Example], roles: Sequence[Role], store: ResultStore) -> int:
    """How many (example, role) pairs have no result yet: none, and a run needs no model."""
    done = store.done()
    return sum((ex.id, role.name) not in done for ex in examples for role in roles)


def check_level(store: ResultStore, level: str) -> None:
    """Results decoded over bytes and over tokens are different decodings (greedy differs, lengths count
    other units): one directory holds one level. Records written before levels were recorded are unknown."""
    other = {r["level"] for r in store.records if r.get("level") not in (None, level)}
    if other:
        fix = ("--byte-level: the trio's vocabularies differ, and --roles base alone loads only the base"
               if level == "tokens" else "--token-level, or choose another --output")
        raise ProxyTuneError(f"{store.directory} holds results decoded over {other.pop()}, but this run decodes over "
                             f"{level}; add {fix}")


def choose_options(runner: RoleRunner, task, roles: Sequence[Role], examples: Sequence[Example],
                   done: set, write: Callable[[dict], None]) -> None:
    for example in examples:
        pending = [role for role in roles if (example.id, role.name) not in done]
        if not pending:
            continue
        options = task.options(example)
        scores = runner.score(pending, [(example.prompt, option) for option in options])
        for role in pending:
            picked = max(range(len(options)), key=scores[role.name].__getitem__)
            write({"id": example.id, "role": role.name, "alpha": role.alpha, "level": runner.level,
                   "prompt": example.prompt, "output": options[picked], "answer": picked, "gold": example.gold,
                   "correct": picked == example.gold, "option_logprobs": scores[role.name]})


def generate(runner: RoleRunner, task, role: Role, examples: Sequence[Example],
             write: Callable[[dict], None], batch_size: int, until_answered: bool = False) -> None:
    """Continuous batching: a row that finishes is replaced by the next request at once, so short answers
    do not wait for the longest one in their batch."""
    requests, owners, first_row = [], [], {}
    for example in examples:
        first_row[example.id] = len(requests)
        options = dict(max_new_tokens=task.max_new_tokens, stop=task.stop, label=example.id)
        requests.append(runner.request(role, example.prompt, **options))
        owners.append(example)
        for sample in range(task.samples):
            requests.append(runner.request(role, example.prompt, temperature=task.temperature, top_p=task.top_p,
                                           seed=sample_seed(example.id, sample), **options))
            owners.append(example)
    decoding = runner.decoding(role, requests[:batch_size])
    queued = batch_size
    open_rows = {ex.id: 1 + task.samples for ex in examples}
    for events in decoding.steps():
        for event in events:
            if event.finish_reason is None:
                # the row's whole text (a stream's delta holds back what could begin a stop string)
                if not (until_answered and task.settled(decoding.output(event.row).text)):
                    continue
                decoding.cancel([event.row], "answered")  # it leaves the batch at the next step
            example = owners[event.row]
            if event.finish_reason == "error":  # not an answer: leave it unrecorded so a rerun retries it
                raise ProxyTuneError(f"{role.title} failed on {example.id}: {event.error}")
            open_rows[example.id] -= 1
            if open_rows[example.id] == 0:
                first = first_row[example.id]
                write(_generation_record(task, role, example, runner.level,
                                         [decoding.take(i) for i in range(first, first + 1 + task.samples)]))
        running = decoding.running
        if queued < len(requests) and running < batch_size:
            decoding.add(requests[queued:queued + batch_size - running])
            queued += batch_size - running


def _generation_record(task, role: Role, example: Example, level: str, outputs) -> dict:
    greedy = outputs[0]
    record = {"id": example.id, "role": role.name, "alpha": role.alpha, "level": level, "prompt": example.prompt,
              "output": greedy.text, **task.judge(example, greedy.text), "gold": example.gold,
              "finish_reason": greedy.finish_reason, "new_tokens": len(greedy.token_ids),
              "token_ids": greedy.token_ids}  # lets `analyze` re-score the exact tokens
    if task.samples:
        record["samples"] = [{"output": o.text, **task.judge(example, o.text)} for o in outputs[1:]]
    return record


def summarize(task, roles: Sequence[Role], records: list[dict], example_ids: Sequence[str]) -> dict:
    """Numbers over the examples every role has finished (paired comparison)."""
    wanted = set(example_ids)
    by_role: dict[str, dict[str, dict]] = {role.name: {} for role in roles}
    for record in records:
        if record["id"] in wanted and record["role"] in by_role:
            by_role[record["role"]][record["id"]] = record
    complete = [i for i in example_ids if all(i in by_role[r.name] for r in roles)]
    summary = {"task": task.name, "examples": len(complete), "examples_requested": len(example_ids),
               **_reading(roles, by_role, complete, lambda record: record["correct"])}
    for role in roles:
        summary["roles"][role.name].update(task.summarize([by_role[role.name][i] for i in complete]))
    readings = {name: {"description": description, **_reading(roles, by_role, complete, judge)}
                for name, (description, judge) in task.readings().items()}
    return summary | ({"readings": readings} if readings else {})


def _reading(roles: Sequence[Role], by_role: dict, complete: Sequence[str], judge) -> dict:
    """Every role's accuracy with its interval, paired tests and gap closed, judging each record by `judge`."""
    results = {role.name: [bool(judge(by_role[role.name][i])) for i in complete] for role in roles}
    entries = {}
    for role in roles:
        entry = {"title": role.title, "alpha": role.alpha, **accuracy(results[role.name])}
        if role.kind != "base" and "base" in by_role:
            versus = paired(results[role.name], results["base"])
            entry["fixed_vs_base"], entry["broken_vs_base"] = versus["fixed"], versus["broken"]
            entry["mcnemar_p_vs_base"] = versus["mcnemar_p"]
        entries[role.name] = entry
    _add_gap_closed(entries, roles, results)
    # every pair of roles on the same examples: fixed and broken, McNemar's exact p (issue: paired statistics)
    return {"roles": entries, "paired": [{"role": a.name, "versus": b.name, **paired(results[a.name], results[b.name])}
                                         for k, a in enumerate(roles) for b in roles[:k]]}


def _add_gap_closed(entries: dict, roles: Sequence[Role], results: dict[str, list]) -> None:
    if "tuned" not in entries or "base" not in entries or entries["base"]["accuracy"] is None:
        return
    base, tuned = entries["base"]["accuracy"], entries["tuned"]["accuracy"]
    for role in roles:
        if role.kind == "proxy":
            entries[role.name]["gap_closed"] = gap_closed(entries[role.name]["accuracy"], base, tuned)
            entries[role.name]["gap_closed_ci95"] = gap_closed_interval(results[role.name], results["base"],
                                                                        results["tuned"])


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, name: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"{name} (example × role)", unit="run", dynamic_ncols=True)
