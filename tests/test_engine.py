"""The paper's invariants, as specifications of the engine (tiny random models, offline)."""
import math

import pytest
import torch

from proxytune.engine.settings import Settings
from proxytune import ProxyTuneError, ProxyTuner, Request
from proxytune.engine.session import combined_logits
from proxytune.backends.transformers import TransformersSource
from tiny import tiny_model

PROMPTS = ["The quick brown fox", "Answer", "def add(a, b):\n    return"]


def hf_greedy(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=1)
    generated = out[0, ids.input_ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    return [t for t in generated[:next((i for i, t in enumerate(generated) if t in eos), len(generated))]]


def test_alpha_zero_reproduces_the_base_models_own_greedy_generate(trio, tok):
    base, expert, anti = trio
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, alpha=0.0)
    for prompt in PROMPTS:
        assert tuner.generate(prompt, max_new_tokens=24)[0].token_ids == hf_greedy(base, tok, prompt, 24)


def test_expert_equal_to_anti_expert_reproduces_the_base(trio, tok):
    base, expert, _ = trio
    twin = tiny_model(1)  # same weights as expert, a distinct object: both really run
    tuner = ProxyTuner(base, expert, twin, tokenizer=tok, alpha=1.7)
    for prompt in PROMPTS:
        assert tuner.generate(prompt, max_new_tokens=24)[0].token_ids == hf_greedy(base, tok, prompt, 24)


