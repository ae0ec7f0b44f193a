"""Expert and anti-expert in ONE forward, when the expert is a LoRA adapter of the anti-expert.

The usual task-finetuning trio has expert = anti-expert + a LoRA adapter. Their weights are already
shared (loading.py runs the anti-expert as the same peft model with the adapter off), but a plain
proxy step still reads those weights twice, once per role. Here both roles' rows go through the
model together as one batch of 2·B rows: the first B with the adapter on, the last B with it off
(peft's mixed-adapter batch, `adapter_names=[...]`). On a memory-bound CPU or GPU, reading the
small model's weights once for both roles makes the pair cost little more than one small step.

The decoder still sees two ordinary sources, `pair.expert` and `pair.anti_expert`. Opening one
right after the other (as `ProxySession` does) couples their sessions: whichever role asks first
runs the joint forward, and the other role's half waits until it asks for the same tokens. A role
opened on its own (e.g. "expert alone" in `--compare`) simply runs alone.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from .protocol import Capabilities
from .transformers import TransformersSession, TransformersSource, end_of_text_ids

EXPERT, ANTI_EXPERT = 0, 1
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


class MixedAdapterSource(TransformersSource):
    """The peft model over a batch whose first half runs the adapter and second half runs without."""

    def __init__(self, model, adapter: str, vocab_size: int):
        super().__init__(model, vocab_size=vocab_size, name="expert+anti_expert")
        self.adapter = adapter

    def forward(self, **inputs) -> torch.Tensor:
        half = inputs["input_ids"].shape[0] // 2
        inputs["adapter_names"] = [self.adapter] * half + [BASE_ADAPTER] * half
        return super().forward(**inputs)


class PairedRole(TransformersSource):
    """One role of a `LoraPair`: a normal transformers source whose sessions pair up."""

    def __init__(self, pair: "LoraPair", side: int, name: str):
        super().__init__(pair.model, name=name, adapter_disabled=side == ANTI_EXPERT)
        self.pair, self.side = pair, side
        self.eos_token_ids = pair.eos_token_ids

    def open(self, prompts: Sequence[Sequence[int]]) -> "HalfSession":
        return self.pair.open_half(self, prompts)


class LoraPair:
    """A peft model serving as both expert (adapter on) and anti-expert (adapter off). `eos_token_ids`: the
    ids ending either role's text (default: the model's generation config's)."""

    def __init__(self, peft_model, adapter: str | None = None, eos_token_ids: frozenset[int] | None = None):
        self.model = peft_model.eval()
        self.adapter = adapter or peft_model.active_adapter
        self.eos_token_ids = end_of_text_ids(self.model) if eos_token_ids is None else frozenset(eos_token_ids)
        self.expert = PairedRole(self, EXPERT, "expert")
        self.anti_expert = PairedRole(self, ANTI_EXPERT, "anti_expert")
        self._last_opened: HalfSession | None = None
        self._joint_source: MixedAdapterSource | None = None

    def open_half(self, role: PairedRole, prompts) -> "HalfSession":
        half = HalfSession(role, prompts)
        waiting = self._last_opened
        if waiting is not None and waiting.role.side != role.side and waiting.unstarted \
                and len(waiting.prompts) == len(half.prompts):
            waiting.partner, half.partner = half, waiting
            self._last_opened = None
        else:
            self._last_opened = half
        return half

    def joint_session(self, expert: "HalfSession", anti_expert: "HalfSession") -> "JointSession":
        if self._joint_source is None:  # one source object: sessions of the same source can be joined
            width = max(self.expert.vocab_size, self.anti_expert.vocab_size)
            self._joint_source = MixedAdapterSource(self.model, self.adapter, width)
        session = TransformersSession(self._joint_source, expert.prompts + anti_expert.prompts)
        return JointSession(session, len(expert.prompts))


