"""Continuous batching proven over schedules, not sampled: rows join, are cancelled, finish at their first
token and fail at random steps, and every row still ends with exactly the tokens it gets decoded alone.

Most schedules run on sources with no model behind them (fake_source.py: a row's logits are a function of its
own tokens), so hundreds of schedules and ten thousand joins take seconds; a few run on the tiny random trio,
whose sessions hold real KV caches.
"""
from __future__ import annotations

import random

import pytest

from fake_source import FakeSource, fake_trio, row_logits
from proxytune import ProxyTuner
from proxytune.engine.decoding import Decoding
from wrapped_sources import Poisoned

POISON = 7  # a prompt holding this token is refused, NaN or raises in the poisoned base (a failing row)


def random_request(tuner: ProxyTuner, rng: random.Random, poisoned: bool):
    vocab = len(tuner.tokenizer)
    prompt = [rng.randrange(8, vocab) for _ in range(rng.randint(1, 6))]
    if poisoned:
        prompt[rng.randrange(len(prompt))] = POISON
    ids = {role: list(prompt) for role in tuner.sources}
    sampled = rng.random() < 0.4
    request = tuner.request("x", max_new_tokens=rng.choice([1, 1, 2, 3, 5, 8, 13]),
                            temperature=0.8 if sampled else 0.0, seed=rng.randrange(1000))
    request.prompts = ids
    return request


class Schedule:
    """A random interleaving of add / cancel / next over decodings (a new one when the batch empties), every
    event recorded per row; rows are named (decoding number, row index)."""

    def __init__(self, tuner: ProxyTuner, rng: random.Random, speculative: bool, poison_rate: float):
        self.tuner, self.rng, self.speculative, self.poison_rate = tuner, rng, speculative, poison_rate
        self.requests, self.tokens, self.ended, self.cancelled = {}, {}, {}, set()

    def new_requests(self, n: int) -> list:
        return [random_request(self.tuner, self.rng, self.rng.random() < self.poison_rate) for _ in range(n)]

    def run(self, joins: int) -> None:
        generation = 0
        while joins > 0:
            first = self.new_requests(self.rng.randint(1, 3))
            decoding = self.tuner.decoding(first, speculative=self.speculative)
            self.requests.update(((generation, row), r) for row, r in enumerate(first))
            for events in decoding.steps():
                for event in events:
                    row = (generation, event.row)
                    assert row not in self.ended, f"row {row} got an event after it ended"
                    if event.token_id is not None:
                        self.tokens.setdefault(row, []).append(event.token_id)
                    if event.finish_reason is not None:
                        self.ended[row] = event.finish_reason
                joins = self.act(decoding, generation, joins)
            generation += 1

    def act(self, decoding: Decoding, generation: int, joins: int) -> int:
        if joins > 0 and self.rng.random() < 0.5 and decoding.accepts_new_rows:
            new = self.new_requests(self.rng.randint(1, 3))
            self.requests.update(((generation, row), r) for row, r in zip(decoding.add(new), new))
            joins -= 1
        live = [row for row in self.requests if row[0] == generation and row not in self.ended
                and row not in self.cancelled]
        if live and self.rng.random() < 0.15:
            row = self.rng.choice(live)
            decoding.cancel([row[1]])
            self.cancelled.add(row)
        return joins - (self.rng.random() < 0.3)  # also count steps, so every schedule ends


def alone(tuner: ProxyTuner, request, speculative: bool):
    decoding = tuner.decoding([request], speculative=speculative)
    for _ in decoding.steps():
        pass
    return decoding.output(0)


def check(schedule: Schedule, tuner: ProxyTuner | None = None) -> None:
    """Every row against its decoding alone by `tuner` (the schedule's own, or the same models unpoisoned)."""
    tuner = tuner or schedule.tuner
    for row, request in schedule.requests.items():
        reference = alone(tuner, request, schedule.speculative)
        got = schedule.tokens.get(row, [])
        if row in schedule.cancelled:
            assert got == reference.token_ids[:len(got)], f"cancelled row {row} went its own way before it ended"
            continue
        assert row in schedule.ended, f"row {row} never ended"
        if POISON in request.prompts["base"]:  # it fails once its base starts failing, exact until then
            assert got == reference.token_ids[:len(got)], f"poisoned row {row} went its own way before it failed"
            assert schedule.ended[row] == "error" or got == reference.token_ids, f"row {row} neither failed nor ended"
            continue
        assert got == reference.token_ids, f"row {row} differs from its own decoding alone"
        assert schedule.ended[row] == reference.finish_reason


@pytest.fixture(scope="module")
def fake_tuner(tok):
    return ProxyTuner(*fake_trio(len(tok)), tokenizer=tok)


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_every_row_of_a_random_schedule_equals_its_decoding_alone(fake_tuner, speculative):
    for seed in range(40):
        schedule = Schedule(fake_tuner, random.Random(seed), speculative, poison_rate=0.0)
        schedule.run(joins=25)
        check(schedule)


