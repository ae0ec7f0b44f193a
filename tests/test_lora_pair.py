"""Expert = LoRA of the anti-expert: both roles in one batched forward give the two-model logits."""
import pytest
import torch
from peft import PeftModel
from tiny import lora_of

from proxytune import ProxyTuner
from proxytune.facade.compare import generate_as
from proxytune.models.loading import load_roles
from proxytune.backends.lora_pair import LoraPair, PairedRole
from proxytune.backends.transformers import TransformersSource

PROMPTS = ["The quick brown fox", "def add(a, b):\n", "Answer the following question. Question: what is 3 + 4?"]


@pytest.fixture(scope="module")
def peft_model():
    from tiny import tiny_model
    return lora_of(tiny_model(2))


def two_model_tuner(base, peft_model, tok):
    return ProxyTuner(base, TransformersSource(peft_model, name="expert"),
                      TransformersSource(peft_model, name="anti_expert", adapter_disabled=True), tokenizer=tok)


def test_the_anti_expert_is_the_model_without_its_adapter(tok):
    import copy

    from tiny import tiny_model
    plain = tiny_model(2)
    with_adapter = lora_of(copy.deepcopy(plain))
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    anti = TransformersSource(with_adapter, adapter_disabled=True).sequence_logits(prompts)
    expert = TransformersSource(with_adapter).sequence_logits(prompts)
    for got, want, adapted in zip(anti, TransformersSource(plain).sequence_logits(prompts), expert):
        assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(adapted, want, atol=1e-2)


def test_one_pass_logits_equal_the_two_model_path_through_prefill_advance_rewind_and_select(peft_model, tok):
    pair = LoraPair(peft_model)
    expert_alone = TransformersSource(peft_model)
    anti_alone = TransformersSource(peft_model, adapter_disabled=True)
    expert_prompts = [tok(p)["input_ids"] for p in PROMPTS]
    anti_prompts = [tok("System: be brief.\n\n" + p)["input_ids"] for p in PROMPTS]  # prompts may differ per role
    paired = [pair.expert.open(expert_prompts), pair.anti_expert.open(anti_prompts)]
    single = [expert_alone.open(expert_prompts), anti_alone.open(anti_prompts)]

    def both(call):
        for one, two in zip(paired, single):
            assert torch.allclose(call(one), call(two), atol=1e-5)

    both(lambda s: s.prefill())
    both(lambda s: s.advance(torch.tensor([[5], [6], [7]])))
    both(lambda s: s.advance(torch.tensor([[8, 9, 10], [11, 12, 13], [14, 15, 16]])))  # a draft scored at once
    for s in paired + single:
        s.rewind([1, 3, 0])  # rows keep different amounts
    both(lambda s: s.advance(torch.tensor([[20], [21], [22]])))
    for s in paired + single:
        s.select([2, 0])
    both(lambda s: s.advance(torch.tensor([[30, 31], [32, 33]])))


def test_the_expert_drafting_token_by_token_hands_the_anti_expert_its_logits(peft_model, tok):
    pair = LoraPair(peft_model)
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    expert, anti = pair.expert.open(prompts), pair.anti_expert.open(prompts)
    reference = TransformersSource(peft_model, adapter_disabled=True).open(prompts)
    expert.prefill(), anti.prefill(), reference.prefill()
    for token in (5, 6, 7):
        expert.advance(torch.tensor([[token], [token]]), extend=True)
    verified = anti.advance(torch.tensor([[5, 6, 7], [5, 6, 7]]))  # no forward: collected from the joint ones
    assert torch.allclose(verified, reference.advance(torch.tensor([[5, 6, 7], [5, 6, 7]])), atol=1e-5)
    with pytest.raises(RuntimeError, match="different tokens"):
        expert.advance(torch.tensor([[1], [1]]))
        anti.advance(torch.tensor([[2], [2]]))


@pytest.mark.parametrize("speculative", [False, True])
def test_paired_generation_equals_the_two_model_generation(trio, tok, peft_model, speculative):
    pair = LoraPair(peft_model)
    paired = ProxyTuner(trio[0], pair.expert, pair.anti_expert, tokenizer=tok)
    reference = two_model_tuner(trio[0], peft_model, tok).generate(PROMPTS, max_new_tokens=20)
    outputs = paired.generate(PROMPTS, max_new_tokens=20, speculative=speculative, stop=[reference[1].text[8:10]])
    for got, want in zip(outputs, reference):
        assert want.text.startswith(got.text) and got.token_ids == want.token_ids[: len(got.token_ids)]
    assert outputs[1].finish_reason == "stop"


