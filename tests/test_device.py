"""The engine's invariants on every device this machine has (the CPU always; CUDA where there is a GPU).

scripts/device_check.sh runs this file on a GPU machine; on the CPU it runs in every test session.
fp32 must be exact; bf16 is held to what its rounding allows (same greedy tokens on sharp tiny models).
"""
from __future__ import annotations

import pytest
import torch

from proxytune import ProxyTuner
from proxytune.backends.transformers import TransformersSource

PROMPTS = ["The quick brown fox", "def add(a, b):\n", "Answer the following question. Question: what is 3 + 4?"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"float32": (torch.float32, 1e-4), "bfloat16": (torch.bfloat16, 6e-2)}


@pytest.fixture(params=[(d, t) for d in DEVICES for t in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}", scope="module")
def placed(request, trio, tok):
    device, dtype_name = request.param
    dtype, tolerance = DTYPES[dtype_name]
    models = [m.to(device=device, dtype=dtype) for m in (copy_of(m) for m in trio)]
    return models, tok, tolerance, device


def copy_of(model):
    import copy
    return copy.deepcopy(model)


def test_alpha_zero_reproduces_the_base_models_own_generate(placed):
    (base, expert, anti), tok, _, device = placed
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, alpha=0.0)
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]], device=device)
        own = base.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=1)[0, ids.shape[1]:].tolist()
        ours = tuner.generate(prompt, max_new_tokens=12)[0]
        assert ours.token_ids == [t for t in own if t != 1][:len(ours.token_ids)]


def test_cached_logits_equal_recomputed_ones(placed):
    (base, _, _), tok, tolerance, _ = placed
    source = TransformersSource(base)
    prompt = tok(PROMPTS[0])["input_ids"]
    session = source.open([prompt])
    steps = [session.prefill()[0]]
    continuation = [5, 9, 17, 33]
    for token in continuation:
        steps.append(session.advance(torch.tensor([[token]]))[0, -1])
    full = source.sequence_logits([prompt + continuation])[0][len(prompt) - 1:]
    assert torch.allclose(torch.stack(steps).cpu(), full.cpu(), atol=tolerance * 10, rtol=tolerance)


def test_batched_equals_one_at_a_time_and_speculative_equals_plain(placed):
    (base, expert, anti), tok, tolerance, _ = placed
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok)
    source = tuner.sources["base"]
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    batched = source.open(prompts).prefill()
    for row, prompt in enumerate(prompts):
        assert torch.allclose(batched[row].cpu(), source.open([prompt]).prefill()[0].cpu(), atol=tolerance * 10,
                              rtol=tolerance)
    if base.dtype != torch.float32:
        return  # bf16: batch shapes round differently, so near-ties may flip; tokens are compared in fp32
    alone = [tuner.generate(p, max_new_tokens=12)[0].token_ids for p in PROMPTS]
    assert [o.token_ids for o in tuner.generate(PROMPTS, max_new_tokens=12)] == alone
    assert [o.token_ids for o in tuner.generate(PROMPTS, max_new_tokens=12, speculative=True)] == alone


# --- placement on real hardware (CUDA only; tests/test_placement.py covers the CPU) ------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def trio_dirs(trio, tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("device-trio")
    for model, role in zip(trio, ("base", "expert", "anti")):
        model.save_pretrained(root / role)
        tok.save_pretrained(root / role)
    return [str(root / role) for role in ("base", "expert", "anti")]


@needs_cuda
def test_a_base_split_across_devices_by_a_device_map_equals_the_whole_model(trio_dirs):
    last = f"cuda:{torch.cuda.device_count() - 1}" if torch.cuda.device_count() > 1 else "cpu"
    split = {"model.embed_tokens": "cuda:0", "model.rotary_emb": "cuda:0", "model.layers.0": "cuda:0",
             "model.layers.1": last, "model.norm": last, "lm_head": last}
    whole = ProxyTuner.from_pretrained(*trio_dirs, device="cuda", dtype="float32")
    mapped = ProxyTuner.from_pretrained(*trio_dirs, device="cuda", dtype="float32",
                                        placement={"base": {"device_map": split}})
    assert {str(p.device) for p in mapped.sources["base"].model.parameters()} == {"cuda:0", last}
    ours = mapped.generate(PROMPTS, max_new_tokens=12, batch_size=3)
    assert [o.token_ids for o in ours] == [o.token_ids for o in whole.generate(PROMPTS, max_new_tokens=12,
                                                                                batch_size=3)]


@needs_cuda
def test_roles_on_different_devices_step_concurrently_with_the_numbers_of_one_after_another(trio_dirs, monkeypatch):
    from proxytune.engine.session import ProxySession

    pair_device = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    tuner = ProxyTuner.from_pretrained(*trio_dirs, device="cuda:0", dtype="float32",
                                       placement={"expert": {"device": pair_device},
                                                  "anti_expert": {"device": pair_device}})
    assert tuner.sources["base"].place != tuner.sources["expert"].place
    concurrent = tuner.generate(PROMPTS, max_new_tokens=12, temperature=0.8, seed=5)
    monkeypatch.setattr(ProxySession, "concurrent", False)
    sequential = tuner.generate(PROMPTS, max_new_tokens=12, temperature=0.8, seed=5)
    assert [(o.token_ids, o.logprobs) for o in concurrent] == [(o.token_ids, o.logprobs) for o in sequential]
