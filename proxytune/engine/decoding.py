"""Proxy-tuned decoding as a generator of steps: the one decoding loop of proxytune.

`Decoding.steps()` prefills every role, then repeatedly chooses tokens for the running rows from
the combined logits, feeds them to every role and yields what happened. Between two steps `add()`
lets new requests join (continuous batching) and `cancel()` ends rows. A *round* is how tokens are
proposed: one token per row (here), or a draft verified in one forward (`speculative.py`); admission,
row selection, cancellation and failure handling are the same for both. `generate`, `stream`, the
CLI, the server and the evaluations all consume these steps.
"""
from __future__ import annotations

import logging
import math
from typing import Generator, Iterator, Sequence

import torch

from ..backends.protocol import LogitSource
from ..errors import ProxyTuneError, RowFailure, SourceFailure
from .context import room_left
from .roles import ExpertPair, Roles
from .rows import Event, GenerationOutput, Request, RowState, StepDetail, unusable_rows
from .sampling import choose
from .session import ProxySession, StepTimes

__all__ = ["Decoding", "Event", "GenerationOutput", "Request", "RowState", "StepDetail", "open_session",
           "token_budget"]  # a row's types live in rows.py; the decoding hands them on

log = logging.getLogger("proxytune.engine")


def token_budget(request: Request, sources: dict[str, LogitSource]) -> int:
    """How many tokens fit in every role's context after its prompt."""
    room = room_left(request.prompts, sources)
    return request.settings.max_new_tokens if room == math.inf else int(room)


def open_session(base: LogitSource, pairs: Sequence[ExpertPair], requests: Sequence[Request],
                 times: StepTimes | None = None) -> ProxySession:
    prompts = {role: [r.prompts[role] for r in requests] for role in Roles(len(pairs))}
    alphas = torch.tensor([r.alphas_at(0) for r in requests], dtype=torch.float32).reshape(len(requests), len(pairs))
    return ProxySession(base, pairs, prompts, alphas, times, [r.settings.alone for r in requests])


