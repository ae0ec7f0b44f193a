"""The sessions of every role over one batch, combined at each step, with each call's time measured.

A source given the same prompts for two roles (expert == anti-expert, or the same model as base) is
run once and its logits shared. Every advance is timed per group of roles sharing a session and per
width (tokens per row), so speculative decoding can weigh what a draft really costs on each backend.
"""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch

from ..backends.protocol import Draft, LogitSource, Session
from ..errors import ProxyTuneError
from .combine import combined_logits
from .roles import ExpertPair, Roles


@dataclass
class RoleLogits:
    roles: Roles
    base: torch.Tensor
    experts: list[torch.Tensor]
    anti_experts: list[torch.Tensor]
    combined: torch.Tensor

    def by_role(self) -> dict[str, torch.Tensor]:
        named = {"base": self.base}
        for (expert, anti), e, a in zip(self.roles.pairs, self.experts, self.anti_experts):
            named[expert], named[anti] = e, a
        return named

    def map(self, function) -> "RoleLogits":
        """The same transformation (a position, a row slice) applied to every role's logits."""
        return RoleLogits(self.roles, function(self.base), [function(e) for e in self.experts],
                          [function(a) for a in self.anti_experts], function(self.combined))


def combine(roles: Roles, logits: dict[str, torch.Tensor], alphas: torch.Tensor,
            every_model_writes: bool = False, alone: Sequence[str | None] = ()) -> RoleLogits:
    """RoleLogits from each role's logits ([B, V] or [B, k, V]) and per-row α [B, P]. A row whose `alone`
    names a role is decoded from that role's own logits instead (base alone, expert alone, side by side with
    proxy rows in one batch); where every model must write, what any rules out stays ruled out."""
    base = logits["base"]
    device = base.device
    experts = [logits[name].to(device) for name in roles.experts]
    antis = [logits[name].to(device) for name in roles.anti_experts]
    combined = combined_logits(base, experts, antis, alphas.to(device), every_model_writes)
    for row, role in enumerate(alone):
        if role is not None:
            own = logits[role][row].to(device)
            combined[row] = own.masked_fill(combined[row].isneginf(), float("-inf")) if every_model_writes else own
    return RoleLogits(roles, base, experts, antis, combined)


def moving_average(old: float | None, new: float, memory: float = 0.7) -> float:
    """An exponential moving average: follows a machine whose load changes."""
    return new if old is None else memory * old + (1 - memory) * new


class StepTimes:
    """Seconds per advance call of each group of roles sharing a session, by width (tokens per row):
    an exponential moving average, so it follows a machine whose load changes."""

    def __init__(self, memory: float = 0.7):
        self.memory = memory
        self.seconds: dict[tuple[frozenset, int], float] = {}

    def record(self, group: frozenset, width: int, seconds: float) -> None:
        key = (group, width)
        old = self.seconds.get(key)
        self.seconds[key] = moving_average(old, seconds, self.memory)

    def widths(self, group: frozenset) -> dict[int, float]:
        return {w: s for (g, w), s in self.seconds.items() if g == group}


def timed(function, *args, **kwargs) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = function(*args, **kwargs)
    if out.is_cuda:  # kernels are asynchronous: the time is the work's, not the launch's
        torch.cuda.synchronize(out.device)
    return out, time.perf_counter() - start


def role_sources(base: LogitSource, pairs: Sequence[ExpertPair]) -> dict[str, LogitSource]:
    """Role name -> source: "base", then each pair's expert and anti-expert roles."""
    sources = {"base": base}
    for (expert, anti), pair in zip(Roles(len(pairs)).pairs, pairs):
        sources[expert], sources[anti] = pair.expert, pair.anti_expert
    return sources


def concurrent_groups(places: Sequence[frozenset | None]) -> list[list[int]]:
    """Indices grouped so that no two groups share hardware: places that overlap (or are unknown, None) fall
    in one group. Groups can run at the same time; within a group, calls keep their order."""
    groups: list[tuple[set, list[int]]] = []
    for index, place in enumerate(places):
        touching = [g for g in groups if place is None or g[0] is None or g[0] & place]
        merged_place = None if place is None or any(g[0] is None for g in touching) else set(place)
        merged: list[int] = []
        for g in touching:
            if merged_place is not None:
                merged_place |= g[0]
            merged += g[1]
            groups.remove(g)
        groups.append((merged_place, sorted(merged + [index])))
    return sorted((indices for _, indices in groups), key=lambda indices: indices[0])


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="proxytune-role")
    return _POOL


