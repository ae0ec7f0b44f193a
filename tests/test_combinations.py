"""The combination matrix: every backend × every decoding mode gives the plain reference's tokens (fp32).

Backends: transformers, a LoRA expert/anti-expert pair in one forward, a remote base (an
OpenAI-compatible server over the same model, full top-k by token id, so nothing is lost on the wire),
llama.cpp in-process (its own plain decoding is the reference: other kernels, other numerics).
Modes: plain, speculative, rows joining a running batch mid-way, the server with concurrent
requests, and scoring. What a backend cannot do is refused up front with a message saying what to use.
"""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from openai_fake import FakeOpenAI
from tiny import lora_of
from wrapped_sources import Solo

from proxytune import ProxyTuner, ProxyTuneError
from proxytune.backends.lora_pair import LoraPair
from proxytune.backends.remote.source import RemoteSource
from proxytune.backends.remote.spec import parse_spec

PROMPTS = ["The quick brown", "def add(a, b):", "Answer the following question.", "Tuning language"]
NEW = 10


def llama_cpp_trio(tok, root):
    """Three tiny random GGUF models over the tests' tokenizer, run by llama.cpp with uniform batches (logits do
    not depend on how rows are grouped), so its own plain decoding is the reference for every mode."""
    from tiny_gguf import write_tiny_gguf

    from proxytune.backends.llama_cpp.source import LlamaCppSource
    sources = [LlamaCppSource(write_tiny_gguf(root / f"tiny-{seed}.gguf", seed=seed), name=f"tiny-{seed}", threads=1,
                              n_ctx=512, uniform_batches=True) for seed in range(3)]
    return ProxyTuner(*sources, tokenizer=tok)


@pytest.fixture(scope="module")
def backends(trio, tok, tmp_path_factory):
    """name -> (tuner under test, reference tuner whose plain greedy decoding is the expected output)."""
    base, expert, anti = trio
    reference = ProxyTuner(base, expert, anti, tokenizer=tok)
    made = {"transformers": (reference, reference)}
    pair = LoraPair(lora_of(copy.deepcopy(anti)))
    from proxytune.backends.transformers import TransformersSource
    two_model = ProxyTuner(base, TransformersSource(pair.model, name="expert"),
                           TransformersSource(pair.model, name="anti_expert", adapter_disabled=True), tokenizer=tok)
    made["lora pair"] = (ProxyTuner(base, pair.expert, pair.anti_expert, tokenizer=tok), two_model)
    server = FakeOpenAI(base, tok).__enter__()
    remote = RemoteSource(parse_spec(f"openai:{server.url}?tokenizer=tiny&top_k=320&token_ids=1&send_ids=1"), tok)
    made["remote base"] = (ProxyTuner(remote, expert, anti, tokenizer=tok), reference)
    # a remote base drafting in chunks, verified by the one-pass LoRA pair
    made["remote base + lora pair"] = (ProxyTuner(remote, pair.expert, pair.anti_expert, tokenizer=tok), two_model)
    try:
        import llama_cpp  # noqa: F401
        on_llama_cpp = llama_cpp_trio(tok, tmp_path_factory.mktemp("gguf"))
        made["llama.cpp"] = (on_llama_cpp, on_llama_cpp)
    except ImportError:  # pip install 'proxytune[llama-cpp]'
        pass
    yield made
    server.__exit__(None, None, None)


MATRIX = ["transformers", "lora pair", "remote base", "remote base + lora pair", "llama.cpp"]


def pick(backends, backend):
    if backend not in backends:
        pytest.skip(f"{backend} is not installed")
    return backends[backend]


def plain(tuner, prompts=PROMPTS):
    return [o.token_ids for o in tuner.generate(prompts, max_new_tokens=NEW)]


@pytest.mark.parametrize("backend", MATRIX)
def test_plain_greedy_equals_the_reference(backends, backend):
    tuner, reference = pick(backends, backend)
    assert plain(tuner) == plain(reference)


