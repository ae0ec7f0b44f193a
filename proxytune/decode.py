"""Proxy-tuned decoding as a generator of steps.

`decode_steps` prefills every role, then at each step chooses one token per active row from the
combined logits, feeds it to every role, and yields what happened. `generate`, `stream`, the CLI,
the server and the evaluations all consume these steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .errors import SourceFailure
from .proxy import ExpertPair, ProxySession, RoleLogits, role_names
from .sampling import SamplingParams, choose, make_generator
from .sources.protocol import LogitSource
from .stopping import TextTracker


@dataclass
class Request:
    """One row to generate: its prompt for every role, and how to decode it."""
    prompts: dict[str, list[int]]  # role -> prompt token ids
    alphas: list[float]  # one per expert pair
    params: SamplingParams = SamplingParams()
    max_new_tokens: int = 64
    stop: Sequence[str] = ()
    seed: int | None = None
    details: int = 0  # top-k per role to record at each step (0 = none)


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
        self.tracker = TextTracker(tokenizer, request.stop)
        self.eos_ids = eos_ids
        self.budget = min(request.max_new_tokens, token_budget)
        self.generator = make_generator(request.seed)
        self.logprobs: list[float] = []
        self.details: list[StepDetail] | None = [] if request.details else None
        self.finish_reason: str | None = None
        self.error: str | None = None

    def fail(self, failure: SourceFailure) -> Event:
        """A model stopped answering: end the row, keeping what it generated so far."""
        self.finish_reason, self.error = "error", str(failure)
        return Event(self.index, None, self.tracker.delta(final=True), None, "error", None, self.error)

    def record(self, token_id: int, logprob: float, detail: StepDetail | None) -> Event:
        if self.details is not None and detail is not None:
            self.details.append(detail)
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
                                self.logprobs, self.details, self.error)


def token_budget(request: Request, sources: dict[str, LogitSource]) -> int:
    """How many tokens fit in every role's context after its prompt."""
    room = [s.max_length - len(request.prompts[role]) for role, s in sources.items() if s.max_length]
    return min(room) if room else request.max_new_tokens


def open_session(base: LogitSource, pairs: Sequence[ExpertPair], requests: Sequence[Request]) -> ProxySession:
    prompts = {role: [r.prompts[role] for r in requests] for role in role_names(len(pairs))}
    alphas = torch.tensor([r.alphas for r in requests], dtype=torch.float32).reshape(len(requests), len(pairs))
    return ProxySession(base, pairs, prompts, alphas)


def last_position(logits: RoleLogits) -> RoleLogits:
    return RoleLogits(logits.base[:, -1], [e[:, -1] for e in logits.experts],
                      [a[:, -1] for a in logits.anti_experts], logits.combined[:, -1])


def stack_rows(first: RoleLogits, second: RoleLogits) -> RoleLogits:
    return RoleLogits(torch.cat([first.base, second.base]),
                      [torch.cat(pair) for pair in zip(first.experts, second.experts)],
                      [torch.cat(pair) for pair in zip(first.anti_experts, second.anti_experts)],
                      torch.cat([first.combined, second.combined]))


class Decoding:
    """One batch of requests decoded together; iterate `steps()`, then read `outputs()`.

    Between two steps, `add()` brings in new requests (they are prefilled in their own session and
    joined to the running batch, which needs sessions with `join`) and `cancel()` drops rows at the
    next step: the dynamic batching of the server.
    """

    def __init__(self, base: LogitSource, pairs: Sequence[ExpertPair], requests: Sequence[Request], tokenizer,
                 eos_ids: set[int]):
        self.base, self.pairs, self.requests = base, list(pairs), list(requests)
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.session = open_session(base, pairs, requests)
        self.rows = [RowState(i, r, tokenizer, eos_ids, token_budget(r, self.session.sources))
                     for i, r in enumerate(requests)]
        self.joining: list[RowState] = []

    def add(self, requests: Sequence[Request]) -> list[RowState]:
        """Queue requests to join the batch at the next step; their rows get the next indices."""
        start = len(self.rows)
        new_rows = [RowState(start + i, r, self.tokenizer, self.eos_ids, token_budget(r, self.session.sources))
                    for i, r in enumerate(requests)]
        self.requests += requests
        self.rows += new_rows
        self.joining += new_rows
        return new_rows

    def cancel(self, indices: Sequence[int]) -> None:
        """Stop these rows (finish_reason "cancelled"); they leave the batch at the next step."""
        for index in indices:
            if self.rows[index].finish_reason is None:
                self.rows[index].finish_reason = "cancelled"

    def choose_and_record(self, rows: list[RowState], logits: RoleLogits) -> list[Event]:
        combined_logprobs = torch.log_softmax(logits.combined.float(), dim=-1)
        events = []
        for position, row in enumerate(rows):
            token = choose(logits.combined[position], row.request.params, row.generator)
            detail = step_detail(logits, position, token, row.request.details) if row.request.details else None
            events.append(row.record(token, float(combined_logprobs[position, token]), detail))
        return events

    def steps(self) -> Iterator[list[Event]]:
        """Yields, at each step, one Event per row still running; every row stops on its own."""
        rows = self.rows[: len(self.rows) - len(self.joining)]  # the rest were added: they join at step 2
        try:
            logits = self.session.prefill()
        except SourceFailure as failure:  # a model is unreachable: every row ends with the reason
            yield [row.fail(failure) for row in rows]
            return
        while True:
            yield self.choose_and_record(rows, logits)
            still_running = [p for p, row in enumerate(rows) if row.finish_reason is None]
            newcomers = [row for row in self.joining if row.finish_reason is None]
            self.joining = []
            if not still_running and not newcomers:
                return
            if still_running:
                if len(still_running) < len(rows):
                    self.session.select(still_running)
                    rows = [rows[p] for p in still_running]
                tokens = torch.tensor([[row.tracker.token_ids[-1]] for row in rows], dtype=torch.long)
                try:
                    logits = last_position(self.session.advance(tokens))
                except SourceFailure as failure:  # e.g. a remote server died: keep the text so far
                    yield [row.fail(failure) for row in rows + newcomers]
                    return
            else:
                rows = []
            if newcomers:
                session = open_session(self.base, self.pairs, [row.request for row in newcomers])
                try:
                    new_logits = session.prefill()
                except SourceFailure as failure:
                    yield [row.fail(failure) for row in rows + newcomers]
                    return
                if rows:
                    self.session.join(session)
                    logits = stack_rows(logits, new_logits)
                else:
                    self.session, logits = session, new_logits
                rows += newcomers

    def outputs(self) -> list[GenerationOutput]:
        return [row.output() for row in self.rows]
