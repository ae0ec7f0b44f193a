"""Dynamic batching: one engine thread runs decoding steps for every request of the server.

Requests wait in a bounded queue (full: 503 + Retry-After), taken in turn from each client (fair_queue.py:
a client that sends many requests cannot starve one that sends few). Between two steps the engine admits
waiting jobs into the running batch of their decoding mode (`Decoding.add`: they are prefilled on their
own and joined; a request's settings name its mode, plain or speculative or auto, the server's --decoding
by default; rows with an α schedule run in a plain batch of their own, since drafts verify several
positions with one α; batches of different modes take steps in turn),
rows that finished leave, and rows whose client went away or whose deadline passed are cancelled,
so they free their slot at the next step. A row's tokens do not depend on who shares its batch.

Prompt scoring (`echo`) runs chunk by chunk between two decoding steps (echo.py), so streams keep
flowing while a long prompt is scored: while rows decode, a chunk is sized (doubled or halved as
measured) to take at most about two decoding steps, so streams keep a third of the engine or more. A
scored job then waits for a decoding slot like any other.

Health: when a model stops answering (a decoding fails with SourceFailure) the server is *degraded*
until a step succeeds again; while degraded, `/health` sends a one-token probe request now and then,
so it recovers without traffic. Shutdown drains: no new requests, running ones get `grace` seconds to
finish, then end with an error they can read.

HTTP handlers live on the asyncio loop; the engine hands them items through each job's
asyncio.Queue (`loop.call_soon_threadsafe`):
  ("prompt", [[TokenLogprob]])          prompt log-probabilities (echo), before any token
  ("events", [(choice, Event), ...])    what this job's rows did at one step
  ("done", [GenerationOutput])          every row finished
  ("error", APIError)                   timeout, shutdown or engine failure; nothing follows
A job whose handler stops taking items (a streaming client that stopped reading) holds at most
MAX_PENDING_ITEMS of them: past that it is cancelled, its rows leave, and its handler is told (`dropped`).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

from ..engine.session import moving_average
from .api_errors import APIError
from .echo import CHUNK, PromptScoring
from .fair_queue import FairQueue
from .schemas import PromptRows

log = logging.getLogger("proxytune.server")

PROBE_EVERY_S = 2.0  # while degraded, /health probes the models at most this often
MAX_PENDING_ITEMS = 256  # items a job's handler has not taken yet: past it, the reader is too slow and dropped


class Job:
    """One HTTP request: n choices for each of its prompts."""

    def __init__(self, prompt_rows: list[PromptRows], loop: asyncio.AbstractEventLoop, timeout: float,
                 echo_top: int | None = None, generates: bool = True, client: str = ""):
        self.prompt_rows = prompt_rows
        self.requests = [r for p in prompt_rows for r in p.requests]
        self.echo_top = echo_top  # None: no prompt logprobs; k: with the k best alternatives
        self.generates = generates  # False: echo with max_tokens 0, scoring only
        self.loop = loop
        self.client = client  # who sent it: fair admission
        self.queue: asyncio.Queue = asyncio.Queue()
        self.dropped = asyncio.Event()  # set when its reader fell MAX_PENDING_ITEMS behind
        self.deadline = time.monotonic() + timeout
        self.cancelled = False  # set by the handler when its client is gone
        self.decoding = None  # the Decoding its rows are in (row indices mean nothing in another one)
        self.rows: list[int] = []  # row indices in `decoding`
        self.unfinished = 0
        self.scoring: PromptScoring | None = None  # echo: the prompt scoring in progress

    def emit(self, item) -> None:
        if self.queue.qsize() >= MAX_PENDING_ITEMS and not self.cancelled:  # nobody takes them: a stalled reader
            self.cancelled = True
            item = ("error", APIError(503, f"the client fell {MAX_PENDING_ITEMS} steps behind reading this response: "
                                           f"it was dropped", code="reader_too_slow"))
            self._call(self.dropped.set)
        self._call(self.queue.put_nowait, item)

    def _call(self, function, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def cancel(self) -> None:
        self.cancelled = True


class Run:
    """One running decoding: its steps, and which job and choice each of its rows belongs to."""

    def __init__(self, decoding):
        self.decoding = decoding
        self.steps = decoding.steps()
        self.owner: dict[int, tuple[Job, int]] = {}  # row -> (job, choice index)


def run_key(job: Job) -> str:
    """Which running batch a job's rows join: its mode's ("scheduled" for rows whose α changes by position)."""
    settings = job.requests[0].settings
    return "scheduled" if settings.alpha_schedule else settings.mode


class Scheduler:
    def __init__(self, tuner, max_batch: int = 32, max_queue: int = 64, request_timeout: float = 600.0):
        self.tuner = tuner
        self.max_batch, self.max_queue, self.request_timeout = max_batch, max_queue, request_timeout
        self.waiting = FairQueue()
        self.condition = threading.Condition()
        self.runs: dict[str, Run] = {}  # run_key -> the running batch of that mode
        self.running_jobs: list[Job] = []
        self.stopping = False
        self.counts = collections.Counter(dict.fromkeys(  # reported by /health
            ("finished_rows", "cancelled_rows", "failed_rows", "timed_out", "rejected"), 0))
        self.scoring: collections.deque[Job] = collections.deque()  # echo jobs, scored a chunk per step in turn
        self.degraded: str | None = None  # why a model is not answering, while it is not
        self.last_probe = 0.0
        self.probe_request = None  # built on first use: a one-token request over every role
        self.drain_deadline: float | None = None  # set on shutdown: running jobs end with an error after it
        self.step_seconds: float | None = None  # a decoding step, as measured
        self.score_size = 8  # prompt positions per scoring chunk while rows decode: adapted to take <= 2 steps
        self.thread = threading.Thread(target=self._loop, name="proxytune-engine", daemon=True)

    # --- the asyncio side --------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join(timeout=10)

    def submit(self, prompt_rows: list[PromptRows], echo_top: int | None = None, generates: bool = True,
               client: str = "") -> Job:
        job = Job(prompt_rows, asyncio.get_running_loop(), self.request_timeout, echo_top, generates, client)
        with self.condition:
            if self.drain_deadline is not None:
                raise APIError(503, "the server is shutting down; retry on another replica or after it restarts",
                               code="server_shutting_down")
            if len(self.waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                raise APIError(503, f"the server is busy ({len(self.waiting)} requests waiting); retry shortly",
                               code="queue_full", headers={"Retry-After": "1"})
            share = max(1, self.max_queue // 2)  # one client cannot fill the queue for everyone else
            if self.waiting.waiting(client) >= share:
                self.counts["rejected"] += 1
                raise APIError(429, f"you have {share} requests waiting, the most one client may have queued "
                                    f"(half of --max-queue); retry when one has started", code="too_many_waiting",
                               headers={"Retry-After": "1"})
            self.waiting.append(job)
            self.condition.notify()
        return job

    def drain(self, grace: float) -> None:
        """Shutting down: refuse new requests; running ones have `grace` seconds, then end with an error."""
        with self.condition:
            if self.drain_deadline is None:
                self.drain_deadline = time.monotonic() + grace
            self.condition.notify()

    @property
    def decoding(self):
        """A running decoding (None when no batch runs)."""
        return next((run.decoding for run in self.runs.values()), None)

    @property
    def running_rows(self) -> int:
        return sum(len(run.owner) for run in self.runs.values())

    @property
    def load(self) -> dict:
        return {"running_rows": self.running_rows, "waiting_requests": len(self.waiting),
                "scoring_requests": len(self.scoring), **self.counts}

    def health(self) -> dict:
        """ok / degraded (a model is not answering: the reason) / draining; probes while degraded."""
        if self.drain_deadline is not None:
            return {"status": "draining", **self.load}
        if self.degraded is None:
            return {"status": "ok", **self.load}
        now = time.monotonic()
        if now - self.last_probe >= PROBE_EVERY_S:
            self.last_probe = now
            try:
                self.probe_request = self.probe_request or self.tuner.request("Hello", max_new_tokens=1)
                probe = PromptRows(self.probe_request.prompts["base"], "Hello", [self.probe_request])
                self.submit([probe])  # its outcome updates `degraded`; nobody reads its queue
            except APIError:
                pass  # a full queue: probe next time
        return {"status": "degraded", "reason": self.degraded, **self.load}

    # --- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.stopping and not self.waiting and not self.runs and not self.scoring:
                    self.condition.wait(timeout=1.0)
                if self.stopping:
                    return
            try:
                self._expire_waiting()
                self._end_if_drained()
                self._admit()
                if self.runs:
                    self._step()
                    self._drop_cancelled()
                if self.scoring:
                    self._score_chunk()
            except Exception as error:  # a bug or a model failure: fail these jobs, keep serving
                log.exception("engine step failed")
                self._fail_running(APIError(500, f"the engine failed: {type(error).__name__}: {error}"))

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        with self.condition:
            expired = [j for j in self.waiting.remove(lambda j: j.cancelled or j.deadline <= now) if not j.cancelled]
        for job in expired:
            self.counts["timed_out"] += 1
            job.emit(("error", timeout_error()))

    def _can_join(self, job: Job) -> bool:
        """A waiting job may start now: no batch of its mode is running, or the running one takes rows (every
        session declares join; a source that cannot is served one batch after another)."""
        run = self.runs.get(run_key(job))
        return run is None or run.decoding.accepts_new_rows

    def _admit(self) -> None:
        """Start waiting jobs while the batch has room; one at a time, so that each sees the decoding the
        previous one started (and whether it takes more rows)."""
        while True:
            with self.condition:
                if not self.waiting:
                    return
                job = self.waiting.peek()
                to_score = job.echo_top is not None and job.scoring is None
                running = self.running_rows
                if not to_score and (not self._can_join(job) or (
                        running + len(job.requests) > self.max_batch and running)):
                    return
                self.waiting.pop(job)
            if to_score:  # prompt scoring first, a chunk per step; then it waits for a slot like any job
                prompts = [p.requests[0].prompts for p in job.prompt_rows]
                alphas = [p.requests[0].alphas for p in job.prompt_rows]
                job.scoring = PromptScoring(self.tuner, prompts, alphas, job.echo_top)
                self.scoring.append(job)
                continue
            try:
                self._start(job)
            except Exception as error:
                log.exception("could not start a request")
                job.emit(("error", APIError(500, f"the engine failed: {type(error).__name__}: {error}")))

    def _score_chunk(self) -> None:
        """One chunk of the first scoring job's prompts; the jobs take turns."""
        job = self.scoring.popleft()
        if job.cancelled or job.deadline <= time.monotonic():
            if not job.cancelled:
                self.counts["timed_out"] += 1
                job.emit(("error", timeout_error()))
            return
        sharing = bool(self.runs) and self.step_seconds is not None
        size = self.score_size if sharing else CHUNK
        start = time.perf_counter()
        try:
            scored = job.scoring.step(size)
        except Exception as error:
            log.exception("prompt scoring failed")
            job.emit(("error", APIError(500, f"scoring the prompt failed: {type(error).__name__}: {error}",
                                        code="generation_failed")))
            return
        if sharing:  # a chunk costs at most about two decoding steps: streams keep a third of the engine or more
            elapsed, budget = time.perf_counter() - start, 2 * self.step_seconds
            if elapsed < budget / 2:
                self.score_size = min(CHUNK, 2 * self.score_size)
            elif elapsed > budget:
                self.score_size = max(1, self.score_size // 2)
        if scored is not None:
            self.scoring.append(job)
            return
        job.emit(("prompt", job.scoring.results))
        if not job.generates:
            job.emit(("done", []))
            return
        with self.condition:  # now it decodes: first in line for a slot
            self.waiting.appendleft(job)

    def _start(self, job: Job) -> None:
        if not job.generates:
            job.emit(("done", []))
            return
        key = run_key(job)
        run = self.runs.get(key)
        if run is None:
            run = self.runs[key] = Run(self.tuner.decoding(job.requests, mode="plain" if key == "scheduled" else key))
            new_rows = list(range(len(job.requests)))
        else:
            new_rows = run.decoding.add(job.requests)
        job.decoding, job.rows, job.unfinished = run.decoding, new_rows, len(new_rows)
        run.owner.update({row: (job, choice) for choice, row in enumerate(new_rows)})
        self.running_jobs.append(job)

    def _step(self) -> None:
        """One step of every running batch (one per decoding mode), in turn."""
        for key in list(self.runs):
            self._step_run(key)

    def _step_run(self, key: str) -> None:
        run = self.runs[key]
        start = time.perf_counter()
        events = next(run.steps, None)
        self.step_seconds = moving_average(self.step_seconds, time.perf_counter() - start)
        if events is None:  # every row finished and nobody joined
            self._end_decoding(key)
            return
        by_job: dict[int, list] = {}
        finished: list[Job] = []
        for event in events:
            if event.row not in run.owner:
                continue
            job, choice = run.owner[event.row]
            by_job.setdefault(id(job), [job]).append((choice, event))
            if event.finish_reason == "error":
                self.counts["failed_rows"] += 1
                if run.decoding.failed:  # a model stopped answering (not one row's own trouble)
                    self.degraded = event.error
            elif event.token_id is not None and not run.decoding.failed:
                self.degraded = None  # the models answer again
            if event.finish_reason is not None:
                self.counts["finished_rows"] += 1
                del run.owner[event.row]
                job.unfinished -= 1
                if job.unfinished == 0:
                    finished.append(job)
        for job, *items in by_job.values():
            job.emit(("events", items))
        for job in finished:  # their outputs are handed over: the decoding keeps nothing of them
            job.emit(("done", [run.decoding.take(row) for row in job.rows]))
            self.running_jobs.remove(job)

    def _end_decoding(self, key: str) -> None:
        """The decoding's steps are over: a job of it still waiting for rows would wait forever (a bug of the
        engine, not the client's): it ends with an error now, and no row index of the old decoding survives."""
        decoding = self.runs.pop(key).decoding
        stranded = [job for job in self.running_jobs if job.decoding is decoding]
        if stranded:
            log.error("a decoding ended with %d request(s) unfinished", len(stranded))
        for job in stranded:
            job.emit(("error", APIError(500, "the engine ended this request's batch before its rows finished "
                                             "(a proxytune bug: please report it)")))
            self.running_jobs.remove(job)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        runs = {id(run.decoding): run for run in self.runs.values()}
        for job in [j for j in self.running_jobs if j.cancelled or j.deadline <= now]:
            run = runs[id(job.decoding)]
            live = [row for row in job.rows if row in run.owner]
            run.decoding.cancel(live)
            run.decoding.discard(job.rows)
            for row in live:
                del run.owner[row]
            self.running_jobs.remove(job)
            self.counts["cancelled_rows"] += len(live)
            if not job.cancelled:
                self.counts["timed_out"] += 1
                job.emit(("error", timeout_error()))

    def _end_if_drained(self) -> None:
        """Past the shutdown grace period: every job still here ends with an error event or body."""
        if self.drain_deadline is None or time.monotonic() < self.drain_deadline:
            return
        error = APIError(503, "the server shut down before this request finished", code="server_shutting_down")
        with self.condition:
            waiting = self.waiting.remove(lambda job: True)
        for job in waiting + list(self.scoring):
            job.emit(("error", error))
        self.scoring.clear()
        self._fail_running(error)  # the running decoding is dropped with its rows

    def _fail_running(self, error: APIError) -> None:
        for job in self.running_jobs:
            job.emit(("error", error))
        self.running_jobs, self.runs = [], {}


def timeout_error() -> APIError:
    return APIError(504, "the request ran past the server's --request-timeout", code="timeout")