@pytest.mark.parametrize("backend", MATRIX)
@pytest.mark.parametrize("draft_length", [None, 3])
def test_speculative_greedy_equals_plain(backends, backend, draft_length):
    tuner, reference = pick(backends, backend)
    decoding = tuner.decoding([tuner.request(p, max_new_tokens=NEW) for p in PROMPTS], speculative=True)
    if draft_length:
        decoding.draft_length.fixed = draft_length
    for _ in decoding.steps():
        pass
    assert [o.token_ids for o in decoding.outputs()] == plain(reference)


SHAPED = dict(response_format={"type": "regex", "regex": "(fox|dog|the)( [a-z]{1,6}){1,4}"}, frequency_penalty=0.6,
              logit_bias={9: 2.0})


@pytest.mark.parametrize("backend", MATRIX)
@pytest.mark.parametrize("speculative", [False, True])
def test_a_format_and_penalties_give_the_references_shaped_tokens_in_every_mode(backends, backend, speculative):
    tuner, reference = pick(backends, backend)
    want = reference.generate(PROMPTS, max_new_tokens=NEW, **SHAPED)
    got = tuner.generate(PROMPTS, max_new_tokens=NEW, speculative=speculative, **SHAPED)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(o.text.split(" ")[0] in ("fox", "dog", "the") for o in got)


@pytest.mark.parametrize("backend", MATRIX)
@pytest.mark.parametrize("speculative", [False, True])
def test_rows_alone_beside_proxy_rows_give_the_references_tokens_in_every_mode(backends, backend, speculative):
    """The playground's batch (base alone, expert alone, proxy) on every backend: each row as the reference."""
    tuner, reference = pick(backends, backend)
    requests = [tuner.request(p, max_new_tokens=NEW, alone=alone)
                for p in PROMPTS[:2] for alone in ("base", "expert", None)]
    want = [reference.run([reference.request(p, max_new_tokens=NEW, alone=alone)])[0].token_ids
            for p in PROMPTS[:2] for alone in ("base", "expert", None)]
    assert [o.token_ids for o in tuner.run(requests, speculative=speculative)] == want


@pytest.mark.parametrize("backend", MATRIX)
@pytest.mark.parametrize("speculative", [False, True])
def test_rows_joining_mid_way_get_the_tokens_they_get_alone(backends, backend, speculative):
    tuner, reference = pick(backends, backend)
    decoding = tuner.decoding([tuner.request(PROMPTS[0], max_new_tokens=NEW)], speculative=speculative)
    assert decoding.accepts_new_rows
    for step, _ in enumerate(decoding.steps()):
        if step == 2:
            decoding.add([tuner.request(p, max_new_tokens=NEW) for p in PROMPTS[1:3]])
        if step == 4:
            decoding.add([tuner.request(PROMPTS[3], max_new_tokens=NEW)])
    assert [o.token_ids for o in decoding.outputs()] == [plain(reference, [p])[0] for p in PROMPTS]


@pytest.mark.parametrize("backend", MATRIX)
def test_alpha_schedules_by_position_and_marker_give_the_references_tokens_batched_or_alone(backends, backend):
    """Rows with their own schedules (a position, a text marker, none) decoded together: each gets the reference's
    scheduled tokens and the tokens it gets alone; the schedules change the text. (Speculative decoding refuses
    schedules; a chunked remote base falls back to plain decoding for them.)"""
    tuner, reference = pick(backends, backend)
    written = reference.generate(PROMPTS[1], max_new_tokens=NEW, alpha=0.0)[0].text
    # two characters it writes early (text that reads as a whole number would be a position, as in JSON)
    marker = next(written[i:i + 2] for i in range(2, len(written)) if not written[i:i + 2].strip().isdigit())
    schedules = [{0: 0.0, 3: 2.0}, {0: 0.0, marker: 2.0}, None, {0: 2.0, 5: 0.0}]
    requests = [tuner.request(p, max_new_tokens=NEW, alpha_schedule=s) for p, s in zip(PROMPTS, schedules)]
    together = [o.token_ids for o in tuner.run(requests)]
    assert together == [tuner.run([r])[0].token_ids for r in requests]
    assert together == [reference.generate(p, max_new_tokens=NEW, alpha_schedule=s)[0].token_ids
                        for p, s in zip(PROMPTS, schedules)]
    unscheduled = [plain(reference, [p])[0] for p in PROMPTS]
    assert together[0] != unscheduled[0] and together[1] != unscheduled[1] and together[2] == unscheduled[2]


