"""Penalties, logit_bias and output formats act on the combined logits, in every decoding mode.

Specifications: neutral settings change nothing; at α = 0 the repetition penalty is transformers' own
generate(repetition_penalty=...); frequency/presence penalties and logit_bias follow OpenAI's formula on
z = z_base + α (z_expert − z_anti_expert), recomputed here from full forwards; every output under a JSON
schema parses and validates, plain, batched, sampled, speculative and byte by byte; speculative ==
plain and batched == one at a time with shaping on."""
import json

import jsonschema
import pytest
import torch

from proxytune import ProxyTuneError, ProxyTuner
from tiny import tiny_model, tiny_sentencepiece_tokenizer

PROMPTS = ["The quick brown fox", "Answer", "def add(a, b):\n    return"]
# compact JSON: random tiny models would otherwise fill every gap with the whitespace allowed there
COMPACT = {"x-guidance": {"whitespace_flexible": False}}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                            "animal": {"enum": ["fox", "dog"]},
                                            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                     "maxItems": 2}},
          "required": ["n", "animal", "tags"], "additionalProperties": False, **COMPACT}
AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def tuner(tok, trio):
    return ProxyTuner(*trio, tokenizer=tok)


def reference_greedy(tuner, prompt: str, n: int, alpha: float, shape) -> list[int]:
    """Greedy decoding recomputed from full forwards of all three models, with `shape(z, generated)` applied
    to the combined logits before the argmax."""
    base, expert, anti = (tuner.sources[r].model for r in ("base", "expert", "anti_expert"))
    ids = tuner.encode(prompt)
    generated: list[int] = []
    for _ in range(n):
        x = torch.tensor([ids + generated])
        with torch.no_grad():
            z = base(x).logits[0, -1] + alpha * (expert(x).logits[0, -1] - anti(x).logits[0, -1])
        token = int(shape(z.float(), generated).argmax())
        if token in tuner.eos_token_ids:
            break
        generated.append(token)
    return generated


def test_neutral_settings_change_nothing(tuner):
    plain = tuner.generate(PROMPTS, max_new_tokens=16)
    neutral = tuner.generate(PROMPTS, max_new_tokens=16, repetition_penalty=1.0, frequency_penalty=0.0,
                             presence_penalty=0.0, logit_bias={}, response_format={"type": "text"})
    for p, q in zip(plain, neutral):
        assert q.token_ids == p.token_ids and q.logprobs == p.logprobs


def test_at_alpha_zero_the_repetition_penalty_is_transformers_own(tuner, trio, tok):
    base = trio[0]
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        out = base.generate(**ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.8, pad_token_id=1)
        expected = out[0, ids.input_ids.shape[1]:].tolist()
        expected = expected[:expected.index(1)] if 1 in expected else expected
        got = tuner.generate(prompt, max_new_tokens=20, alpha=0.0, repetition_penalty=1.8)[0].token_ids
        assert got == expected
        assert got != tuner.generate(prompt, max_new_tokens=20, alpha=0.0)[0].token_ids or len(set(got)) == len(got)


def test_frequency_presence_and_logit_bias_follow_openais_formula_on_the_combined_logits(tuner):
    bias = {5: 3.0, 47: -2.5}

    def shape(z, generated):
        z = z.clone()
        for token, b in bias.items():
            z[token] += b
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=z.shape[0])[:z.shape[0]].float()
        return z - 0.7 * counts - 0.4 * (counts > 0).float()

    for prompt in PROMPTS:
        got = tuner.generate(prompt, max_new_tokens=20, frequency_penalty=0.7, presence_penalty=0.4,
                             logit_bias=bias)[0].token_ids
        assert got == reference_greedy(tuner, prompt, 20, 1.0, shape)


def test_a_large_logit_bias_forces_or_forbids_a_token(tuner):
    forced = tuner.generate("The quick", max_new_tokens=6, logit_bias={"77": 100})[0]  # JSON keys are strings
    assert forced.token_ids == [77] * 6
    first = tuner.generate("The quick", max_new_tokens=1)[0].token_ids[0]
    assert tuner.generate("The quick", max_new_tokens=1, logit_bias={first: -100})[0].token_ids[0] != first


def test_reported_logprobs_stay_those_of_the_unshaped_proxy(tuner):
    out = tuner.generate("The quick", max_new_tokens=4, logit_bias={77: 100})[0]
    score = tuner.score_items([tuner.token_item(tuner.encode("The quick"), out.token_ids)])[0]
    assert out.logprobs == pytest.approx(score.logprobs, abs=1e-4)
    assert sum(out.logprobs) < -4  # token 77 is no favourite of the proxy itself