def test_proxy_tuning_changes_the_output(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    proxied = [o.token_ids for o in tuner.generate(PROMPTS, max_new_tokens=24)]
    plain = [o.token_ids for o in tuner.generate(PROMPTS, max_new_tokens=24, alpha=0.0)]
    assert proxied != plain


def test_cached_decoding_equals_recomputing_full_sequences(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    request = tuner.request(PROMPTS[0], max_new_tokens=16)
    decoding = tuner.decoding([request])
    session = decoding.session
    cached = [session.prefill().combined[0]]
    tokens = []
    for _ in range(12):
        tokens.append(int(cached[-1].argmax()))
        cached.append(session.advance(torch.tensor([[tokens[-1]]])).combined[0, -1])
    prompt = request.prompts["base"]
    full = {role: s.sequence_logits([prompt + tokens])[0] for role, s in tuner.sources.items()}
    recomputed = combined_logits(full["base"], [full["expert"]], [full["anti_expert"]], torch.tensor([[1.0]]))
    recomputed = recomputed[len(prompt) - 1:]
    for step, logits in enumerate(cached):
        assert torch.allclose(logits, recomputed[step], atol=1e-4), step
        assert int(logits.argmax()) == int(recomputed[step].argmax())


def test_a_batch_of_different_lengths_equals_one_at_a_time(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    together = tuner.generate(PROMPTS, max_new_tokens=20)
    alone = [tuner.generate(p, max_new_tokens=20)[0] for p in PROMPTS]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    for a, b in zip(together, alone):
        assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(a.logprobs, b.logprobs))


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    kwargs = dict(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=50)
    first = tuner.generate(PROMPTS, seed=7, **kwargs)
    again = tuner.generate(PROMPTS, seed=7, **kwargs)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    # row i is seeded with seed + i, so each row alone with its own seed gives the same sample
    alone = [tuner.generate(p, seed=7 + i, **kwargs)[0].token_ids for i, p in enumerate(PROMPTS)]
    assert alone == [o.token_ids for o in first]
    other = tuner.generate(PROMPTS, seed=8, **kwargs)
    assert [o.token_ids for o in other] != [o.token_ids for o in first]


def test_score_is_log_softmax_of_the_combined_full_sequence_logits(trio, tok):
    base, expert, anti = trio
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, alpha=0.8)
    prompt, continuation = "The quick brown", " fox jumps over"
    score = tuner.score(prompt, continuation)
    p, c = tok(prompt)["input_ids"], tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        z = base(ids).logits[0] + 0.8 * (expert(ids).logits[0] - anti(ids).logits[0])
    expected = torch.log_softmax(z, -1)[len(p) - 1:-1].gather(1, torch.tensor(c)[:, None])[:, 0]
    assert score.token_ids == c
    assert torch.allclose(torch.tensor(score.logprobs), expected, atol=1e-4)
    batch = tuner.score_batch([(prompt, continuation), ("Answer", " the question")])
    assert batch[0].logprobs == pytest.approx(score.logprobs, abs=1e-4)


def test_generated_logprobs_match_score_of_the_generated_text(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    out = tuner.generate("The quick brown", max_new_tokens=8)[0]
    p = tok("The quick brown")["input_ids"]
    full = {r: s.sequence_logits([p + out.token_ids])[0] for r, s in tuner.sources.items()}
    z = combined_logits(full["base"], [full["expert"]], [full["anti_expert"]], torch.tensor([[1.0]]))
    expected = torch.log_softmax(z, -1)[len(p) - 1:-1].gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert out.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_every_eos_id_stops_its_own_row(tok):
    free = ProxyTuner(tiny_model(0), tiny_model(1), tiny_model(2), tokenizer=tok, alpha=0.0)
    runs = free.generate(PROMPTS, max_new_tokens=30)
    second_eos = runs[0].token_ids[3]  # a token row 0 really produces: declare it a second EOS id
    base = tiny_model(0, eos=[1, second_eos])
    tuner = ProxyTuner(base, tiny_model(1), tiny_model(2), tokenizer=tok, alpha=0.0)
    assert {1, second_eos} <= tuner.eos_token_ids
    outs = tuner.generate(PROMPTS, max_new_tokens=30)
    for before, after in zip(runs, outs):
        cut = before.token_ids.index(second_eos) if second_eos in before.token_ids else None
        if cut is None:
            assert after.token_ids == before.token_ids and after.finish_reason == before.finish_reason
        else:
            assert after.token_ids == before.token_ids[:cut] and after.finish_reason == "stop"


def test_stop_strings_end_the_row_and_are_not_returned(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    full = tuner.generate(PROMPTS, max_new_tokens=30)
    stop = full[0].text[5:8]
    cut = tuner.generate(PROMPTS, max_new_tokens=30, stop=[stop, "\u0000never"])
    assert cut[0].finish_reason == "stop" and cut[0].text == full[0].text[: full[0].text.find(stop)]
    assert stop not in cut[0].text
    for before, after in zip(full[1:], cut[1:]):  # other rows stop on their own, unaffected
        assert after.text == before.text[: before.text.find(stop)] if stop in before.text else after.text == before.text


def test_max_new_tokens_and_streaming_give_the_same_text(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    out = tuner.generate("Answer", max_new_tokens=7)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7
    assert "".join(tuner.stream("Answer", max_new_tokens=7)) == out.text
    stop = out.text[3:5]
    streamed = "".join(tuner.stream("Answer", max_new_tokens=7, stop=stop))
    assert streamed == tuner.generate("Answer", max_new_tokens=7, stop=stop)[0].text and stop not in streamed


def test_several_expert_pairs_add_their_shifts(tok):
    base, e1, a1, e2, a2 = (tiny_model(s) for s in range(5))
    tuner = ProxyTuner(base, experts=[(e1, a1, 0.5), (e2, a2, -1.25)], tokenizer=tok)
    ids = tok("The quick")["input_ids"]
    with torch.no_grad():
        t = torch.tensor([ids])
        z = base(t).logits[0, -1] + 0.5 * (e1(t).logits[0, -1] - a1(t).logits[0, -1]) \
            - 1.25 * (e2(t).logits[0, -1] - a2(t).logits[0, -1])
    out = tuner.generate("The quick", max_new_tokens=1)[0]
    assert out.token_ids == [int(z.argmax())]
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(z, -1).max()), abs=1e-4)


def test_rewind_then_continue_equals_a_session_that_never_saw_the_dropped_tokens(trio, tok):
    source = TransformersSource(trio[0])
    prompts = [tok("The quick brown")["input_ids"], tok("Answer")["input_ids"]]
    session = source.open(prompts)
    session.prefill()
    session.advance(torch.tensor([[5, 6, 7], [8, 9, 10]]))
    session.rewind([1, 2])  # row 0 keeps 5, row 1 keeps 8 9
    after = session.advance(torch.tensor([[11], [12]]))[:, -1]
    fresh = source.sequence_logits([prompts[0] + [5, 11], prompts[1] + [8, 9, 12]])
    assert torch.allclose(after[0], fresh[0][-1], atol=1e-4)
    assert torch.allclose(after[1], fresh[1][-1], atol=1e-4)


def test_details_report_every_roles_top_tokens(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    out = tuner.generate("Answer", max_new_tokens=3, return_details=4)[0]
    assert len(out.details) == 3
    step = out.details[0]
    assert set(step.top) == {"base", "expert", "anti_expert", "proxy"}
    assert all(len(top) == 4 for top in step.top.values())
    assert step.top["proxy"][0][0] == out.token_ids[0]
    assert step.chosen_prob["proxy"] == pytest.approx(math.exp(out.logprobs[0]), rel=1e-4)


def test_chat_formats_each_role_with_its_own_template_and_the_paper_setting(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    messages = [{"role": "user", "content": "what is 3 + 4?"}]
    everyone = tuner.request(messages=messages)
    paper = tuner.request(messages=messages, chat_roles=("expert",))
    templated = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False)["input_ids"]
    assert everyone.prompts["base"] == everyone.prompts["expert"] == templated
    assert paper.prompts["expert"] == templated
    assert paper.prompts["base"] == paper.prompts["anti_expert"] == tok("what is 3 + 4?")["input_ids"]
    direct = tuner.run([Request({role: templated for role in tuner.roles}, Settings(5, alpha=tuner.alphas))])[0]
    reply = tuner.chat(messages, max_new_tokens=5)
    assert (reply.token_ids, reply.finish_reason) == (direct.token_ids, direct.finish_reason)


@pytest.mark.parametrize("call, message", [
    (lambda t: t.generate([]), "at least one prompt"),
    (lambda t: t.generate("hi", max_new_tokens=0), "max_new_tokens"),
    (lambda t: t.generate("hi", alpha=float("nan")), "alpha"),
    (lambda t: t.generate("hi", alpha=float("inf")), "alpha"),
    (lambda t: t.generate("hi", alpha=1e39), "overflows float32"),  # finite in float64, inf where it is used
    (lambda t: t.generate("hi", temperature=-1), "temperature"),
    (lambda t: t.generate("hi", top_p=0), "top_p"),
    (lambda t: t.generate("word " * 300), "context"),
    (lambda t: t.chat([]), "messages"),
    (lambda t: t.score("hi", ""), "empty"),
])
def test_bad_input_is_a_clear_error(trio, tok, call, message):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    with pytest.raises(ProxyTuneError, match=message):
        call(tuner)


def test_mismatched_vocabularies_are_refused_naming_the_tokens_when_byte_level_is_off(trio, tok):
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    token_of = {i: t for t, i in spec["model"]["vocab"].items()}
    spec["model"]["vocab"][token_of[10]], spec["model"]["vocab"][token_of[11]] = 11, 10  # ids 10 and 11 swapped
    bad = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="</s>")
    with pytest.raises(ProxyTuneError, match=r"id 10: base .* vs expert"):
        ProxyTuner(*trio, tokenizers={"base": tok, "expert": bad, "anti_expert": tok}, byte_level=False)


def test_padded_embedding_rows_beyond_the_tokenizer_are_cut(tok):
    base = tiny_model(0, vocab_size=len(tok) + 64)  # like Qwen: embeddings padded past the tokenizer
    tuner = ProxyTuner(base, tiny_model(1), tiny_model(2), tokenizer=tok)
    assert tuner.vocab_size == len(tok)
    out = tuner.generate("Answer", max_new_tokens=10)[0]
    assert all(t < len(tok) for t in out.token_ids)


def test_the_output_layer_gets_one_plain_matrix_when_a_batch_is_prefilled(trio, tok):
    # Left-padded prefill keeps one position per row: a strided slice that torch would expand per row
    # (on CPU a fallback ~50x slower than the step). The source hands the output layer a contiguous copy.
    base = trio[0]
    source = TransformersSource(base, name="base")
    seen = []
    hook = base.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        session = source.open([tok.encode(p) for p in PROMPTS])
        logits = session.prefill()
    finally:
        hook.remove()
    hidden = seen[0]
    assert hidden.shape[:2] == (len(PROMPTS), 1) and hidden.is_contiguous()
    assert hidden.stride(0) == hidden.stride(1) * hidden.shape[1]
    alone = [TransformersSource(base).open([tok.encode(p)]).prefill()[0] for p in PROMPTS]
    assert torch.allclose(logits, torch.stack(alone), atol=1e-4)


def test_where_every_model_must_write_what_is_chosen_any_models_minus_inf_rules_a_token_out():
    inf = float("inf")
    base = torch.tensor([[0.0, 1.0, 2.0, -inf, 1.0]])
    expert = torch.tensor([[3.0, -inf, 0.5, 1.0, -inf]])
    anti = torch.tensor([[1.0, 0.0, -inf, 1.0, -inf]])
    alphas = torch.tensor([[2.0]])
    assert combined_logits(base, [expert], [anti], alphas).tolist() == [[4.0, -inf, inf, -inf, 1.0]]
    assert combined_logits(base, [expert], [anti], alphas, every_model_writes=True).tolist() == \
        [[4.0, -inf, -inf, -inf, -inf]]


def test_rows_alone_follow_their_roles_own_model_beside_proxy_rows_in_one_batch(trio, tok):
    """The playground's three columns in one batch: base alone and expert alone are those models' own greedy
    generate(); the proxy row is unchanged by its batch-mates; speculative decoding gives the same."""
    tuner = ProxyTuner(*trio, tokenizer=tok)
    models = dict(zip(("base", "expert", "anti_expert"), trio))
    requests = [tuner.request(p, max_new_tokens=12, alone=alone)
                for p in PROMPTS for alone in (None, "base", "expert", "anti_expert")]
    for speculative in (False, True):
        outputs = tuner.run(requests, speculative=speculative)
        for request, prompt, out in zip(requests, [p for p in PROMPTS for _ in range(4)], outputs):
            if request.settings.alone is None:
                assert out.token_ids == tuner.generate(prompt, max_new_tokens=12)[0].token_ids
            else:
                assert out.token_ids == hf_greedy(models[request.settings.alone], tok, prompt, 12)
    with pytest.raises(ProxyTuneError, match="alone names a role"):
        tuner.request("x", alone="teacher")


def test_an_alpha_schedule_uses_each_positions_alpha_batched_or_alone(trio, tok):
    """alpha_schedule={0: 0.0, 4: 2.0}: the first four tokens are the base's own, then α = 2; recomputed from
    full forwards; a row's schedule does not leak into its batch-mates; speculative decoding refuses it."""
    tuner = ProxyTuner(*trio, tokenizer=tok)
    base, expert, anti = trio
    for prompt in PROMPTS:
        ids, generated = tok(prompt)["input_ids"], []
        for position in range(12):
            x = torch.tensor([ids + generated])
            alpha = 0.0 if position < 4 else 2.0
            with torch.no_grad():
                z = base(x).logits[0, -1] + alpha * (expert(x).logits[0, -1] - anti(x).logits[0, -1])
            if int(z.argmax()) == 1:
                break
            generated.append(int(z.argmax()))
        assert tuner.generate(prompt, max_new_tokens=12, alpha_schedule={0: 0.0, 4: 2.0})[0].token_ids == generated
    assert tuner.generate(PROMPTS[0], max_new_tokens=12, alpha_schedule={0: 1.0})[0].token_ids == \
        tuner.generate(PROMPTS[0], max_new_tokens=12)[0].token_ids
    requests = [tuner.request(PROMPTS[0], max_new_tokens=12, alpha_schedule={3: 0.0}),
                tuner.request(PROMPTS[1], max_new_tokens=12), tuner.request(PROMPTS[2], max_new_tokens=12, alpha=0.5)]
    together = tuner.run(requests)
    assert [o.token_ids for o in together] == [tuner.run([r])[0].token_ids for r in requests]
    with pytest.raises(ProxyTuneError, match="α schedule"):
        tuner.run(requests, speculative=True)
    for bad in ({-1: 1.0}, {"4": 1.0}, {0: float("nan")}, {}):
        with pytest.raises(ProxyTuneError):
            tuner.request("x", alpha_schedule=bad)


def test_a_marker_in_the_schedule_changes_alpha_once_the_output_contains_it(trio, tok):
    """alpha_schedule={0: 0.0, marker: 2.0}: the base's own tokens until the text so far contains the marker,
    then α = 2 (recomputed from full forwards); a marker never written leaves the position schedule alone."""
    tuner = ProxyTuner(*trio, tokenizer=tok)
    base, expert, anti = trio
    prompt = PROMPTS[0]
    plain = tuner.generate(prompt, max_new_tokens=12, alpha=0.0)[0]
    marker = tok.decode(plain.token_ids[:3])[-2:]  # two characters the base writes by its third token
    ids, generated = tok(prompt)["input_ids"], []
    for position in range(12):
        x = torch.tensor([ids + generated])
        alpha = 2.0 if marker in tok.decode(generated) else 0.0
        with torch.no_grad():
            z = base(x).logits[0, -1] + alpha * (expert(x).logits[0, -1] - anti(x).logits[0, -1])
        if int(z.argmax()) == 1:
            break
        generated.append(int(z.argmax()))
    scheduled = tuner.generate(prompt, max_new_tokens=12, alpha_schedule={0: 0.0, marker: 2.0})[0]
    assert scheduled.token_ids == generated and generated[:3] == plain.token_ids[:3]
    assert tuner.generate(prompt, max_new_tokens=12, alpha_schedule={0: 0.0, "never written": 2.0})[0].token_ids == \
        plain.token_ids
    with pytest.raises(ProxyTuneError, match="a position is a number"):
        tuner.request("x", alpha_schedule={"4": 1.0})
