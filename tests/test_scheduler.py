"""The server's scheduler in-process (no subprocess, no HTTP): rotation, failures, cancellation, non-joining sources.

Jobs are submitted as the HTTP handlers submit them and their queues read until "done" or "error"; every
finished row must carry the tokens the same request gets decoded alone.
"""
from __future__ import annotations

import asyncio

import pytest

from proxytune import ProxyTuner
from proxytune.server import scheduler as scheduler_module
from proxytune.server.api_errors import APIError
from proxytune.server.scheduler import Scheduler
from proxytune.server.schemas import PromptRows
from wrapped_sources import Flaky, Solo

PROMPTS = ["The quick brown", "def add(a, b):", "Answer the following question.", "Tuning language", "The lazy"]


@pytest.fixture(scope="module")
def tuner(trio, tok):
    return ProxyTuner(*trio, tokenizer=tok)


def rows(tuner, prompt, max_new_tokens=8, n=1) -> list[PromptRows]:
    requests = [tuner.request(prompt, max_new_tokens=max_new_tokens) for _ in range(n)]
    return [PromptRows(requests[0].prompts["base"], prompt, requests)]


async def drain(job, timeout=60.0) -> tuple[str, list]:
    items = []
    while True:
        kind, payload = await asyncio.wait_for(job.queue.get(), timeout)
        items.append((kind, payload))
        if kind in ("done", "error"):
            return kind, items


def run(scheduler: Scheduler, coroutine):
    scheduler.start()
    try:
        return asyncio.run(coroutine)
    finally:
        scheduler.stop()


def alone(tuner, prompt, max_new_tokens=8):
    return tuner.generate(prompt, max_new_tokens=max_new_tokens)[0].token_ids


def test_a_decoding_that_never_empties_keeps_nothing_of_the_jobs_it_finished(tuner, monkeypatch):
    scheduler = Scheduler(tuner, max_batch=8)
    decodings = []  # every decoding the scheduler starts (watching scheduler.decoding missed short-lived ones)
    start = tuner.decoding
    monkeypatch.setattr(tuner, "decoding", lambda *a, **k: decodings.append(start(*a, **k)) or decodings[-1])

    async def go():
        long = scheduler.submit(rows(tuner, PROMPTS[0], max_new_tokens=60))
        jobs = [scheduler.submit(rows(tuner, p, max_new_tokens=1 + i % 3)) for i, p in enumerate(PROMPTS * 4)]
        results = [await drain(job) for job in jobs]
        kept = [(len(d.rows), len(d.finished)) for d in decodings]  # while the long row still runs
        last = await drain(long)
        for _ in range(100):  # the engine's next step ends the emptied decoding
            if scheduler.decoding is None:
                break
            await asyncio.sleep(0.02)
        return results, kept, last

    results, kept, _ = run(scheduler, go())
    served = list(decodings)  # before alone() below decodes through tuner.decoding too
    assert [kind for kind, _ in results] == ["done"] * len(results)
    assert kept[0][1] == 0 and kept[0][0] <= 2  # the long row (and the last job, leaving at the next step)
    assert [items[-1][1][0].token_ids for _, items in results] == [
        alone(tuner, p, 1 + i % 3) for i, p in enumerate(PROMPTS * 4)]
    assert all(not d.rows and not d.finished for d in served)


def test_requests_that_finish_at_their_first_token_never_orphan_a_request_that_joins(tuner):
    """lm-eval's concurrent client: echo + max_tokens 1, a few at a time; a request submitted while every
    running row finished at its first token used to be never decoded."""
    scheduler = Scheduler(tuner, max_batch=8)

    async def go():
        async def client(i):
            results = []
            for k in range(8):
                results.append(await drain(scheduler.submit(rows(tuner, PROMPTS[(i + k) % 5], max_new_tokens=1)),
                                           timeout=30))
                await asyncio.sleep(0.001 * ((i * 7 + k) % 4))
            return results
        return await asyncio.gather(*(client(i) for i in range(4))), dict(scheduler.load)

    results, load = run(scheduler, go())
    assert [kind for client in results for kind, _ in client] == ["done"] * 32
    assert load["running_rows"] == 0 and load["finished_rows"] == 32


