"""Proxy-tuning inside transformers' own generate(): the LogitsProcessor equals ProxyTuner's decoding."""
import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from proxytune import ProxyTuner
from proxytune.errors import ProxyTuneError
from proxytune.integrations.transformers import ProxyTuningLogitsProcessor, proxy_generate

PROMPTS = ["The quick brown fox", "def add(a, b):\n", "Answer the following question. Question: what is 3 + 4?"]


@pytest.fixture(scope="module")
def models():
    return tiny_model(0), tiny_model(1), tiny_model(2)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_base_generate_with_the_processor_is_proxy_tuned_greedy_decoding(models, tok, alpha):
    base, expert, anti = models
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, alpha=alpha)
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        processor = ProxyTuningLogitsProcessor(expert, anti, alpha=alpha)
        out = base.generate(ids, logits_processor=[processor], max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=1)[0, ids.shape[1]:].tolist()
        ours = tuner.generate(prompt, max_new_tokens=12)[0]
        assert out[:len(ours.token_ids)] == ours.token_ids


def test_the_small_models_read_only_the_new_token_at_each_step(models, tok, monkeypatch):
    base, expert, anti = models
    processor = ProxyTuningLogitsProcessor(expert, anti)
    widths = []
    forward = type(processor.expert).forward

    def counting(self, **inputs):
        widths.append(inputs["input_ids"].shape[1])
        return forward(self, **inputs)
    monkeypatch.setattr(type(processor.expert), "forward", counting)
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    base.generate(ids, logits_processor=[processor], max_new_tokens=6, do_sample=False, eos_token_id=None,
                  pad_token_id=1)
    assert widths[:2] == [ids.shape[1]] * 2 and set(widths[2:]) == {1}  # prefill once per model, then one token


def test_a_left_padded_batch_gives_each_prompt_its_own_decoding(models):
    base, expert, anti = models
    tok = tiny_tokenizer()
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok)
    texts = proxy_generate(base, expert, anti, tok, PROMPTS, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert texts == [o.text for o in tuner.generate(PROMPTS, max_new_tokens=10)]


def test_bad_input_is_a_clear_error(models, tok):
    base, expert, anti = models
    with pytest.raises(ProxyTuneError, match="alpha"):
        ProxyTuningLogitsProcessor(expert, anti, alpha=float("nan"))
    with pytest.raises(ProxyTuneError, match="prompts must be"):
        proxy_generate(base, expert, anti, tok, 3)
