"""Exact speculative proxy decoding: the small expert drafts, the large base verifies.

Plain proxy decoding runs base, expert and anti-expert once per token. Here, per round:

1. the expert drafts k tokens x₁..x_k, one cheap step at a time, from its own distribution q;
2. base and anti-expert score [t, x₁..x_k] (t = the last chosen token) in ONE forward each, which
   gives the proxy distribution p̃ at all k+1 positions (the expert's logits come from drafting);
3. draft xⱼ is accepted with probability min(1, p̃(xⱼ)/q(xⱼ)); the first rejected one is replaced
   by a sample from norm(max(0, p̃ − q)); if all pass, one more token comes from p̃ after x_k.
   Greedy: accept while argmax p̃ equals the draft, then take argmax p̃.

Leviathan et al. (2023) show this yields exact samples from p̃ whatever q is, so the output
distribution (and, for greedy, the output) is that of plain proxy decoding. p̃ and q are the
*warped* distributions (temperature, top-k/p, min-p), the ones tokens are really drawn from.
Rows accept different numbers of drafts; `Session.rewind` keeps each row's own count.
"""
from __future__ import annotations

import inspect
import math
from typing import Iterator, Sequence

import torch

from .decode import Decoding, Event, RowState, open_session, step_detail
from .errors import ProxyTuneError, SourceFailure
from .proxy import ExpertPair, RoleLogits
from .sampling import SamplingParams, choose, next_token_probs
from .sources.protocol import LogitSource


