"""An evaluation's output directory: config.json, results.jsonl (one line per example and role,
appended as each finishes) and summary.json.

Rerunning the same command resumes: finished (example, role) pairs are never recomputed. A directory
made with a different configuration is refused, naming the setting that differs, so results of two
configurations are never mixed.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from ..errors import ProxyTuneError
from ..outputs import hold

CONFIG = "config.json"
RESULTS = "results.jsonl"
PACKED = "results.jsonl.gz"  # how results/ keeps a finished evaluation's records
SUMMARY = "summary.json"


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} there, {new!r} now"]


def with_anchor(old: dict, new: dict) -> dict:
    """`old`, a configuration without an anchor, with the anchor of `new` (and its adapter's digest) added."""
    config = {**old, "tuned": new["tuned"]}
    if "tuned" in new.get("adapters", {}):
        config["adapters"] = {**old.get("adapters", {}), "tuned": new["adapters"]["tuned"]}
    return config


def _spec(config: dict, role: str):
    return config.get("tuned") if role == "tuned" else (config.get("models") or {}).get(role)


def with_absent_adapters(old: dict, new: dict) -> dict:
    """`new`, with the digests `old` recorded for adapters this machine lacks (the same spec, no digest now).
    What is not here cannot write a row: the run goes on with the roles it can load (the anchor's, say, on a
    machine without the expert), and one that needs the missing adapter fails when it loads it."""
    absent = {role: digest for role, digest in (old.get("adapters") or {}).items()
              if role not in (new.get("adapters") or {}) and _spec(old, role) == _spec(new, role)}
    return {**new, "adapters": {**new.get("adapters", {}), **absent}} if absent else new


class ResultStore:
    def __init__(self, directory, config: dict):
        self.directory = Path(directory)
        self.config = json.loads(json.dumps(config))  # as it will read back from disk
        self.results_path = self.directory / RESULTS
        self._check_or_write_config()
        self._lock = hold(self.directory)  # a second run on this output would append every row again
        self._unpack()
        self._records = self._read_results()

    def _check_or_write_config(self) -> None:
        config_path = self.directory / CONFIG
        if self.directory.exists() and not self.directory.is_dir():
            raise ProxyTuneError(f"output {self.directory} is a file, not a directory")
        if config_path.exists():
            try:
                old = json.loads(config_path.read_text())
            except json.JSONDecodeError as error:
                raise ProxyTuneError(f"{config_path} is not valid JSON ({error}); choose another --output") from error
            self.config = with_absent_adapters(old, self.config)
            # The anchor is often trained after the first run: adding it keeps every result made without it.
            adds_anchor = old.get("tuned") is None and self.config.get("tuned") is not None
            differing = _differences(with_anchor(old, self.config) if adds_anchor else old, self.config)
            if differing:
                raise ProxyTuneError(f"{self.directory} holds results of a different configuration "
                                     f"({'; '.join(differing)}); choose another --output to keep both")
            if adds_anchor:
                config_path.write_text(json.dumps(self.config, indent=2) + "\n")
            return
        if self.directory.exists() and any(self.directory.iterdir()):
            raise ProxyTuneError(f"{self.directory} is not empty and has no {CONFIG}: not an evaluation output "
                                 f"directory; choose another --output")
        self.directory.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(self.config, indent=2) + "\n")

    def _unpack(self) -> None:
        """A finished evaluation results/ keeps gzipped goes on from its records: they are unpacked beside it."""
        packed = self.directory / PACKED
        if packed.exists() and not self.results_path.exists():
            self.results_path.write_bytes(gzip.decompress(packed.read_bytes()))

    def _read_results(self) -> list[dict]:
        if not self.results_path.exists():
            return []
        raw = self.results_path.read_bytes()
        records, good_end = _finished_records(raw)
        if good_end < len(raw):  # what a kill cut short is dropped, and recomputed
            with open(self.results_path, "r+b") as handle:
                handle.truncate(good_end)
        return records

    @property
    def records(self) -> list[dict]:
        return list(self._records)

    def done(self) -> set[tuple[str, str]]:
        return {(r["id"], r["role"]) for r in self._records}

    def append(self, record: dict) -> None:
        with open(self.results_path, "a") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._records.append(record)

    def write_summary(self, summary: dict) -> Path:
        path = self.directory / SUMMARY
        path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        return path