@pytest.mark.parametrize("how", ["refuse", "nan", "raise"])
def test_rows_failing_at_random_steps_end_alone_and_the_others_are_unchanged(tok, how):
    base, expert, anti = fake_trio(len(tok))
    for seed in range(30):
        rng = random.Random(1000 + seed)
        poisoned = Poisoned(base, POISON, how=how, after=rng.randint(0, 3))
        tuner = ProxyTuner(poisoned, expert, anti, tokenizer=tok)
        schedule = Schedule(tuner, rng, speculative=False, poison_rate=0.2)
        schedule.run(joins=20)
        check(schedule, ProxyTuner(base, expert, anti, tokenizer=tok))


def test_random_schedules_on_real_kv_caches(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    for seed in range(4):
        schedule = Schedule(tuner, random.Random(seed), speculative=seed % 2 == 1, poison_rate=0.0)
        schedule.run(joins=8)
        check(schedule)


def test_a_row_added_while_the_first_tokens_of_the_last_joiners_are_out_is_decoded(fake_tuner):
    """The join race lm-eval's concurrent client hit: every running row finished at its first token, and a
    row added during that step was never decoded."""
    one, three = (random_request(fake_tuner, random.Random(s), False) for s in (1, 2))
    one.settings, three.settings = one.settings.but(max_new_tokens=1), three.settings.but(max_new_tokens=3)
    decoding = fake_tuner.decoding([one])
    steps = decoding.steps()
    next(steps)
    decoding.add([one])
    next(steps)
    (late,) = decoding.add([three])
    finished = [event for events in steps for event in events if event.finish_reason]
    assert [event.row for event in finished] == [late]
    assert decoding.output(late).token_ids == alone(fake_tuner, three, False).token_ids


def test_ten_thousand_joins_keep_the_state_of_the_live_rows_only(fake_tuner):
    """A batch that never empties for 10,000 joins: session keys, rows and kept outputs stay bounded by what
    is live, and the long row and every joiner are exact."""
    rng = random.Random(0)
    long = random_request(fake_tuner, rng, False)
    long.settings = long.settings.but(max_new_tokens=10_005, sampling=long.settings.sampling.__class__())  # greedy
    short = [random_request(fake_tuner, rng, False) for _ in range(4)]
    for request in short:
        request.settings = request.settings.but(max_new_tokens=rng.choice([1, 2]))
    expected = [alone(fake_tuner, r, False).token_ids for r in short]
    decoding = fake_tuner.decoding([long])
    steps = decoding.steps()
    next(steps)
    joined = 0
    for events in steps:
        for event in events:
            if event.finish_reason is not None and event.row != 0:
                output = decoding.take(event.row)
                assert output.token_ids == expected[(event.row - 1) % 4]
        if joined < 10_000:
            decoding.add([short[joined % 4]])
            joined += 1
        assert len(decoding.rows) <= 6 and len(decoding.finished) <= 2  # the live rows, not the 10,000
        assert all(len(key) <= 3 and all(isinstance(role, str) for role in key) for key in decoding.session.sessions)
    assert joined == 10_000
    assert decoding.output(0).token_ids == naive_greedy(fake_tuner, long)


def naive_greedy(tuner: ProxyTuner, request) -> list[int]:
    """argmax of z_base + (z_expert − z_anti_expert), recomputed from each fake source's own function."""
    base, expert, anti = (tuner.sources[role] for role in ("base", "expert", "anti_expert"))
    tokens = list(request.prompts["base"])
    for _ in range(request.settings.max_new_tokens):
        z = sum(sign * row_logits(tokens, source.seed, source.vocab_size)
                for sign, source in ((1, base), (1, expert), (-1, anti)))
        token = int(z.argmax())
        if token in tuner.eos_token_ids:
            break
        tokens.append(token)
    return tokens[len(request.prompts["base"]):]


def test_a_taken_or_discarded_row_leaves_nothing_behind_and_stale_indices_are_ignored(fake_tuner):
    requests = [random_request(fake_tuner, random.Random(s), False) for s in range(3)]
    for request in requests:
        request.settings = request.settings.but(max_new_tokens=2)
    decoding = fake_tuner.decoding(requests)
    decoding.discard([1])
    for _ in decoding.steps():
        pass
    assert decoding.take(0).token_ids == alone(fake_tuner, requests[0], False).token_ids
    decoding.cancel([0, 1, 99])  # finished, discarded, never there: nothing happens
    assert list(decoding.finished) == [2] and not decoding.rows


def test_fake_source_is_a_real_source(tok):
    """The fake's logits after a prefix are what its sessions give (so its alone references mean something)."""
    source = FakeSource(5, len(tok))
    session = source.open([[3, 4, 5]])
    first = session.prefill()
    after = session.advance(__import__("torch").tensor([[9]]))
    full = source.sequence_logits([[3, 4, 5, 9]])[0]
    assert (first[0] == full[2]).all() and (after[0, 0] == full[3]).all()
