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
from dataclasses import dataclass, field
from typing import Generator, Iterator, Sequence

import torch

from ..backends.protocol import LogitSource
from ..errors import FormatLimit, ProxyTuneError, RowFailure, SourceFailure
from .context import room_left
from .roles import ExpertPair, Roles
from .sampling import choose, make_generator, random_seed
from .session import ProxySession, RoleLogits, StepTimes
from .settings import Settings
from .shaping import RowShaper
from .text import TextTracker

log = logging.getLogger("proxytune.engine")


@dataclass
class Request:
    """One row to generate: its prompt for every role, and how to decode it (settings with α per pair:
    `Settings.resolved`, which the tuner applies)."""
    prompts: dict[str, list[int]]  # role -> prompt token ids
    settings: Settings = Settings()

    def __post_init__(self):
        if not isinstance(self.settings.alpha, tuple):
            raise ProxyTuneError("a Request's settings give α per expert pair (Settings(alpha=(1.0,)) for one pair, "
                                 "or settings.resolved(default_alphas, roles)); got alpha="
                                 f"{self.settings.alpha!r}")

    @property
    def alphas(self) -> list[float]:
        return list(self.settings.alpha)

    def alphas_at(self, position: int, text: str = "") -> list[float]:
        return self.settings.alphas_at(position, text)


@dataclass
class StepDetail:
    """What every role thought at one step: top tokens with probabilities, and the chosen token's probability."""
    token_id: int
    top: dict[str, list[tuple[int, float]]]
    chosen_prob: dict[str, float]
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # combined log p̃, best first


@dataclass
class Event:
    """One row's progress at one step."""
    row: int
    token_id: int | None  # None when the row ended on an EOS token
    delta: str
    logprob: float | None  # of token_id under the combined (unwarped) distribution
    finish_reason: str | None = None  # "stop" | "length" | "error" once the row is done
    detail: StepDetail | None = None
    error: str | None = None  # with finish_reason "error": why a model stopped answering


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]  # generated tokens, without the EOS token
    finish_reason: str  # "stop" (EOS or stop string) | "length" | "error" (a model failed; text so far kept)
    logprobs: list[float] = field(default_factory=list)
    details: list[StepDetail] | None = None
    error: str | None = None
    error_field: str | None = None  # the request's setting at fault ("response_format"), when not a model


def step_detail(logits: RoleLogits, row: int, token_id: int, k: int) -> StepDetail:
    top, chosen = {}, {}
    for role, role_logits in {**logits.by_role(), "proxy": logits.combined}.items():
        probs = torch.softmax(role_logits[row].float(), dim=-1)
        values, ids = probs.topk(k)
        top[role] = [(int(i), float(v)) for i, v in zip(ids, values)]
        chosen[role] = float(probs[token_id])
    # log_softmax, not log(prob): the same numbers as Event.logprob and score(), also far in the tail.
    values, ids = torch.log_softmax(logits.combined[row].float(), dim=-1).topk(k)
    return StepDetail(token_id, top, chosen, [(int(i), float(v)) for i, v in zip(ids, values)])