def run_by_place(calls: dict, places: dict) -> dict:
    """{key: call()} for every key; calls whose places are disjoint run concurrently (torch and HTTP waits
    release the GIL), so a step costs about its slowest place, not the sum. Within a place, calls run in
    order and stop at the first error, as one after another would; the first error in key order is raised
    once every group is done (so no call is still running when the caller rolls the step back)."""
    keys = list(calls)
    groups = concurrent_groups([places[key] for key in keys])
    if len(groups) == 1:
        return {key: calls[key]() for key in keys}

    def run(indices: list[int]) -> dict:
        done = {}
        for i in indices:
            try:
                done[keys[i]] = calls[keys[i]]()
            except BaseException as error:  # handed to the caller's thread below
                done[keys[i]] = _Failed(error)
                break
        return done

    finished: dict = {}
    for future in [_pool().submit(run, indices) for indices in groups]:
        finished.update(future.result())
    for key in keys:
        if isinstance(finished.get(key), _Failed):
            raise finished[key].error
    return {key: finished[key] for key in keys}


@dataclass
class _Failed:
    error: BaseException


class ProxySession:
    """Sessions of every role over one batch of rows; `prefill`/`advance` return the combined logits.
    Sessions whose declared places are disjoint step concurrently (`run_by_place`); `concurrent = False`
    runs them one after another (benchmarks compare the two)."""

    concurrent = True

    def __init__(self, base: LogitSource, pairs: Sequence[ExpertPair], prompts: dict[str, list[list[int]]],
                 alphas: torch.Tensor, times: StepTimes | None = None, alone: Sequence[str | None] | None = None):
        self.roles = Roles(len(pairs))
        self.alphas = alphas
        self.alone = list(alone) if alone is not None else [None] * len(alphas)  # per row: a role decoded alone
        self.times = times if times is not None else StepTimes()
        self.sources = role_sources(base, pairs)
        self.stepped: dict[tuple, None] = {}  # sessions advanced since the last settle(), in order
        sharing: dict[tuple, list[str]] = {}  # roles with the same source and the same prompts share a session
        for role, source in self.sources.items():
            sharing.setdefault((id(source), tuple(map(tuple, prompts[role]))), []).append(role)
        # a session's key is the tuple of its roles: bounded by the roles, whatever joined since
        self.sessions: dict[tuple, Session] = {tuple(roles): self.sources[roles[0]].open(prompts[roles[0]])
                                               for roles in sharing.values()}
        self.session_of: dict[str, tuple] = {role: tuple(roles) for roles in sharing.values() for role in roles}

    def group(self, key: tuple) -> frozenset:
        """The roles that share the session `key` (a session's key is the tuple of its roles)."""
        return frozenset(key)

    def collect(self, outputs: dict[tuple, torch.Tensor]) -> RoleLogits:
        """Combined logits from each session's output (keyed like `sessions`)."""
        return combine(self.roles, {role: outputs[key] for role, key in self.session_of.items()}, self.alphas,
                       any(s.capabilities.must_write for s in self.sessions.values()), self.alone)

    def each_session(self, call, but: tuple | None = None) -> dict[tuple, torch.Tensor]:
        """{key: call(key)} over the sessions (all `but` one), concurrently where their places allow."""
        calls = {key: (lambda key=key: call(key)) for key in self.sessions if key != but}
        if not self.concurrent:
            return {key: run() for key, run in calls.items()}
        return run_by_place(calls, {key: self.sessions[key].capabilities.place for key in calls})

    def advance_all(self, tokens: torch.Tensor, but: tuple | None = None) -> dict[tuple, torch.Tensor]:
        """Every session (all `but` one) advanced by `tokens`, timed: {key: logits}."""
        return self.each_session(lambda key: self.advance_session(key, tokens), but)

    def prefill(self) -> RoleLogits:
        return self.collect(self.each_session(lambda key: self.sessions[key].prefill()))

    def advance_session(self, key: tuple, tokens: torch.Tensor, extend: bool = False) -> torch.Tensor:
        """One session's advance, timed."""
        out, seconds = timed(self.sessions[key].advance, tokens, extend=extend)
        self.stepped[key] = None
        self.times.record(self.group(key), tokens.shape[1], seconds)
        return out

    @property
    def base_session(self) -> Session:
        return self.sessions[self.session_of["base"]]

    @property
    def base_drafts(self) -> bool:
        """Whether the base's session declares `draft` (it can continue rows itself: a remote base)."""
        return self.base_session.capabilities.draft

    def draft_session(self, key: tuple, tokens: torch.Tensor, widths: Sequence[int], temperatures: Sequence[float],
                      seeds: Sequence[int]) -> Draft:
        """One drafting session's draft (see Session.draft), timed like an advance of its width."""
        start = time.perf_counter()
        draft = self.sessions[key].draft(tokens, widths, temperatures, seeds)
        self.stepped[key] = None
        self.times.record(self.group(key), draft.fed.shape[1], time.perf_counter() - start)
        return draft

    def settle(self) -> None:
        """The step went through for every session: nothing of it is to be undone any more."""
        self.stepped = {}

    def undo_step(self) -> list[str]:
        """Rewind the sessions that advanced since the last `settle()` (a later one refused some rows and
        left its own state untouched), so the step can run again without those rows. Returns the sessions
        that cannot roll back (empty: the step is undone everywhere)."""
        keys, self.stepped = list(self.stepped), {}
        cannot = [self.label(key) for key in keys if not self.sessions[key].capabilities.rollback]
        if cannot:
            return cannot
        for key in keys:
            self.sessions[key].rewind([0] * len(self.alphas))
        return []

    def advance(self, tokens: torch.Tensor) -> RoleLogits:
        return self.collect(self.advance_all(tokens))

    def rewind(self, keep: Sequence[int]) -> None:
        for session in self.sessions.values():
            session.rewind(keep)

    def select(self, rows: Sequence[int]) -> None:
        for session in self.sessions.values():
            session.select(rows)
        self.alphas = self.alphas[list(rows)]
        self.alone = [self.alone[r] for r in rows]

    def lacking(self, capability: str) -> list[str]:
        """The sessions that do not declare `capability` ("rollback" | "join" | "fork"), as
        "roles (session type)" for messages; empty when every session declares it."""
        return [self.label(key) for key, s in self.sessions.items() if not getattr(s.capabilities, capability)]

    def label(self, key: tuple) -> str:
        """A session for messages: "roles (session type)"."""
        return f"{'/'.join(sorted(self.group(key)))} ({type(self.sessions[key]).__name__})"

    def join(self, other: "ProxySession") -> None:
        """Append the rows of `other` (prefilled, same sources) to this batch: continuous batching.

        Roles share a session only while they share the source and the tokens of every row; a
        session shared on one side but not on the other is forked so that each role keeps its own.
        """
        groups: dict[tuple, list[str]] = {}
        for role, mine in self.session_of.items():
            groups.setdefault((mine, other.session_of[role]), []).append(role)
        uses_mine = Counter(mine for mine, _ in groups)
        uses_theirs = Counter(theirs for _, theirs in groups)
        sessions: dict[tuple, Session] = {}
        session_of: dict[str, tuple] = {}
        for (mine, theirs), roles in groups.items():
            left, right = self.sessions[mine], other.sessions[theirs]
            if not (left.capabilities.join and right.capabilities.join):
                raise ProxyTuneError(f"the {'/'.join(roles)} session ({type(left).__name__}) cannot take rows into a "
                                     f"running batch; decode such requests one batch at a time")
            uses_mine[mine] -= 1
            uses_theirs[theirs] -= 1
            if uses_mine[mine]:  # the last user takes the original, the others a copy
                left = fork(left, roles)
            if uses_theirs[theirs]:
                right = fork(right, roles)
            left.join(right)
            sessions[tuple(roles)] = left
            session_of.update({role: tuple(roles) for role in roles})
        self.sessions, self.session_of = sessions, session_of
        self.alphas = torch.cat([self.alphas, other.alphas.to(self.alphas.device)])
        self.alone += other.alone


def fork(session: Session, roles: Sequence[str]) -> Session:
    if not session.capabilities.fork:
        raise ProxyTuneError(f"the {'/'.join(roles)} session ({type(session).__name__}) cannot be copied, and joining "
                             f"these rows needs a copy: decode them in a batch of their own")
    return session.fork()
