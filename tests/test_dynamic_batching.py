"""Dynamic batching (what the server runs): rows join a running batch between steps and leave when done,
and no row can tell. Tiny random models, offline."""
import torch

from proxytune import ProxyTuner
from proxytune.backends.transformers import TransformersSource

PROMPTS = ["The quick brown fox", "Answer the following question. Question: what is 3 + 4?", "def add(a, b):",
           "Tuning language models", "The lazy dog", "x"]


def alone(tuner, request):
    return tuner.run([request])[0]


def test_joining_two_sessions_keeps_every_rows_logits(trio, tok):
    source = TransformersSource(trio[0])
    short, long = tok("The lazy dog")["input_ids"], tok(PROMPTS[1])["input_ids"]
    first, second = source.open([long]), source.open([short])
    first.prefill()
    first.advance(torch.tensor([[5]]))
    last = second.prefill()
    first.join(second)
    joined = first.advance(torch.tensor([[7], [9]]))[:, -1]
    expected = [source.sequence_logits([long + [5, 7], short + [9]])[i][-1] for i in range(2)]
    assert torch.allclose(joined[0], expected[0], atol=1e-4)
    assert torch.allclose(joined[1], expected[1], atol=1e-4)
    assert torch.allclose(last[0], source.sequence_logits([short])[0][-1], atol=1e-4)


def test_rows_that_join_and_leave_get_the_same_greedy_tokens_as_alone(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    requests = [tuner.request(p, max_new_tokens=4 + 5 * i) for i, p in enumerate(PROMPTS)]
    decoding = tuner.decoding(requests[:2])
    steps = decoding.steps()
    next(steps)
    decoding.add(requests[2:4])  # join at step 2, while the first rows are mid-way
    for _ in range(6):
        next(steps)
    decoding.add(requests[4:])  # join after the first row has left
    for _ in steps:
        pass
    for request, output in zip(requests, decoding.outputs()):
        assert output.token_ids == alone(tuner, request).token_ids
        assert torch.allclose(torch.tensor(output.logprobs), torch.tensor(alone(tuner, request).logprobs), atol=1e-4)


def test_a_chat_row_joining_raw_prompt_rows_forks_the_shared_session(trio, tok):
    base, expert, _ = trio
    tuner = ProxyTuner(base, expert, base, tokenizer=tok, alpha=0.5)  # base and anti-expert: one source
    raw = tuner.request(PROMPTS[0], max_new_tokens=12)
    chat = tuner.request(messages=[{"role": "user", "content": "hi"}], chat_roles=("expert", "anti_expert"),
                         max_new_tokens=12)
    assert raw.prompts["base"] == raw.prompts["anti_expert"] and chat.prompts["base"] != chat.prompts["anti_expert"]
    decoding = tuner.decoding([raw])
    steps = decoding.steps()
    next(steps)
    decoding.add([chat])
    for _ in steps:
        pass
    assert [o.token_ids for o in decoding.outputs()] == [alone(tuner, raw).token_ids, alone(tuner, chat).token_ids]


def test_sampled_rows_are_reproducible_whoever_joins(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    requests = [tuner.request(p, max_new_tokens=10, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS[:4])]
    decoding = tuner.decoding(requests[:1])
    steps = decoding.steps()
    next(steps)
    next(steps)
    decoding.add(requests[1:])
    for _ in steps:
        pass
    assert [o.token_ids for o in decoding.outputs()] == [alone(tuner, r).token_ids for r in requests]


def test_cancelled_rows_leave_at_the_next_step_and_the_others_are_unchanged(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    requests = [tuner.request(p, max_new_tokens=20) for p in PROMPTS[:3]]
    decoding = tuner.decoding(requests)
    steps = decoding.steps()
    assert len(next(steps)) == 3
    decoding.cancel([1])
    assert [e.row for e in next(steps)] == [0, 2]
    for _ in steps:
        pass
    outputs = decoding.outputs()
    assert outputs[1].finish_reason == "cancelled" and len(outputs[1].token_ids) == 1
    assert outputs[0].token_ids == alone(tuner, requests[0]).token_ids
    assert outputs[2].token_ids == alone(tuner, requests[2]).token_ids


def test_a_batch_that_emptied_restarts_with_the_rows_that_join(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    first, later = tuner.request(PROMPTS[0], max_new_tokens=1), tuner.request(PROMPTS[1], max_new_tokens=8)
    decoding = tuner.decoding([first])
    steps = decoding.steps()
    next(steps)  # the only row is done after this step
    decoding.add([later])
    for _ in steps:
        pass
    assert decoding.outputs()[1].token_ids == alone(tuner, later).token_ids


def test_padding_no_row_needs_is_cut_from_the_cache(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    long, short = tuner.request(PROMPTS[1], max_new_tokens=2), tuner.request("x", max_new_tokens=30)
    decoding = tuner.decoding([long, short])
    for _ in decoding.steps():
        pass
    session = next(iter(decoding.session.sessions.values()))
    assert session.mask.shape[1] == len(short.prompts["base"]) + 29  # the long prompt's columns are gone
    assert session.cache.get_seq_length() == session.mask.shape[1]


def test_top_logprobs_are_the_combined_log_softmax(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    output = tuner.generate(PROMPTS[0], max_new_tokens=5, return_details=3)[0]
    for detail, logprob in zip(output.details, output.logprobs):
        assert detail.top_logprobs[0][0] == detail.token_id  # greedy: the chosen token is the best
        assert abs(detail.top_logprobs[0][1] - logprob) < 1e-5
        assert [lp for _, lp in detail.top_logprobs] == sorted((lp for _, lp in detail.top_logprobs), reverse=True)


def test_a_lora_pair_trio_joins_too(tmp_path):
    """expert = a LoRA of the anti-expert runs both roles in one forward (backends/lora_pair.py); its
    sessions join like any other."""
    import json

    from peft import LoraConfig, get_peft_model

    from tiny import tiny_model, tiny_tokenizer

    for name, seed in (("base", 0), ("anti", 2)):
        tiny_model(seed).save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    torch.manual_seed(3)
    lora = get_peft_model(tiny_model(2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    config_file = tmp_path / "lora" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "base_model_name_or_path": str(tmp_path / "anti")}))
    tuner = ProxyTuner.from_pretrained(str(tmp_path / "base"), str(tmp_path / "lora"), str(tmp_path / "anti"))
    assert type(tuner.sources["expert"]).__name__ == "PairedRole"
    requests = [tuner.request(p, max_new_tokens=6 + 3 * i) for i, p in enumerate(PROMPTS[:4])]
    decoding = tuner.decoding(requests[:2])
    steps = decoding.steps()
    next(steps)
    decoding.add(requests[2:])
    for _ in steps:
        pass
    assert [o.token_ids for o in decoding.outputs()] == [alone(tuner, r).token_ids for r in requests]