def test_a_model_failure_mid_batch_ends_its_rows_with_the_reason_and_the_next_request_is_served(tuner, tok):
    flaky = ProxyTuner(Flaky(tuner.sources["base"]), tuner.sources["expert"], tuner.sources["anti_expert"],
                       tokenizer=tok)
    scheduler = Scheduler(flaky, max_batch=8)

    async def go():
        first = [scheduler.submit(rows(flaky, p, max_new_tokens=12)) for p in PROMPTS[:2]]
        failed = [await drain(job) for job in first]
        later = await drain(scheduler.submit(rows(flaky, PROMPTS[2])))
        return failed, later

    failed, later = run(scheduler, go())
    for kind, items in failed:
        events = [event for k, payload in items if k == "events" for _, event in payload]
        assert events[-1].finish_reason == "error" and "went away" in events[-1].error
    assert later[0] == "done" and later[1][-1][1][0].token_ids == alone(tuner, PROMPTS[2])


def test_a_cancelled_job_leaves_the_batch_at_the_next_step(tuner):
    scheduler = Scheduler(tuner, max_batch=8)

    async def go():
        long = scheduler.submit(rows(tuner, PROMPTS[0], max_new_tokens=200, n=3))
        short = scheduler.submit(rows(tuner, PROMPTS[1]))
        kind, payload = await long.queue.get()
        while kind != "events":
            kind, payload = await long.queue.get()
        long.cancel()
        result = await drain(short)
        for _ in range(50):  # the engine frees the rows within a step or two
            if scheduler.load["running_rows"] == 0:
                break
            await asyncio.sleep(0.02)
        return result, dict(scheduler.load)

    (kind, items), load = run(scheduler, go())
    assert kind == "done" and items[-1][1][0].token_ids == alone(tuner, PROMPTS[1])
    assert load["running_rows"] == 0 and load["cancelled_rows"] == 3


def test_a_source_that_cannot_join_is_served_one_batch_after_another(tuner, tok):
    solo = ProxyTuner(Solo(tuner.sources["base"]), tuner.sources["expert"], tuner.sources["anti_expert"],
                      tokenizer=tok)
    scheduler = Scheduler(solo, max_batch=8)

    async def go():
        jobs = [scheduler.submit(rows(solo, p)) for p in PROMPTS[:3]]
        return [await drain(job) for job in jobs]

    results = run(scheduler, go())
    assert [kind for kind, _ in results] == ["done"] * 3
    assert [items[-1][1][0].token_ids for _, items in results] == [alone(tuner, p) for p in PROMPTS[:3]]


def test_after_a_model_failure_every_row_has_ended_and_the_decoding_takes_no_more(tuner, tok):
    """The server admits between two steps: a decoding whose model failed must not take rows it will never run."""
    from proxytune import ProxyTuneError
    flaky = ProxyTuner(Flaky(tuner.sources["base"]), tuner.sources["expert"], tuner.sources["anti_expert"],
                       tokenizer=tok)
    decoding = flaky.decoding([flaky.request(PROMPTS[0], max_new_tokens=20)])
    for events in decoding.steps():
        if any(e.finish_reason == "error" for e in events):
            assert not decoding.accepts_new_rows
            with pytest.raises(ProxyTuneError, match="a model failed"):
                decoding.add([flaky.request(PROMPTS[2])])
        else:
            decoding.add([flaky.request(PROMPTS[1], max_new_tokens=20)])  # one more row joins at every step
    outputs = decoding.outputs()
    assert len(outputs) > 2 and all(o.finish_reason == "error" and "went away" in o.error for o in outputs)


def test_prompt_scoring_in_chunks_equals_score_whatever_the_chunk_sizes(tuner):
    """cached == recomputed: the echo path (sessions advancing chunk by chunk, sizes changed on the way) gives
    score()'s numbers."""
    import torch

    from proxytune.engine.scoring import score_in_chunks

    item = tuner.score_item("Answer the following question.", " The quick brown fox jumps over the lazy dog")
    want = tuner.score_items([item], top=3)[0]
    for sizes in ([1], [3], [128], [2, 5, 1, 7]):
        parts = score_in_chunks(tuner.sources["base"], tuner.pairs, item, tuner.alphas, top=3, chunk=sizes[0])
        got, step = [next(parts)], 0
        while True:
            step += 1
            try:
                got.append(parts.send(sizes[step % len(sizes)]))
            except StopIteration:
                break
        assert [t for g in got for t in g.token_ids] == want.token_ids
        assert torch.allclose(torch.tensor([lp for g in got for lp in g.logprobs]), torch.tensor(want.logprobs),
                              atol=1e-4)
        assert [ids for g in got for ids, _ in (t[0] for t in g.top)] == [t[0][0] for t in want.top]


