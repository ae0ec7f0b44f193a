"""One request can never hurt another: what goes wrong because of one row's data ends that row, with the
reason, and its batch-mates decode exactly the tokens they decode alone (plain and speculative).

Rows with the token "z" (POISON) in their prompt are the ones a wrapped source breaks (wrapped_sources.Poisoned).
"""
from __future__ import annotations

import pytest

from proxytune import ProxyTuner
from proxytune.backends.transformers import TransformersSource
from wrapped_sources import Poisoned

PROMPTS = ["The quick brown fox", "def add(a, b):", "The zebra ate", "Answer the following question."]
POISONED = 2  # PROMPTS[2] holds POISON
POISON = 92


@pytest.fixture(scope="module")
def sources(trio):
    return [TransformersSource(model, name=name) for model, name in zip(trio, ("base", "expert", "anti_expert"))]


def tuner_with(sources, tok, base=None, expert=None) -> ProxyTuner:
    return ProxyTuner(base or sources[0], expert or sources[1], sources[2], tokenizer=tok)


def requests(tuner, **options):
    return [tuner.request(p, max_new_tokens=10, seed=i, **options) for i, p in enumerate(PROMPTS)]


def decode(tuner, batch, speculative=False):
    decoding = tuner.decoding(batch, speculative=speculative)
    for _ in decoding.steps():
        pass
    return decoding.outputs()


def assert_the_others_decode_as_alone(plain, batch, outputs, speculative):
    for i, (request, output) in enumerate(zip(batch, outputs)):
        if i != POISONED:
            assert output.finish_reason != "error", output.error
            assert output.token_ids == decode(plain, [request], speculative)[0].token_ids, PROMPTS[i]


@pytest.mark.parametrize("speculative", [False, True])
def test_an_alpha_that_overflows_the_logits_ends_its_row_only(sources, tok, speculative):
    """3e38 is a float32 number, but α·(z_expert − z_anti) overflows to ±inf: that row cannot be sampled."""
    tuner = tuner_with(sources, tok)
    batch = requests(tuner, temperature=1.0)
    batch[POISONED] = tuner.request(PROMPTS[POISONED], max_new_tokens=10, seed=2, temperature=1.0, alpha=3e38)
    outputs = decode(tuner, batch, speculative)
    assert outputs[POISONED].finish_reason == "error"
    assert "not finite" in outputs[POISONED].error and "lower alpha" in outputs[POISONED].error
    assert_the_others_decode_as_alone(tuner, batch, outputs, speculative)


@pytest.mark.parametrize("speculative", [False, True])
def test_nan_logits_from_a_model_end_the_rows_they_touch_and_name_the_model(sources, tok, speculative):
    poisoned = Poisoned(sources[1], POISON, how="nan", after=3, name="expert")
    tuner = tuner_with(sources, tok, expert=poisoned)
    batch = requests(tuner, temperature=0.7)
    outputs = decode(tuner, batch, speculative)
    assert outputs[POISONED].finish_reason == "error" and "the expert model gave NaN" in outputs[POISONED].error
    assert_the_others_decode_as_alone(tuner_with(sources, tok), batch, outputs, speculative)


@pytest.mark.parametrize("speculative", [False, True])
def test_a_row_the_base_refuses_mid_decoding_ends_and_the_step_runs_again_without_it(sources, tok, speculative):
    """RowFailure after the expert sessions already advanced: they are rolled back and the step is rerun."""
    poisoned = Poisoned(sources[0], POISON, how="refuse", after=4, name="base")
    tuner = tuner_with(sources, tok, base=poisoned)
    batch = requests(tuner)
    outputs = decode(tuner, batch, speculative)
    failed = outputs[POISONED]
    assert failed.finish_reason == "error" and "refused this row" in failed.error
    assert failed.token_ids  # what it generated before is kept
    assert_the_others_decode_as_alone(tuner_with(sources, tok), batch, outputs, speculative)


def test_a_prompt_that_breaks_a_batched_prefill_is_found_and_fails_alone(sources, tok):
    """The batch cannot say which row broke the forward: each row is tried alone, the others join as usual."""
    tuner = tuner_with(sources, tok, base=Poisoned(sources[0], POISON, how="raise", name="base"))
    batch = requests(tuner)
    outputs = decode(tuner, batch)
    assert outputs[POISONED].finish_reason == "error" and "RuntimeError: this prompt breaks" in outputs[POISONED].error
    assert_the_others_decode_as_alone(tuner_with(sources, tok), batch, outputs, False)


def test_requests_joining_a_running_batch_fail_alone_too(sources, tok):
    """As the server admits them: two requests join between two steps, one of them poisoned."""
    tuner = tuner_with(sources, tok, base=Poisoned(sources[0], POISON, how="raise", name="base"))
    batch = requests(tuner)
    decoding = tuner.decoding([batch[0]])
    for step, _ in enumerate(decoding.steps()):
        if step == 2:
            decoding.add([batch[1], batch[3]])
            decoding.add([batch[POISONED]])
    outputs = decoding.outputs()
    assert outputs[3].finish_reason == "error" and "breaks the model" in outputs[3].error
    plain = tuner_with(sources, tok)
    for output, request in zip(outputs[:3], [batch[0], batch[1], batch[3]]):
        assert output.token_ids == decode(plain, [request])[0].token_ids


def test_a_decoding_opened_over_no_rows_admits_added_requests_in_their_own_session(sources, tok):
    """The session opened in __init__ serves only the rows it was opened over, never later additions."""
    tuner = tuner_with(sources, tok)
    batch = requests(tuner)
    decoding = tuner.decoding([])
    decoding.add(batch[:2])
    for _ in decoding.steps():
        pass
    assert [o.token_ids for o in decoding.outputs()] == [decode(tuner, [r])[0].token_ids for r in batch[:2]]
