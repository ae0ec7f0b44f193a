"""One row of a decoding: what it asks (`Request`: its prompt per role and its `Settings`), its bookkeeping
while it decodes (`RowState`: text, stop conditions, shaping, results) and what it yields (`Event` per step,
`StepDetail` when asked, `GenerationOutput` at the end). A row's failure is its own: `fail` / `crashed` end
it alone, never its batch-mates.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import FormatLimit, ProxyTuneError
from .sampling import make_generator, random_seed
from .session import RoleLogits
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