def test_a_long_echo_is_scored_between_decoding_steps_and_never_stalls_a_stream(tuner, monkeypatch):
    """While rows decode, the engine alternates: one decoding step, one scoring chunk (sized to take at most about
    two steps), never a whole long prompt between two tokens of a stream."""
    scheduler = Scheduler(tuner, max_batch=8)
    prompt = " ".join(["fox"] * 110)  # 220 tokens of the 256 the tiny context holds
    actions: list[str] = []
    step, score = Scheduler._step, Scheduler._score_chunk
    monkeypatch.setattr(Scheduler, "_step", lambda self: (actions.append("step"), step(self))[1])
    monkeypatch.setattr(Scheduler, "_score_chunk", lambda self: (
        actions.append("score beside rows" if self.decoding is not None else "score alone"), score(self))[1])

    async def go():
        stream = scheduler.submit(rows(tuner, PROMPTS[0], max_new_tokens=60))
        while (await stream.queue.get())[0] != "events":
            pass
        echo = scheduler.submit(rows(tuner, prompt, max_new_tokens=1), echo_top=1, generates=False)
        return await asyncio.gather(drain(stream), drain(echo))

    (stream_kind, _), (echo_kind, items) = run(scheduler, go())
    assert stream_kind == echo_kind == "done"
    scored = next(payload for kind, payload in items if kind == "prompt")[0]
    assert len(scored) == len(rows(tuner, prompt)[0].prompt_ids)
    beside = [i for i, action in enumerate(actions) if action == "score beside rows"]
    assert len(beside) >= 2  # the prompt took several chunks while the stream ran
    assert all(actions[i + 1] == "step" for i in beside if i + 1 < len(actions))  # a step after every chunk


def test_a_reader_that_stops_taking_its_events_is_dropped_and_its_rows_leave(tuner, monkeypatch):
    """A streaming client that stopped reading: its queue holds at most MAX_PENDING_ITEMS, then the job is
    cancelled, its handler told (`dropped`), and a healthy request is served as usual."""
    monkeypatch.setattr(scheduler_module, "MAX_PENDING_ITEMS", 8)
    scheduler = Scheduler(tuner, max_batch=8)

    async def go():
        stalled = scheduler.submit(rows(tuner, PROMPTS[0], max_new_tokens=200, n=2))
        await asyncio.wait_for(stalled.dropped.wait(), 60)
        healthy = await drain(scheduler.submit(rows(tuner, PROMPTS[1])))
        for _ in range(100):
            if scheduler.load["running_rows"] == 0:
                break
            await asyncio.sleep(0.02)
        items = [stalled.queue.get_nowait() for _ in range(stalled.queue.qsize())]
        return items, healthy, dict(scheduler.load)

    items, (kind, healthy), load = run(scheduler, go())
    assert len(items) <= 8 + 2 and items[8][0] == "error" and items[8][1].code == "reader_too_slow"
    assert kind == "done" and healthy[-1][1][0].token_ids == alone(tuner, PROMPTS[1])
    assert load["running_rows"] == 0 and load["cancelled_rows"] == 2


def test_a_client_with_many_requests_waiting_does_not_starve_one_with_few(tuner):
    scheduler = Scheduler(tuner, max_batch=1, max_queue=64)
    order = []

    async def go():
        async def served(job, name):
            await drain(job)
            order.append(name)
        busy = [served(scheduler.submit(rows(tuner, PROMPTS[i % 5], max_new_tokens=3), client="busy"), f"busy{i}")
                for i in range(8)]
        await asyncio.sleep(0)
        polite = served(scheduler.submit(rows(tuner, PROMPTS[1], max_new_tokens=3), client="polite"), "polite")
        await asyncio.gather(*busy, polite)

    run(scheduler, go())
    assert order.index("polite") <= 2, order  # its turn came after at most two of the busy client's requests


def test_one_client_may_fill_at_most_half_the_queue(tuner):
    scheduler = Scheduler(tuner, max_batch=1, max_queue=4)  # not started: everything stays waiting

    async def go():
        flood = [scheduler.submit(rows(tuner, PROMPTS[0]), client="flood") for _ in range(2)]
        with pytest.raises(APIError) as refused:
            scheduler.submit(rows(tuner, PROMPTS[0]), client="flood")
        other = scheduler.submit(rows(tuner, PROMPTS[1]), client="other")
        return flood, refused.value, other

    flood, refused, other = asyncio.run(go())
    assert refused.status == 429 and refused.code == "too_many_waiting" and refused.headers["Retry-After"] == "1"
    assert len(scheduler.waiting) == 3 and scheduler.waiting.waiting("other") == 1