class JointSession:
    """One TransformersSession over [expert rows; anti-expert rows], handing each half to its role.

    Both roles always receive the same tokens (only their prompts differ), so the first role to
    advance runs the forward for both and the other role's logits wait in `pending` until it asks.
    Rewind/select/join are applied by the first role to call them and checked for the second.
    """

    def __init__(self, session: TransformersSession, batch: int):
        self.session, self.batch = session, batch
        self.pending: dict[int, list[tuple[torch.Tensor | None, torch.Tensor]]] = {EXPERT: [], ANTI_EXPERT: []}
        self.owed: dict[int, list[tuple]] = {EXPERT: [], ANTI_EXPERT: []}

    def _split(self, side: int, tokens: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        mine, theirs = (logits[: self.batch], logits[self.batch:])[::1 if side == EXPERT else -1]
        self.pending[1 - side].append((tokens, theirs))
        return mine

    def prefill(self, side: int) -> torch.Tensor:
        if self.pending[side]:
            tokens, logits = self.pending[side].pop(0)
            if tokens is not None:
                raise RuntimeError("a LoRA pair role prefilled after its partner had already advanced")
            return logits
        return self._split(side, None, self.session.prefill())

    def advance(self, side: int, tokens: torch.Tensor, extend: bool) -> torch.Tensor:
        tokens = tokens.reshape(tokens.shape[0], -1).long().cpu()
        queue = self.pending[side]
        if not queue:
            return self._split(side, tokens, self.session.advance(torch.cat([tokens, tokens]), extend=extend))
        handed, width = [], 0
        while queue and width < tokens.shape[1]:  # the partner drafted token by token; we verify at once
            handed.append(queue.pop(0))
            width += handed[-1][1].shape[1]
        if width != tokens.shape[1] or not torch.equal(torch.cat([t for t, _ in handed], dim=1), tokens):
            raise RuntimeError("the two roles of a LoRA pair were fed different tokens")
        return torch.cat([logits for _, logits in handed], dim=1)

    def structural(self, side: int, operation: str, argument, apply) -> None:
        if self.owed[side]:
            expected = self.owed[side].pop(0)
            if expected != (operation, argument):
                raise RuntimeError(f"LoRA pair roles diverged: {expected} vs {(operation, argument)}")
            return
        if self.pending[EXPERT] or self.pending[ANTI_EXPERT]:
            raise RuntimeError(f"{operation} on a LoRA pair while one role has logits it has not collected")
        apply()
        self.owed[1 - side].append((operation, argument))

    def rewind(self, side: int, keep: Sequence[int]) -> None:
        keep = [int(k) for k in keep]
        self.structural(side, "rewind", tuple(keep), lambda: self.session.rewind(keep + keep))

    def select(self, side: int, rows: Sequence[int]) -> None:
        rows = [int(r) for r in rows]

        def apply():
            self.session.select(rows + [self.batch + r for r in rows])
            self.batch = len(rows)
        self.structural(side, "select", tuple(rows), apply)

    def join(self, side: int, other: "JointSession") -> None:
        def apply():
            mine, theirs = self.batch, other.batch
            self.session.join(other.session)  # rows: [E, A, E', A'] -> reorder to [E, E', A, A']
            order = (list(range(mine)) + list(range(2 * mine, 2 * mine + theirs))
                     + list(range(mine, 2 * mine)) + list(range(2 * mine + theirs, 2 * (mine + theirs))))
            self.session.select(order)
            self.batch = mine + theirs
        self.structural(side, "join", id(other), apply)


class HalfSession:
    """A role's view of a JointSession (or, with no partner, a plain session of that role alone).

    A half running alone can be copied (`fork`: the byte-level view branches its rows); a half of a joint
    session cannot, since a copy of one half would leave its partner's rows behind. The engine's own
    joins never need to, since the two halves belong to two roles that never share a session."""

    capabilities = Capabilities(rollback=True, join=True, fork=True, gather=True)

    def __init__(self, role: PairedRole, prompts):
        self.role = role
        self.capabilities = replace(HalfSession.capabilities, place=role.place)
        self.prompts = [list(p) for p in prompts]
        self.partner: HalfSession | None = None
        self.joint: JointSession | None = None
        self.alone: TransformersSession | None = None

    @property
    def unstarted(self) -> bool:
        return self.joint is None and self.alone is None

    def _start(self) -> None:
        if not self.unstarted:
            return
        if self.partner is None or not self.partner.unstarted:
            self.alone = TransformersSession(self.role, self.prompts)
            return
        expert, anti = (self, self.partner) if self.role.side == EXPERT else (self.partner, self)
        self.joint = self.partner.joint = self.role.pair.joint_session(expert, anti)

    def _cut(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.role.vocab_size]

    def prefill(self) -> torch.Tensor:
        self._start()
        if self.alone is not None:
            return self.alone.prefill()
        return self._cut(self.joint.prefill(self.role.side))

    def advance(self, tokens: torch.Tensor, extend: bool = False) -> torch.Tensor:
        if self.alone is not None:
            return self.alone.advance(tokens, extend=extend)
        return self._cut(self.joint.advance(self.role.side, tokens, extend))

    def rewind(self, keep: Sequence[int]) -> None:
        if self.alone is not None:
            return self.alone.rewind(keep)
        self.joint.rewind(self.role.side, keep)

    def select(self, rows: Sequence[int]) -> None:
        if self.alone is not None:
            return self.alone.select(rows)
        self.joint.select(self.role.side, rows)

    def fork(self, rows: Sequence[int] | None = None) -> "HalfSession":
        if self.alone is None:
            raise RuntimeError("a half of a joint LoRA-pair session cannot be copied without its partner")
        copy = self.alone.fork(rows)
        twin = HalfSession(self.role, copy.prompts)
        twin.alone = copy
        return twin

    def gather(self, parts: Sequence[tuple["HalfSession", Sequence[int]]]) -> "HalfSession":
        """(halves running alone, as the byte view's are) their sessions' gather."""
        if any(half.alone is None for half, _ in parts):
            raise RuntimeError("a half of a joint LoRA-pair session cannot be copied without its partner")
        copy = self.alone.gather([(half.alone, rows) for half, rows in parts])
        twin = HalfSession(self.role, copy.prompts)
        twin.alone = copy
        return twin

    def join(self, other: "HalfSession") -> None:
        if self.alone is not None and other.alone is not None:
            return self.alone.join(other.alone)
        if self.joint is None or other.joint is None:
            raise RuntimeError("cannot join a paired LoRA session with an unpaired one")
        self.joint.join(self.role.side, other.joint)


def pair_lora_roles(sources: dict[str, TransformersSource], pairs: Sequence[tuple[str, str]]) -> dict:
    """Replace each (expert, anti_expert) role pair that runs one peft model with the adapter on and
    off by the two roles of a LoraPair. Sources used by a third role are left as they are."""
    sources = dict(sources)
    for expert_role, anti_role in pairs:
        expert, anti = sources[expert_role], sources[anti_role]
        shared_elsewhere = [r for r, s in sources.items() if s in (expert, anti) and r not in (expert_role, anti_role)]
        if (type(expert) is TransformersSource and type(anti) is TransformersSource and expert.model is anti.model
                and not expert.adapter_disabled and anti.adapter_disabled and not shared_elsewhere
                and hasattr(expert.model, "peft_config")):
            pair = LoraPair(expert.model, eos_token_ids=expert.eos_token_ids | anti.eos_token_ids)
            sources[expert_role], sources[anti_role] = pair.expert, pair.anti_expert
    return sources