class Decoding:
    """One batch of requests decoded together; iterate `steps()`, then read `outputs()`.

    Between two steps, `add()` brings in new requests (prefilled in their own session, then joined
    to the running batch) and `cancel()` ends rows; both take effect at the next step.
    """

    def __init__(self, base: LogitSource, pairs: Sequence[ExpertPair], requests: Sequence[Request], tokenizer,
                 eos_ids: set[int], session: ProxySession | None = None):
        self.base, self.pairs = base, list(pairs)
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.session = session or open_session(base, pairs, requests)  # `session`: opened over these requests
        self.times = self.session.times
        # Rows leave `rows` when they finish (their matchers and generators freed at once); their outputs wait
        # in `finished` until taken (`take`, the server) or read (`output(s)`, a batch that runs to its end).
        self.first_rows = [self._row(i, r) for i, r in enumerate(requests)]  # the rows `self.session` was opened over
        self.rows: dict[int, RowState] = {row.index: row for row in self.first_rows}
        self.finished: dict[int, GenerationOutput] = {}
        self.discarded: set[int] = set()  # live rows whose output nobody will read: not kept when they finish
        self.added = len(requests)  # row indices given so far (never reused)
        self.joining: list[list[RowState]] = []  # groups of rows added since, to admit at the next step
        self.failed = False

    def _row(self, index: int, request: Request) -> RowState:
        return RowState(index, request, self.tokenizer, self.eos_ids, token_budget(request, self.session.sources))

    # --- the public controls: what the server and the evaluation runner use ------------------------

    @property
    def accepts_new_rows(self) -> bool:
        """Whether `add()` may bring rows into this running batch (every session declares join, and no
        model failed in it)."""
        return not self.session.lacking("join") and not self.failed

    @property
    def running(self) -> int:
        """Rows not finished yet, those waiting to join included."""
        return sum(row.finish_reason is None for row in self.rows.values())

    def add(self, requests: Sequence[Request]) -> list[int]:
        """Queue requests to join the batch at the next step; returns their row indices."""
        if not self.accepts_new_rows:
            reason = "a model failed in it" if self.failed else "its sessions do not declare join"
            raise ProxyTuneError(f"this decoding cannot take rows into its running batch ({reason}): "
                                 f"start another decoding for these requests")
        new_rows = [self._row(self.added + i, r) for i, r in enumerate(requests)]
        self.added += len(new_rows)
        self.rows.update((row.index, row) for row in new_rows)
        if new_rows:
            self.joining.append(new_rows)
        return [row.index for row in new_rows]

    def cancel(self, indices: Sequence[int], reason: str = "cancelled") -> None:
        """Stop these rows (their finish_reason: `reason`); they leave the batch at the next step, their output
        is final now. Rows that already finished are left as they are."""
        for index in indices:
            row = self.rows.get(index)
            if row is not None and row.finish_reason is None:
                row.finish_reason = reason

    def output(self, index: int) -> GenerationOutput:
        row = self.rows.get(index)
        if row is not None:
            return row.output()
        if index not in self.finished:
            raise KeyError(f"row {index} is not in this decoding (never added, taken or discarded)")
        return self.finished[index]

    def outputs(self) -> list[GenerationOutput]:
        """Every row's output in the order they were added (rows taken or discarded are not there)."""
        return [self.output(i) for i in range(self.added) if i in self.rows or i in self.finished]

    def take(self, index: int) -> GenerationOutput:
        """A finished row's output, handed over: the decoding keeps nothing of it any more."""
        output = self.output(index)
        self.discard([index])
        return output

    def discard(self, indices: Sequence[int]) -> None:
        """Nobody will read these rows' outputs (a client went away): keep nothing of them once they finish."""
        for index in indices:
            self.finished.pop(index, None)
            if index in self.rows:
                self.discarded.add(index)

    def _retire(self) -> None:
        """Finished rows leave: their output is kept (unless discarded), their state is freed."""
        for index in [i for i, row in self.rows.items() if row.finish_reason is not None]:
            row = self.rows.pop(index)
            if index in self.discarded:
                self.discarded.discard(index)
            else:
                self.finished[index] = row.output()

    # --- the loop ----------------------------------------------------------------------------------

    def choose_and_record(self, rows: list[RowState], logits: RoleLogits) -> list[Event]:
        combined_logprobs = torch.log_softmax(logits.combined.float(), dim=-1)
        unusable = unusable_rows(logits)
        events = []
        for position, row in enumerate(rows):
            if row.finish_reason is not None:  # cancelled between two steps
                continue
            if position in unusable:
                events.append(row.fail(unusable[position]))
                continue
            try:
                z = row.shaped(logits.combined[position])
                if z is None:
                    events.append(row.cannot_continue())
                    continue
                token = choose(z, row.request.settings.sampling, row.generator)
                detail = row.detail(logits, position, token)
                events.append(row.record(token, float(combined_logprobs[position, token]), detail))
            except Exception as error:
                events.append(row.crashed(error))
        return events

    def steps(self) -> Iterator[list[Event]]:
        """Yields lists of Events, one per row that advanced; every row stops on its own."""
        rows: list[RowState] = []
        admitting = self.first_rows
        try:
            if admitting:  # the first batch, in the session opened in __init__
                rows, events = self._admit(rows, [admitting], self.session)
                admitting = []
                yield events
            while True:
                self._retire()  # the consumer has read the last step's events: finished rows leave now
                groups = [[row for row in group if row.finish_reason is None] for group in self.joining]
                groups, self.joining = [group for group in groups if group], []
                if groups:  # their first token comes from their own prefill
                    admitting = [row for group in groups for row in group]
                    rows, events = self._admit(rows, groups)
                    admitting = []
                    if events:
                        yield events
                rows = self._running(rows)
                if not rows:
                    if self.joining:  # rows added while their predecessors' first tokens were out: admit them
                        continue
                    self._retire()
                    return
                rows = yield from self._round_without_refused(rows)
        except SourceFailure as failure:  # a model is unreachable (e.g. a remote server died): keep the text so far
            self.failed = True  # its sessions are in no known state: later requests need a decoding of their own
            waiting = [row for group in self.joining for row in group]  # rows added during the failed step end too
            self.joining = []
            yield [row.fail(failure) for row in dict.fromkeys(rows + admitting + waiting) if row.finish_reason is None]

    def _round_without_refused(self, rows: list[RowState]) -> Generator[list[Event], None, list[RowState]]:
        """One round. Rows a source refused (RowFailure) end with its reason, and the round runs again
        without them: the sessions that had already advanced are rolled back first. Returns the rows the
        sessions now hold."""
        while rows:
            try:
                yield from self.round(rows)
                self.session.settle()
                return rows
            except RowFailure as failure:
                cannot = self.session.undo_step()
                if cannot:
                    raise SourceFailure(f"{failure} (the other rows cannot be retried: {', '.join(cannot)} "
                                        f"cannot roll back the step)") from failure
                yield [rows[p].fail(failure) for p in failure.rows if rows[p].finish_reason is None]
                rows = self._running(rows)
        return rows

    def _running(self, rows: list[RowState]) -> list[RowState]:
        """The rows still running; finished and cancelled ones leave every role's session."""
        keep = [p for p, row in enumerate(rows) if row.finish_reason is None]
        if len(keep) < len(rows) and keep:
            self.session.select(keep)
        return [rows[p] for p in keep]

    def _admit(self, rows: list[RowState], groups: list[list[RowState]], session: ProxySession | None = None
               ) -> tuple[list[RowState], list[Event]]:
        """Prefill newcomers (every group at once) in a session of their own, choose their first tokens and
        join them to the running rows. A group is one `add()` (one server request) or the first batch.

        Isolation: if that prefill fails, each group is tried alone, then each row of a group that fails
        alone; what fails on its own ends with the reason, everything else joins as usual."""
        newcomers = [row for group in groups for row in group]
        if session is None:
            session = open_session(self.base, self.pairs, [row.request for row in newcomers], self.times)
        try:
            first = session.prefill()
        except RowFailure as failure:  # the source named the rows it refused: the others are tried again
            refused = {id(newcomers[p]) for p in failure.rows}
            events = [row.fail(failure) for row in newcomers if id(row) in refused]
            rest = [[row for row in group if id(row) not in refused] for group in groups]
            rows, more = self._admit(rows, [group for group in rest if group]) if any(rest) else (rows, [])
            return rows, events + more
        except SourceFailure:  # a model is unreachable: every row needs it (steps() ends them all)
            raise
        except Exception as error:
            return self._admit_apart(rows, groups, error)
        rows = self._running(rows)
        if rows:
            self.session.join(session)
        else:
            self.session = session
        return rows + newcomers, self.choose_and_record(newcomers, first)

    def _admit_apart(self, rows: list[RowState], groups: list[list[RowState]], error: Exception
                     ) -> tuple[list[RowState], list[Event]]:
        parts = groups if len(groups) > 1 else [[row] for row in groups[0]]
        if len(parts) == 1 or self.session.lacking("join"):  # nothing smaller to try (or no way to merge parts)
            if not isinstance(error, ProxyTuneError):
                log.error("prefill failed", exc_info=error)
            reason = error if isinstance(error, ProxyTuneError) else f"{type(error).__name__}: {error}"
            return rows, [row.fail(reason) for group in groups for row in group]
        events: list[Event] = []
        for part in parts:
            rows, part_events = self._admit(rows, [part])
            events += part_events
        return rows, events

    def round(self, rows: list[RowState]) -> Iterator[list[Event]]:
        """One token per row: every role advances by the row's last chosen token."""
        if any(row.request.settings.alpha_schedule for row in rows):  # α of the position each row predicts now
            self.session.alphas = torch.tensor([row.request.alphas_at(len(row.tracker.token_ids), row.tracker.text)
                                                for row in rows],
                                               dtype=torch.float32).reshape(self.session.alphas.shape)
        tokens = torch.tensor([[row.tracker.token_ids[-1]] for row in rows], dtype=torch.long)
        yield self.choose_and_record(rows, self.session.advance(tokens).map(lambda z: z[:, -1]))