class DraftLength:
    """Picks k from the running acceptance rate a: the k that maximises tokens per unit of cost.

    A round yields 1 + a + … + a^k tokens on average and costs one verification forward (slightly
    dearer per extra position: `verify_growth`) plus k+1 expert steps (`draft_cost` of a verification
    each). Deterministic — it depends on acceptances only — so seeded sampling stays reproducible.
    """

    def __init__(self, draft_cost: float, fixed: int | None = None, maximum: int = 12,
                 verify_growth: float = 0.05, prior: float = 0.7, memory: float = 0.8):
        self.draft_cost, self.fixed, self.maximum = draft_cost, fixed, maximum
        self.verify_growth, self.memory = verify_growth, memory
        self.accepted, self.tried = 5 * prior, 5.0  # a weak prior, worth five drafted tokens

    @property
    def acceptance(self) -> float:
        return self.accepted / self.tried

    def expected_speedup(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        cost = 1 + self.verify_growth * k + (k + 1) * self.draft_cost
        return tokens / cost * (1 + self.draft_cost)  # relative to one plain step (k = 0)

    def next(self) -> int:
        if self.fixed is not None:
            return self.fixed
        return max(range(1, self.maximum + 1), key=self.expected_speedup)

    def update(self, accepted: int, rejected: int) -> None:
        # Geometric model: every verified draft is a trial; the round stops at the first rejection.
        self.accepted = self.memory * self.accepted + accepted
        self.tried = self.memory * self.tried + accepted + rejected


def parameter_count(source: LogitSource) -> int | None:
    model = getattr(source, "model", None)
    return sum(p.numel() for p in model.parameters()) if model is not None else None


def verify_row(p_logits: torch.Tensor, drafts: Sequence[int], q_probs: Sequence[torch.Tensor] | None,
               params: SamplingParams, generator: torch.Generator) -> tuple[int, int]:
    """(number of drafts accepted, the token after them) for one row.

    p_logits: combined logits [k+1, V] after t, x₁, …, x_k; q_probs: the warped expert distributions
    the drafts were drawn from (None when greedy)."""
    if params.greedy:
        for j, draft in enumerate(drafts):
            best = choose(p_logits[j], params, generator)
            if best != draft:
                return j, best
        return len(drafts), choose(p_logits[len(drafts)], params, generator)
    p = next_token_probs(p_logits, params).cpu()
    for j, draft in enumerate(drafts):
        q = q_probs[j]
        if float(torch.rand(1, generator=generator)) * float(q[draft]) < float(p[j, draft]):
            continue  # accepted with probability min(1, p/q)
        residual = (p[j] - q).clamp_min(0)
        total = float(residual.sum())
        # residual == 0 everywhere means p == q, where a rejection cannot happen; guard rounding.
        token = int(torch.multinomial(residual / total if total > 0 else p[j], 1, generator=generator))
        return j, token
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


def at_position(logits: RoleLogits, j: int) -> RoleLogits:
    return RoleLogits(logits.base[:, j], [e[:, j] for e in logits.experts],
                      [a[:, j] for a in logits.anti_experts], logits.combined[:, j])


def supports_extend(session) -> bool:
    return "extend" in inspect.signature(session.advance).parameters


class SpeculativeDecoding(Decoding):
    """`Decoding` with the expert drafting and the other roles verifying; same events, same outputs.

    draft_length: a fixed k, or None to adapt k to the running acceptance rate.
    """

    def __init__(self, base: LogitSource, pairs: Sequence[ExpertPair], requests, tokenizer, eos_ids: set[int],
                 draft_length: int | None = None):
        if draft_length is not None and (isinstance(draft_length, bool) or not isinstance(draft_length, int)
                                         or draft_length < 1):
            raise ProxyTuneError(f"draft_length must be an integer >= 1 (or None: adaptive), got {draft_length!r}")
        super().__init__(base, pairs, requests, tokenizer, eos_ids)
        drafter = self.session.sessions[self.session.session_of["expert"]]
        if not supports_extend(drafter):
            raise ProxyTuneError(f"speculative decoding needs an expert source that can roll back a multi-token "
                                 f"draft (advance(..., extend=True)); {type(drafter).__name__} cannot")
        self.draft_length = DraftLength(self._draft_cost(), fixed=draft_length)
        self.rounds = self.drafted = self.accepted_total = 0

    def _draft_cost(self) -> float:
        """Cost of one expert step relative to one verification (all other models), by parameter count."""
        drafter_key = self.session.session_of["expert"]
        drafter_pair = getattr(self.session.sources["expert"], "pair", None)
        expert = parameter_count(self.session.sources["expert"])
        verifiers, counted = 0, set()
        for role, key in self.session.session_of.items():
            source = self.session.sources[role]
            if key == drafter_key or id(source) in counted:
                continue
            if drafter_pair is not None and getattr(source, "pair", None) is drafter_pair:
                continue  # a LoRA pair's anti-expert rides along with every drafting step for free
            counted.add(id(source))
            size = parameter_count(source)
            if size is None:
                return 0.3
            verifiers += size
        if expert is None:
            return 0.3
        return expert / verifiers if verifiers else 1.0

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the proxy accepted so far (0 when nothing was drafted)."""
        return self.accepted_total / self.drafted if self.drafted else 0.0

    def steps(self) -> Iterator[list[Event]]:
        rows = self.rows[: len(self.rows) - len(self.joining)]
        try:
            logits = self.session.prefill()
        except SourceFailure as failure:  # a model is unreachable: every row ends with the reason
            yield [row.fail(failure) for row in rows]
            return
        yield self.choose_and_record(rows, logits)
        while True:
            newcomers = [row for row in self.joining if row.finish_reason is None]
            self.joining = []
            try:
                if newcomers:  # the server's dynamic batching: their first token comes from their own prefill
                    session = open_session(self.base, self.pairs, [row.request for row in newcomers])
                    new_logits = session.prefill()
                    if rows:
                        self.session.join(session)
                    else:
                        self.session = session
                    rows += newcomers
                    yield self.choose_and_record(newcomers, new_logits)
                still_running = [p for p, row in enumerate(rows) if row.finish_reason is None]
                if not still_running:
                    return
                if len(still_running) < len(rows):
                    self.session.select(still_running)
                    rows = [rows[p] for p in still_running]
                yield from self._round(rows)  # computes the whole round before it yields anything
            except SourceFailure as failure:  # e.g. a remote base died: rows keep their text so far
                yield [row.fail(failure) for row in dict.fromkeys(rows + newcomers) if row.finish_reason is None]
                return

    def _cap(self, rows: list[RowState]) -> int:
        """The most drafts worth making: no row can use more than its remaining budget, and no row's
        context may overflow while the draft is in the caches."""
        generated = [len(row.tracker.token_ids) for row in rows]
        useful = max(row.budget - n for row, n in zip(rows, generated)) - 1
        rooms = [self._context_room(row) - n for row, n in zip(rows, generated)]
        return max(0, min([useful] + [room - 1 for room in rooms]))

    def _context_room(self, row: RowState) -> float:
        rooms = [s.max_length - len(row.request.prompts[role]) for role, s in self.session.sources.items()
                 if s.max_length]
        return min(rooms) if rooms else math.inf

    def _draft(self, rows: list[RowState], expert_logits: torch.Tensor) -> tuple[torch.Tensor, list]:
        """One draft token per row from the expert's logits [B, V], and the warped q it came from."""
        tokens, q_probs = [], []
        for position, row in enumerate(rows):
            params = row.request.params
            if params.greedy:
                tokens.append(int(expert_logits[position].argmax()))
                q_probs.append(None)
            else:
                q = next_token_probs(expert_logits[position], params).cpu()
                tokens.append(int(torch.multinomial(q, 1, generator=row.generator)))
                q_probs.append(q)
        return torch.tensor(tokens, dtype=torch.long), q_probs

    def _round(self, rows: list[RowState]) -> Iterator[list[Event]]:
        k = min(self.draft_length.next(), self._cap(rows))
        last = torch.tensor([[row.tracker.token_ids[-1]] for row in rows], dtype=torch.long)
        drafter_key = self.session.session_of["expert"]
        drafter = self.session.sessions[drafter_key]
        expert_steps = [drafter.advance(last)]
        drafts, q_probs = [], []
        for _ in range(k):
            tokens, q = self._draft(rows, expert_steps[-1][:, -1])
            drafts.append(tokens)
            q_probs.append(q)
            expert_steps.append(drafter.advance(tokens[:, None], extend=True))
        fed = torch.cat([last] + [d[:, None] for d in drafts], dim=1)  # [B, k+1]
        outputs = {drafter_key: torch.cat(expert_steps, dim=1)}
        for key, session in self.session.sessions.items():
            if key != drafter_key:
                outputs[key] = session.advance(fed)
        logits = self.session._collect(outputs)  # p̃ at all k+1 positions, [B, k+1, V]

        chosen: list[list[int]] = []
        for position, row in enumerate(rows):
            row_drafts = [int(d[position]) for d in drafts]
            n, token = verify_row(logits.combined[position], row_drafts, [q[position] for q in q_probs],
                                  row.request.params, row.generator)
            chosen.append(row_drafts[:n] + [token])
        accepted = sum(len(c) - 1 for c in chosen)
        rejected = sum(len(c) - 1 < k for c in chosen)
        self.draft_length.update(accepted, rejected)
        self.rounds += 1
        self.drafted += k * len(rows)
        self.accepted_total += accepted
        for session in self.session.sessions.values():
            session.rewind([len(c) for c in chosen])  # t and the accepted drafts stay; the new token comes next
        yield from self._record(rows, logits, chosen)

    def _record(self, rows: list[RowState], logits: RoleLogits, chosen: list[list[int]]) -> Iterator[list[Event]]:
        logprobs = torch.log_softmax(logits.combined.float(), dim=-1)
        for j in range(max(map(len, chosen))):
            events = []
            for position, row in enumerate(rows):
                if j >= len(chosen[position]) or row.finish_reason is not None:
                    continue
                token = chosen[position][j]
                detail = (step_detail(at_position(logits, j), position, token, row.request.details)
                          if row.request.details else None)
                events.append(row.record(token, float(logprobs[position, j, token]), detail))
            if events:
                yield events