@pytest.mark.parametrize("backend", MATRIX)
def test_scoring_equals_the_reference(backends, backend):
    tuner, reference = pick(backends, backend)
    pairs = [(p, " the lazy dog") for p in PROMPTS]
    for got, want in zip(tuner.score_batch(pairs), reference.score_batch(pairs)):
        assert got.token_ids == want.token_ids
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4)


@pytest.mark.parametrize("backend", MATRIX)
def test_the_server_decodes_concurrent_requests_together(backends, backend):
    from fastapi.testclient import TestClient

    from proxytune.server import create_app

    tuner, reference = pick(backends, backend)
    expected = [reference.tokenizer.decode(ids, skip_special_tokens=True) for ids in plain(reference)]
    with TestClient(create_app(tuner), base_url="http://localhost") as client:
        def ask(prompt):
            answer = client.post("/v1/completions", json={"model": "proxytune", "prompt": prompt,
                                                          "max_tokens": NEW, "temperature": 0})
            assert answer.status_code == 200, answer.text
            return answer.json()["choices"][0]["text"]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = list(pool.map(ask, PROMPTS))
        load = client.get("/health").json()
    assert texts == expected
    assert load["finished_rows"] == len(PROMPTS)


def test_a_session_that_cannot_join_is_served_one_batch_after_another(trio, tok):
    base, expert, anti = trio

    reference = ProxyTuner(base, expert, anti, tokenizer=tok)
    tuner = ProxyTuner(Solo(reference.sources["base"]), expert, anti, tokenizer=tok)
    decoding = tuner.decoding([tuner.request(PROMPTS[0], max_new_tokens=NEW)])
    assert not decoding.accepts_new_rows
    with pytest.raises(ProxyTuneError, match="cannot take rows into its running batch"):
        decoding.add([tuner.request(PROMPTS[1])])
    with pytest.raises(ProxyTuneError, match="roll back.*without speculative"):
        tuner.generate(PROMPTS[0], speculative=True)
    assert plain(tuner) == plain(reference)  # plain decoding needs nothing more

    from fastapi.testclient import TestClient

    from proxytune.server import create_app
    with TestClient(create_app(tuner), base_url="http://localhost") as client:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(lambda p: client.post("/v1/completions", json={
                "model": "proxytune", "prompt": p, "max_tokens": NEW, "temperature": 0}), PROMPTS))
    assert [a.status_code for a in answers] == [200] * len(PROMPTS)
    assert [a.json()["choices"][0]["text"] for a in answers] == [tok.decode(ids, skip_special_tokens=True)
                                                                 for ids in plain(reference)]


def test_seeded_speculative_sampling_does_not_depend_on_k_or_on_batch_mates(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)

    def sample(prompts, k, seed=7):
        requests = [tuner.request(p, max_new_tokens=12, temperature=1.0, seed=seed + i) for i, p in enumerate(prompts)]
        decoding = tuner.decoding(requests, speculative=True)
        decoding.draft_length.fixed = k
        for _ in decoding.steps():
            pass
        return [o.token_ids for o in decoding.outputs()]

    (alone,) = sample(PROMPTS[:1], 1)
    assert sample(PROMPTS[:1], 4) == [alone]
    assert sample(PROMPTS, 3)[0] == alone


@pytest.mark.parametrize("backend", MATRIX)
def test_scoring_a_generated_answer_gives_the_logprobs_it_was_generated_with(backends, backend):
    tuner, _ = pick(backends, backend)
    for prompt, output in zip(PROMPTS, tuner.generate(PROMPTS, max_new_tokens=NEW)):
        (score,) = tuner.score_items([tuner.token_item(tuner.encode(prompt), output.token_ids)])
        assert torch.allclose(torch.tensor(score.logprobs), torch.tensor(output.logprobs), atol=1e-4)
        assert score.is_greedy