def valid(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


@pytest.mark.parametrize("speculative", [False, True])
def test_every_output_under_a_json_schema_parses_and_validates(tuner, speculative):
    greedy = tuner.generate(PROMPTS, max_new_tokens=80, response_format=AS_SCHEMA, speculative=speculative)
    sampled = tuner.generate(PROMPTS * 2, max_new_tokens=80, temperature=1.0, seed=3, response_format=AS_SCHEMA,
                             speculative=speculative)
    for out in greedy + sampled:
        assert out.finish_reason == "stop", out.text
        valid(out.text)
    assert len({o.text for o in sampled}) > 1  # sampling still chooses among what the schema allows


def test_speculative_equals_plain_with_penalties_and_a_format(tuner):
    options = dict(max_new_tokens=30, frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={9: 1.5})
    for fmt in (None, AS_SCHEMA, {"type": "regex", "regex": "(fox|dog)( [a-z]{1,5}){1,4}"}):
        plain = tuner.generate(PROMPTS, response_format=fmt, **options)
        fast = tuner.generate(PROMPTS, response_format=fmt, speculative=True, **options)
        assert [o.token_ids for o in fast] == [o.token_ids for o in plain]
        assert [o.logprobs for o in fast] == [pytest.approx(o.logprobs, abs=1e-4) for o in plain]


def test_batched_equals_one_at_a_time_with_a_format_and_sampling(tuner):
    options = dict(max_new_tokens=60, temperature=0.9, response_format=AS_SCHEMA, presence_penalty=0.3)
    batched = tuner.generate(PROMPTS, seed=11, **options)
    alone = [tuner.generate(p, seed=11 + i, **options)[0] for i, p in enumerate(PROMPTS)]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]


def test_regex_and_lark_grammars_and_any_json_object(tuner):
    regex = tuner.generate(PROMPTS, max_new_tokens=20, response_format={"type": "regex", "regex": "[0-9]{3}-[a-z]{2}"})
    assert all(len(o.text) == 6 and o.text[3] == "-" and o.text[:3].isdigit() for o in regex)
    lark = 'start: "answer: " NUMBER\nNUMBER: /[1-9][0-9]?/'
    for out in tuner.generate(PROMPTS, max_new_tokens=20, response_format={"type": "grammar", "grammar": lark}):
        assert out.text.startswith("answer: ") and out.text[8:].isdigit()
    compact = {"type": "json_schema", "json_schema": {"name": "any", "schema": {"type": "object", **COMPACT}}}
    for out in tuner.generate(PROMPTS, max_new_tokens=60, response_format=compact):
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)


def test_a_format_works_byte_by_byte_for_roles_of_different_vocabularies(tok):
    sp = tiny_sentencepiece_tokenizer()
    expert, anti = tiny_model(1, vocab_size=len(sp)), tiny_model(2, vocab_size=len(sp))
    tuner = ProxyTuner(tiny_model(0), expert, anti, tokenizers={"base": tok, "expert": sp, "anti_expert": sp})
    assert tuner.byte_level
    # (SCHEMA's "tags" key: after '"t' the random anti-expert's byte probability of "a" underflows float64)
    schema = {**SCHEMA, "properties": {k: v for k, v in SCHEMA["properties"].items() if k != "tags"},
              "required": ["n", "animal"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": schema}}
    for out in tuner.generate(PROMPTS, max_new_tokens=120, response_format=fmt):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    with pytest.raises(ProxyTuneError, match="byte by byte"):
        tuner.generate("x", frequency_penalty=0.5)


@pytest.mark.parametrize("options, message", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
     "response_format: invalid json_schema"),
    (dict(response_format={"type": "regex", "regex": "[0-9"}), "response_format: invalid regex"),
    (dict(response_format={"type": "yaml"}), "is not one of"),
    (dict(response_format={"type": "json_schema", "schema": {}}), "takes exactly the fields"),
    (dict(response_format="json"), "response_format must be an object"),
    (dict(repetition_penalty=0), "repetition_penalty must be a number in"),
    (dict(frequency_penalty=3), "frequency_penalty must be a number in"),
    (dict(presence_penalty=float("nan")), "presence_penalty must be a number in"),
    (dict(logit_bias={10**6: 1.0}), "logit_bias names token 1000000"),
    (dict(logit_bias={5: 101}), r"logit_bias\[5\] must be a number in"),
    (dict(logit_bias=[5]), "logit_bias must map token ids"),
])
def test_bad_settings_are_refused_before_decoding(tuner, options, message):
    with pytest.raises(ProxyTuneError, match=message):
        tuner.request("The quick", **options)


def test_a_format_that_only_impossible_tokens_satisfy_ends_the_row_with_a_reason(tuner, tok):
    from proxytune.engine.decoding import RowState

    request = tuner.request("The quick", response_format={"type": "regex", "regex": "fox"})
    row = RowState(0, request, tok, tuner.eos_token_ids, 10)
    z = torch.zeros(tuner.vocab_size)
    allowed = row.shaped(z) > float("-inf")
    assert 0 < int(allowed.sum()) < tuner.vocab_size  # the tokens that begin "fox"
    z[allowed] = float("-inf")  # what no model can write (a byte view's −inf, say)
    assert row.shaped(z) is None
    event = row.cannot_continue()
    assert event.finish_reason == "error" and "output format allows" in event.error
