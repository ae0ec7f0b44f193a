"""What every draft-and-verify decoding shares (speculative: the expert drafts; chunked: a remote base drafts).

A round proposes several tokens per row, the other roles score them in one forward, and each row keeps the
drafts the proxy distribution p̃ accepts, then one token of its own (`verify_row`: Leviathan et al. 2023, exact
for any draft distribution q). The per-row block — unusable logits, output-format shaping, verification,
failures kept to their row — is written once here (`DraftedDecoding.verified`), and so are the draft length
(`DraftLength`, from the acceptance rate and measured costs), the random draws keyed by (row seed, output
position, purpose) (`PositionRandomness`), the caps on a draft, the counts and the recording of several tokens
per row as one event list per position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..backends.protocol import LogitSource
from ..errors import ProxyTuneError
from .context import room_left
from .decoding import Decoding
from .rows import Event, RowState, unusable_rows
from .roles import ExpertPair
from .sampling import SamplingParams, choose, next_token_probs
from .session import RoleLogits

DRAFT, ACCEPT, RESAMPLE = range(3)


class DraftLength:
    """Picks k from the running acceptance rate a: the k that maximises tokens per second.

    A round yields 1 + a + … + a^k tokens on average and costs k+1 drafting steps plus one
    verification of k+1 positions. Until costs are measured (`measured`), a drafting step costs
    `draft_cost` verifications and each extra verified position `verify_growth` of one. k = 0 is a
    plain step: chosen when drafting does not pay (e.g. a verifier as slow per token at k+1 as at 1).
    """

    def __init__(self, draft_cost: float = 0.3, fixed: int | None = None, maximum: int = 12,
                 verify_growth: float = 0.05, prior: float = 0.7, memory: float = 0.8):
        self.draft_cost, self.fixed, self.maximum = draft_cost, fixed, maximum
        self.verify_growth, self.memory = verify_growth, memory
        self.accepted, self.tried = 5 * prior, 5.0  # a weak prior, worth five drafted tokens
        self.draft_seconds: float | None = None
        self.verify_seconds: Callable[[int], float] | None = None

    @property
    def acceptance(self) -> float:
        return self.accepted / self.tried

    def measured(self, draft_seconds: float, verify_seconds: Callable[[int], float]) -> None:
        """Use measured costs: one drafting step, and verifying `w` tokens per row (all verifiers)."""
        self.draft_seconds, self.verify_seconds = draft_seconds, verify_seconds

    def round_cost(self, k: int) -> float:
        if self.verify_seconds is not None:
            return (k + 1) * self.draft_seconds + self.verify_seconds(k + 1)
        return (k + 1) * self.draft_cost + 1 + self.verify_growth * k

    def expected_speedup(self, k: int) -> float:
        """Expected tokens per unit of cost, relative to plain decoding (k = 0 gives 1)."""
        a = min(self.acceptance, 0.999)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        return tokens / self.round_cost(k) * self.round_cost(0)

    def next(self) -> int:
        if self.fixed is not None:
            return self.fixed
        return max(range(0, self.maximum + 1), key=self.expected_speedup)

    def update(self, accepted: int, rejected: int) -> None:
        # Geometric model: every verified draft is a trial; the round stops at the first rejection.
        self.accepted = self.memory * self.accepted + accepted
        self.tried = self.memory * self.tried + accepted + rejected


def linear_cost(widths: dict[int, float], growth: float) -> Callable[[int], float]:
    """Seconds for w tokens per row from the widths measured so far: a least-squares line through
    them, or, with one width measured, `growth` of it per extra token."""
    if len(widths) >= 2:
        ws, ss = zip(*sorted(widths.items()))
        mean_w, mean_s = sum(ws) / len(ws), sum(ss) / len(ss)
        slope = sum((w - mean_w) * (s - mean_s) for w, s in zip(ws, ss)) / sum((w - mean_w) ** 2 for w in ws)
        slope = max(slope, 0.0)
        return lambda w: max(mean_s + slope * (w - mean_w), 1e-9)
    (w0, s0), = widths.items()
    return lambda w: s0 * (1 + growth * (w - 1)) / (1 + growth * (w0 - 1))


class PositionRandomness:
    """The random draws of one row in one round: a generator per (seed, output position, purpose)."""

    def __init__(self, seed: int, start: int):
        self.seed, self.start = seed, start

    def __call__(self, j: int, purpose: int) -> torch.Generator:
        position = self.start + j
        return torch.Generator().manual_seed((self.seed * 1_000_003 + position * 3 + purpose) % (2 ** 63))


def verify_row(p_logits: torch.Tensor, drafts: Sequence[int], q_probs: Sequence[torch.Tensor] | None,
               params: SamplingParams, randomness: Callable[[int, int], torch.Generator]) -> tuple[int, int]:
    """(number of drafts accepted, the token after them) for one row.

    p_logits: combined logits [k+1, V] after t, x₁, …, x_k. `drafts` holds k drafts, or k+1 when the
    last position has a draft of its own (never fed); q_probs: the warped expert distributions they
    were drawn from (None when greedy)."""
    positions = p_logits.shape[0]
    if params.greedy:
        for j, draft in enumerate(drafts[:positions - 1]):
            best = choose(p_logits[j], params, None)
            if best != draft:
                return j, best
        return positions - 1, choose(p_logits[positions - 1], params, None)
    p = next_token_probs(p_logits, params).cpu()
    for j, draft in enumerate(drafts):
        q = q_probs[j]
        if float(torch.rand(1, generator=randomness(j, ACCEPT))) * float(q[draft]) < float(p[j, draft]):
            if j == positions - 1:
                return j, draft  # the last position's own draft, accepted
            continue  # accepted with probability min(1, p/q)
        residual = (p[j] - q).clamp_min(0)
        total = float(residual.sum())
        # residual == 0 everywhere means p == q, where a rejection cannot happen; guard rounding.
        token = int(torch.multinomial(residual / total if total > 0 else p[j], 1, generator=randomness(j, RESAMPLE)))
        return j, token
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=randomness(len(drafts), RESAMPLE)))


def refuse_schedules(requests, mode: str) -> None:
    if any(r.settings.alpha_schedule for r in requests):
        raise ProxyTuneError(f"an α schedule changes α by output position, and {mode} decoding verifies several "
                             f"positions at once: decode without speculative (a remote base: chunk=0)")


class DraftedDecoding(Decoding):
    """What every draft-and-verify round shares: k from `DraftLength`, the caps on a draft, the counts,
    and recording several verified tokens per row as one event list per position (so streams show
    tokens as soon as they are verified, and a row stopping inside a draft stops there)."""

    mode = "drafted"

    def __init__(self, base: LogitSource, pairs: Sequence[ExpertPair], requests, tokenizer, eos_ids: set[int],
                 draft_length: int | None = None, session=None, lengths: DraftLength | None = None):
        if draft_length is not None and (isinstance(draft_length, bool) or not isinstance(draft_length, int)
                                         or draft_length < 1):
            raise ProxyTuneError(f"draft_length must be an integer >= 1 (or None: adaptive), got {draft_length!r}")
        super().__init__(base, pairs, requests, tokenizer, eos_ids, session=session)
        refuse_schedules(requests, self.mode)
        cannot = self.session.lacking("rollback")
        if cannot:
            raise ProxyTuneError(f"{self.mode} decoding needs every role's session to roll back a multi-token draft; "
                                 f"{', '.join(cannot)} cannot: decode without speculative=True")
        self.draft_length = lengths or DraftLength(fixed=draft_length)
        self.rounds = self.drafted = self.accepted_total = 0

    def add(self, requests) -> list[int]:
        refuse_schedules(requests, self.mode)
        return super().add(requests)

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the proxy accepted so far (0 when nothing was drafted)."""
        return self.accepted_total / self.drafted if self.drafted else 0.0

    def _cap(self, rows: list[RowState]) -> int:
        """The most drafts worth making: no row can use more than its remaining budget, and no row's
        context may overflow while the draft is in the caches."""
        generated = [len(row.tracker.token_ids) for row in rows]
        useful = max(row.budget - n for row, n in zip(rows, generated)) - 1
        rooms = [self._context_room(row) - n for row, n in zip(rows, generated)]
        return max(0, min([useful] + [room - 1 for room in rooms]))

    def _context_room(self, row: RowState) -> float:
        return room_left(row.request.prompts, self.session.sources)

    def _count(self, chosen: list[list[int]], tried: list[int]) -> None:
        """Feed the round's outcome to the draft length: row i tested tried[i] drafts and kept len(chosen[i]) - 1."""
        accepted = sum(max(len(c) - 1, 0) for c in chosen)
        rejected = sum(0 <= len(c) - 1 < t for c, t in zip(chosen, tried))
        if any(tried):
            self.draft_length.update(accepted, rejected)
        self.rounds += 1
        self.drafted += sum(tried)
        self.accepted_total += accepted

    def verified(self, rows: list[RowState], logits: RoleLogits, proposed: list[RowDrafts], tried: list[int]
                 ) -> Iterator[list[Event]]:
        """The end of every drafted round: each row's drafts verified against p̃ (`logits`, [B, n, V]), the round
        counted (row i tested tried[i] drafts), the sessions rewound to what was kept, the events yielded."""
        failures: list[Event] = []
        chosen = [self._verify_row(row, position, logits, drafts, failures)
                  for position, (row, drafts) in enumerate(zip(rows, proposed))]
        self._count(chosen, tried)
        self.session.rewind([max(len(c), 1) for c in chosen])  # the fed token and the accepted drafts stay
        if failures:
            yield failures
        yield from self._record(rows, logits, chosen)

    @staticmethod
    def _verify_row(row: RowState, position: int, logits: RoleLogits, proposed: RowDrafts,
                    failures: list[Event]) -> list[int]:
        """The tokens this row keeps (accepted drafts, then its own), or [] when it ends here (the reason is
        appended to `failures`; it leaves at the next step, its batch-mates untouched)."""
        unusable = unusable_rows(logits.map(lambda z: z[position:position + 1, :proposed.usable]))
        if unusable:
            failures.append(row.fail(unusable[0]))
            return []
        try:
            target = row.shaped(logits.combined[position, :proposed.usable], proposed.drafts)
            if target is None:
                failures.append(row.cannot_continue())
                return []
            drafts = proposed.drafts[:target.shape[0]]  # all, unless shaping ruled a later position out
            accepted, token = verify_row(target, drafts, proposed.q(drafts), row.request.settings.sampling,
                                         proposed.randomness)
            return drafts[:accepted] + [token]
        except Exception as error:
            failures.append(row.crashed(error))
            return []

    def _record(self, rows: list[RowState], logits: RoleLogits, chosen: list[list[int]]) -> Iterator[list[Event]]:
        logprobs = torch.log_softmax(logits.combined.float(), dim=-1)
        for j in range(max(map(len, chosen))):
            events = []
            for position, row in enumerate(rows):
                if j >= len(chosen[position]) or row.finish_reason is not None:
                    continue
                token = chosen[position][j]
                try:
                    detail = row.detail(logits.map(lambda z: z[:, j]), position, token)
                    events.append(row.record(token, float(logprobs[position, j, token]), detail))
                except Exception as error:
                    events.append(row.crashed(error))
            if events:
                yield events


@dataclass
class RowDrafts:
    """One row's part of a round: p̃ is known at its first `usable` positions; `drafts` are the tokens proposed
    there (one per position, or one fewer when the last has none); `q(drafts)` the distributions they were drawn
    from (None: greedy); `randomness` its draws for this round."""
    usable: int
    drafts: list[int]
    q: Callable[[list[int]], Sequence | None]
    randomness: "PositionRandomness"
