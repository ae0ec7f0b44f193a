"""Dynamic batching: one engine thread runs decoding steps for every request of the server.

Requests wait in a bounded queue (full: 503 + Retry-After). Between two steps the engine admits
waiting jobs into the running batch (`Decoding.add`: they are prefilled on their own and joined),
rows that finished leave, and rows whose client went away or whose deadline passed are cancelled,
so they free their slot at the next step. A row's tokens do not depend on who shares its batch.

HTTP handlers live on the asyncio loop; the engine hands them items through each job's
asyncio.Queue (`loop.call_soon_threadsafe`):
  ("prompt", [[TokenLogprob]])          prompt log-probabilities (echo), before any token
  ("events", [(choice, Event), ...])    what this job's rows did at one step
  ("done", [GenerationOutput])          every row finished
  ("error", APIError)                   timeout or engine failure; nothing follows
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

from .api_errors import APIError
from .echo import prompt_logprobs
from .schemas import PromptRows

log = logging.getLogger("proxytune.server")

ROTATE_AFTER_ROWS = 4096  # a Decoding keeps every row's results: start a fresh one now and then


class Job:
    """One HTTP request: n choices for each of its prompts."""

    def __init__(self, prompt_rows: list[PromptRows], loop: asyncio.AbstractEventLoop, timeout: float,
                 echo_top: int | None = None, generates: bool = True):
        self.prompt_rows = prompt_rows
        self.requests = [r for p in prompt_rows for r in p.requests]
        self.echo_top = echo_top  # None: no prompt logprobs; k: with the k best alternatives
        self.generates = generates  # False: echo with max_tokens 0, scoring only
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.deadline = time.monotonic() + timeout
        self.cancelled = False  # set by the handler when its client is gone
        self.rows: list[int] = []  # row indices in the engine's current Decoding
        self.unfinished = 0

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, tuner, max_batch: int = 32, max_queue: int = 64, request_timeout: float = 600.0):
        self.tuner = tuner
        self.max_batch, self.max_queue, self.request_timeout = max_batch, max_queue, request_timeout
        self.waiting: collections.deque[Job] = collections.deque()
        self.condition = threading.Condition()
        self.decoding = None
        self.steps = None
        self.owner: dict[int, tuple[Job, int]] = {}  # row -> (job, choice index)
        self.running_jobs: list[Job] = []
        self.stopping = False
        self.counts = collections.Counter()  # finished_rows, cancelled_rows, timed_out, rejected
        self.thread = threading.Thread(target=self._loop, name="proxytune-engine", daemon=True)

    # --- the asyncio side --------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join(timeout=10)

    def submit(self, prompt_rows: list[PromptRows], echo_top: int | None = None, generates: bool = True) -> Job:
        job = Job(prompt_rows, asyncio.get_running_loop(), self.request_timeout, echo_top, generates)
        with self.condition:
            if len(self.waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                raise APIError(503, f"the server is busy ({len(self.waiting)} requests waiting); retry shortly",
                               code="queue_full", headers={"Retry-After": "1"})
            self.waiting.append(job)
            self.condition.notify()
        return job

    @property
    def load(self) -> dict:
        return {"running_rows": len(self.owner), "waiting_requests": len(self.waiting), **self.counts}

    # --- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.stopping and not self.waiting and self.decoding is None:
                    self.condition.wait(timeout=1.0)
                if self.stopping:
                    return
            try:
                self._expire_waiting()
                self._admit()
                if self.decoding is not None:
                    self._step()
                    self._drop_cancelled()
            except Exception as error:  # a bug or a model failure: fail these jobs, keep serving
                log.exception("engine step failed")
                self._fail_running(APIError(500, f"the engine failed: {type(error).__name__}: {error}"))

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        with self.condition:
            kept = collections.deque(j for j in self.waiting if not j.cancelled and j.deadline > now)
            expired = [j for j in self.waiting if not j.cancelled and j.deadline <= now]
            self.waiting = kept
        for job in expired:
            self.counts["timed_out"] += 1
            job.emit(("error", timeout_error()))

    def _can_join(self) -> bool:
        """A waiting job may start now: no batch is running, or the running one takes rows (every
        session declares join; a source that cannot is served one batch after another)."""
        if self.decoding is None:
            return True
        return len(self.decoding.rows) < ROTATE_AFTER_ROWS and self.decoding.accepts_new_rows

    def _admit(self) -> None:
        """Start waiting jobs while the batch has room; one at a time, so that each sees the decoding the
        previous one started (and whether it takes more rows)."""
        while True:
            with self.condition:
                if not self.waiting or not self._can_join():
                    return
                job = self.waiting[0]
                if len(self.owner) + len(job.requests) > self.max_batch and self.owner:
                    return
                self.waiting.popleft()
            try:
                self._start(job)
            except Exception as error:
                log.exception("could not start a request")
                job.emit(("error", APIError(500, f"the engine failed: {type(error).__name__}: {error}")))

    def _start(self, job: Job) -> None:
        if job.echo_top is not None:
            prompts = [p.requests[0].prompts for p in job.prompt_rows]
            alphas = [p.requests[0].alphas for p in job.prompt_rows]
            job.emit(("prompt", prompt_logprobs(self.tuner, prompts, alphas, job.echo_top)))
        if not job.generates:
            job.emit(("done", []))
            return
        if self.decoding is None:
            self.decoding = self.tuner.decoding(job.requests)
            self.steps = self.decoding.steps()
            new_rows = list(range(len(job.requests)))
        else:
            new_rows = self.decoding.add(job.requests)
        job.rows, job.unfinished = new_rows, len(new_rows)
        self.owner.update({row: (job, choice) for choice, row in enumerate(new_rows)})
        self.running_jobs.append(job)

    def _step(self) -> None:
        events = next(self.steps, None)
        if events is None:  # every row finished and nobody joined
            self.decoding = self.steps = None
            return
        by_job: dict[int, list] = {}
        finished: list[Job] = []
        for event in events:
            if event.row not in self.owner:
                continue
            job, choice = self.owner[event.row]
            by_job.setdefault(id(job), [job]).append((choice, event))
            if event.finish_reason is not None:
                self.counts["finished_rows"] += 1
                del self.owner[event.row]
                job.unfinished -= 1
                if job.unfinished == 0:
                    finished.append(job)
        for job, *items in by_job.values():
            job.emit(("events", items))
        for job in finished:
            job.emit(("done", [self.decoding.output(row) for row in job.rows]))
            self.running_jobs.remove(job)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for job in [j for j in self.running_jobs if j.cancelled or j.deadline <= now]:
            live = [row for row in job.rows if row in self.owner]
            self.decoding.cancel(live)
            for row in live:
                del self.owner[row]
            self.running_jobs.remove(job)
            self.counts["cancelled_rows"] += len(live)
            if not job.cancelled:
                self.counts["timed_out"] += 1
                job.emit(("error", timeout_error()))

    def _fail_running(self, error: APIError) -> None:
        for job in self.running_jobs:
            job.emit(("error", error))
        self.running_jobs, self.owner = [], {}
        self.decoding = self.steps = None


def timeout_error() -> APIError:
    return APIError(504, "the request ran past the server's --request-timeout", code="timeout")