class RowState:
    """Bookkeeping of one row: its text, stop conditions and results."""

    def __init__(self, index: int, request: Request, tokenizer, eos_ids: set[int], token_budget: int):
        self.index = index
        self.request = request
        settings = request.settings
        self.tracker = TextTracker(tokenizer, settings.stop)
        self.eos_ids = eos_ids
        self.budget = min(settings.max_new_tokens, token_budget)
        self.seed = settings.seed if settings.seed is not None else random_seed()
        self.generator = make_generator(self.seed)
        self.logprobs: list[float] = []
        self.details: list[StepDetail] | None = [] if settings.details else None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.error_field: str | None = None
        own_prompt = request.prompts[settings.alone or "base"]  # what the repetition penalty counts
        self.shaper = RowShaper(settings.shaping, own_prompt) if settings.shaping.active else None

    def detail(self, logits: RoleLogits, position: int, token: int) -> StepDetail | None:
        """What every role thought at this step, when the request asks (details > 0)."""
        k = self.request.settings.details
        return step_detail(logits, position, token, k) if k else None

    def shaped(self, z: torch.Tensor, drafts: Sequence[int] = ()) -> torch.Tensor | None:
        """The logits this row's next token is chosen from: z [V] itself, or shaped (engine/shaping.py); for
        z [n, V] (a drafted round), position j shaped after drafts[:j], cut before the first position where
        nothing is possible (verify only the positions kept). None when the shaping leaves no token the models
        allow at the first position (the row cannot go on)."""
        if self.shaper is None:
            return z
        if z.dim() == 1:
            shaped = self.shaper.shape(z, self.tracker.token_ids)
            return None if bool(unsampleable(shaped[None])[0]) else shaped
        shaped = self.shaper.shape_positions(z, self.tracker.token_ids, drafts)
        dead = unsampleable(shaped).nonzero().flatten().tolist()
        if dead and dead[0] == 0:
            return None
        # a later position where nothing is possible: the round decides up to it, the next round fails there
        return shaped[:dead[0]] if dead else shaped

    def cannot_continue(self) -> Event:
        return self.fail("no token that the output format allows here is possible under the proxy-tuned "
                         "distribution (every one has probability 0); loosen the format or the logit_bias")

    def fail(self, reason) -> Event:
        """End the row with an error (a model stopped answering for it, its logits were unusable),
        keeping what it generated so far."""
        self.finish_reason, self.error = "error", str(reason)
        return Event(self.index, None, self.tracker.delta(final=True), None, "error", None, self.error)

    def crashed(self, error: Exception) -> Event:
        """This row's own part of a step (choosing, verifying, recording) raised: it ends this row alone,
        never its batch-mates."""
        if isinstance(error, FormatLimit):  # the request's format, not proxytune nor a model
            self.error_field = "response_format"
            return self.fail(error)
        log.error("row %d failed", self.index, exc_info=error)
        return self.fail(f"{type(error).__name__}: {error}")

    def record(self, token_id: int, logprob: float, detail: StepDetail | None) -> Event:
        if self.details is not None and detail is not None:
            self.details.append(detail)
        if self.shaper is not None and token_id not in self.eos_ids:
            self.shaper.accept(token_id)
        if token_id in self.eos_ids:
            self.finish_reason = "stop"
            return Event(self.index, None, self.tracker.delta(final=True), logprob, "stop", detail)
        self.logprobs.append(logprob)
        self.tracker.add(token_id)
        if self.tracker.stopped:
            self.finish_reason = "stop"
        elif len(self.tracker.token_ids) >= self.budget:
            self.finish_reason = "length"
        delta = self.tracker.delta(final=self.finish_reason is not None)
        return Event(self.index, token_id, delta, logprob, self.finish_reason, detail)

    def output(self) -> GenerationOutput:
        return GenerationOutput(self.tracker.text, list(self.tracker.token_ids), self.finish_reason or "length",
                                self.logprobs, self.details, self.error, self.error_field)


def unsampleable(z: torch.Tensor) -> torch.Tensor:
    """Per row of logits [B, V] or [B, k, V]: NaN or +inf anywhere, or no finite value at all. −inf alone
    is fine: a token no model allows."""
    flat = z.reshape(z.shape[0], -1)
    return flat.isnan().any(-1) | flat.isposinf().any(-1) | flat.isneginf().all(-1)


def unusable_rows(logits: RoleLogits) -> dict[int, str]:
    """Rows whose combined logits cannot be sampled from (`unsampleable`), with the reason."""
    rows = unsampleable(logits.combined).nonzero().flatten().tolist()
    if not rows:
        return {}
    culprits = {role: unsampleable(z) for role, z in logits.by_role().items()}
    reasons = {}
    for row in rows:
        roles = [role for role, flags in culprits.items() if flags[row]]
        where = (f"the {', '.join(roles)} model gave NaN, +inf or no finite logit" if roles else
                 "α·(z_expert − z_anti_expert) overflowed float32")
        reasons[row] = (f"the proxy-tuned logits of this row are not finite ({where}); "
                        f"lower alpha or check the models")
    return reasons


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