def read_records(directory) -> list[dict]:
    """An evaluation's records, read only: its results.jsonl (a last line cut short by a kill is left out), or the
    gzipped copy results/ keeps of a finished one."""
    directory = Path(directory)
    plain, packed = directory / RESULTS, directory / PACKED
    if plain.exists():
        return _finished_records(plain.read_bytes())[0]
    if packed.exists():
        return _finished_records(gzip.decompress(packed.read_bytes()))[0]
    raise ProxyTuneError(f"{directory} has no {RESULTS} (or {PACKED}): not an evaluation output directory")


def _finished_records(raw: bytes) -> tuple[list[dict], int]:
    """The records of results.jsonl's bytes up to the first line a kill cut short mid-write (no newline, or not
    JSON), and the offset where they end."""
    records, end = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        end += len(line)
    return records, end


# what every role's rows depend on, and what each role's rows depend on besides (a dotted key reads into a dict);
# "adapters" holds the digest of each role's adapter weights, so a registered name that now ships other weights
# is not mistaken for the one that made the rows
SHARED_SETTINGS = ("task", "task_settings", "dtype", "until_answered", "backend", "prune", "place")
ROLE_SETTINGS = {"base": ("models.base", "adapters.base"),
                 "expert": ("models.expert", "adapters.expert"),
                 "tuned": ("models.base", "adapters.base", "tuned", "adapters.tuned"),
                 "proxy": ("models", "adapters.base", "adapters.expert", "adapters.anti_expert", "config")}


def _setting(config: dict, dotted: str):
    value = config
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def import_eval_results(store: ResultStore, eval_dir) -> tuple[int, dict[str, str]]:
    """Copy an `eval` run's results into this store (a sweep's or another eval's), role by role: base, expert and
    tuned rows as they are when the settings they depend on agree (the base's model for the base, and so on), its
    proxy rows as proxy@α into a sweep, as proxy into an eval with the same α and α schedule (another schedule
    decodes the proxy differently). Settings every role depends on (task, budget, dtype) must agree.
    Returns (rows added, {role: why its rows were not copied})."""
    source = Path(eval_dir)
    config_path = source / CONFIG
    if not config_path.exists():
        raise ProxyTuneError(f"{source} has no {CONFIG}: not an evaluation output directory")
    config = json.loads(config_path.read_text())
    if config.get("command") != "eval":
        raise ProxyTuneError(f"{source} is not the output of `proxytune eval`")
    differing = _differences({k: config.get(k) for k in SHARED_SETTINGS},
                             {k: store.config.get(k) for k in SHARED_SETTINGS})
    if differing:
        raise ProxyTuneError(f"cannot reuse {source}: other settings ({'; '.join(differing)})")
    skipped = {}
    for role, keys in ROLE_SETTINGS.items():
        differing = _differences({k: _setting(config, k) for k in keys}, {k: _setting(store.config, k) for k in keys})
        if role == "proxy" and store.config.get("command") == "eval":
            differing += _differences({k: config.get(k) for k in ("alpha", "alpha_schedule")},
                                      {k: store.config.get(k) for k in ("alpha", "alpha_schedule")})
        if differing:
            skipped[role] = "; ".join(differing)
    proxy = "proxy" if store.config.get("command") == "eval" else f"proxy@{config['alpha']:g}"
    done, records = store.done(), read_records(source)
    added = 0
    for record in records:
        role = proxy if record["role"] == "proxy" else record["role"]
        if record["role"] in skipped or role == "proxy@0" or (record["id"], role) in done:
            continue
        store.append({**record, "role": role})
        added += 1
    present = {record["role"] for record in records}
    return added, {role: why for role, why in skipped.items() if role in present}