def test_the_expert_alone_still_runs_on_its_own(trio, tok, peft_model):
    pair = LoraPair(peft_model)
    paired = ProxyTuner(trio[0], pair.expert, pair.anti_expert, tokenizer=tok)
    reference = two_model_tuner(trio[0], peft_model, tok)
    request = paired.request(PROMPTS[0], max_new_tokens=10)
    assert generate_as(paired, request, "expert") == generate_as(reference, request, "expert")
    assert generate_as(paired, request, "anti_expert") == generate_as(reference, request, "anti_expert")


def test_rows_joining_a_paired_batch_get_the_same_tokens_as_alone(trio, tok, peft_model):
    pair = LoraPair(peft_model)
    tuner = ProxyTuner(trio[0], pair.expert, pair.anti_expert, tokenizer=tok)
    requests = [tuner.request(p, max_new_tokens=6 + 4 * i) for i, p in enumerate(PROMPTS)]
    decoding = tuner.decoding(requests[:1])
    if not hasattr(decoding, "add"):
        pytest.skip("this engine has no dynamic batching")
    steps = decoding.steps()
    next(steps)
    decoding.add(requests[1:])
    for _ in steps:
        pass
    for request, output in zip(requests, decoding.outputs()):
        assert output.token_ids == tuner.run([request])[0].token_ids


def saved_lora_trio(tmp_path, tok):
    """(base dir, small dir, adapter dir): a LoRA of the small model whose config names it as its base."""
    import json

    from tiny import tiny_model
    from transformers import AutoModelForCausalLM

    base_dir, small_dir, adapter_dir = tmp_path / "base", tmp_path / "small", tmp_path / "adapter"
    for model, path in ((tiny_model(0), base_dir), (tiny_model(2), small_dir)):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    lora_of(AutoModelForCausalLM.from_pretrained(small_dir), seed=3).save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(small_dir)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    return base_dir, small_dir, adapter_dir


def test_loading_an_adapter_of_the_anti_expert_pairs_them_automatically(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    base_dir, small_dir, adapter_dir = saved_lora_trio(tmp_path, tok)

    roles = load_roles({"base": str(base_dir), "expert": str(adapter_dir), "anti_expert": str(small_dir)},
                       [("expert", "anti_expert")])
    assert isinstance(roles["expert"][0], PairedRole) and isinstance(roles["anti_expert"][0], PairedRole)
    tuner = ProxyTuner.from_pretrained(str(base_dir), str(adapter_dir), str(small_dir))
    assert tuner.sources["expert"].pair is tuner.sources["anti_expert"].pair

    small = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_dir), str(adapter_dir)).eval()
    reference = two_model_tuner(AutoModelForCausalLM.from_pretrained(base_dir), small, tok)
    for got, want in zip(tuner.generate(PROMPTS, max_new_tokens=12), reference.generate(PROMPTS, max_new_tokens=12)):
        assert got.token_ids == want.token_ids


def test_a_pair_placed_alike_stays_one_model_and_placed_apart_loads_twice(tmp_path, tok):
    """Placement per role and the one-pass pair: the two halves share weights only where they share a
    placement; apart, each role loads its own copy, and both give the two-model reference's tokens."""
    from transformers import AutoModelForCausalLM

    base_dir, small_dir, adapter_dir = saved_lora_trio(tmp_path, tok)
    specs = (str(base_dir), str(adapter_dir), str(small_dir))

    alike = ProxyTuner.from_pretrained(*specs, placement={"expert": {"dtype": "float32"},
                                                          "anti_expert": {"dtype": "float32"}})
    assert alike.sources["expert"].pair is alike.sources["anti_expert"].pair
    apart = ProxyTuner.from_pretrained(*specs, placement={"anti_expert": {"dtype": "bfloat16"}})
    assert not isinstance(apart.sources["anti_expert"], PairedRole)
    assert next(apart.sources["anti_expert"].model.parameters()).dtype == torch.bfloat16
    assert next(apart.sources["expert"].model.parameters()).dtype == torch.float32

    small = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_dir), str(adapter_dir)).eval()
    reference = two_model_tuner(AutoModelForCausalLM.from_pretrained(base_dir), small, tok)
    want = [o.token_ids for o in reference.generate(PROMPTS, max_new_tokens=12)]
    assert [o.token_ids for o in alike.generate(PROMPTS, max_new_tokens=12)] == want
    anti_bf16 = AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.bfloat16)
    by_hand = ProxyTuner(AutoModelForCausalLM.from_pretrained(base_dir), small, anti_bf16, tokenizer=tok)
    assert [o.token_ids for o in apart.generate(PROMPTS, max_new_tokens=12)] == \
        [o.token_ids for o in by_hand.generate(PROMPTS, max_new_tokens=12)]
