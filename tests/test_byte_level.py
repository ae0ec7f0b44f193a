"""Byte-level proxy-tuning: the exactness claims, as specifications.

Two different tiny vocabularies are used: the byte-level BPE with merges of the other tests, and a
SentencePiece-style one ("▁" for a space, <0xNN> byte fallback, its own merges). Probabilities are
checked against brute force: every tokenization (or cover) of a string enumerated and run through
the model with a full forward.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from proxytune import ProxyTuner
from proxytune.backends.transformers import TransformersSource
from proxytune.engine.bytelevel import ByteSource, ByteTokenizer, ByteVocab, token_bytes
from proxytune.engine.text import TextTracker
from proxytune.errors import ProxyTuneError
from tiny import lora_of, tiny_byte_tokenizer, tiny_model, tiny_sentencepiece_tokenizer, tiny_tokenizer

PROMPT = "Question: what is 3 + 4? Answer:"


@pytest.fixture(scope="module")
def sp():
    return tiny_sentencepiece_tokenizer()


@pytest.fixture(scope="module")
def sp_pair(sp):
    return tiny_model(11, vocab_size=len(sp)), tiny_model(12, vocab_size=len(sp))


def byte_view(model, tokenizer, prune=0.0) -> ByteSource:
    source = TransformersSource(model, vocab_size=len(tokenizer))
    return ByteSource(source, ByteVocab(token_bytes(tokenizer), source.vocab_size, [tokenizer.eos_token_id]),
                      prune=prune)


def byte_logprobs(view: ByteSource, prompt: list[int], text: bytes) -> torch.Tensor:
    """[len(text) + 1, 257]: log p(b | text[:i]) at every position of `text`, and after it."""
    session = view.open([prompt])
    first = session.prefill()
    return torch.cat([first, session.advance(torch.tensor([list(text)]))[0]])


def masked_logprobs(model, ids: list[int], tokenizer) -> torch.Tensor:
    """log_softmax over the tokens that write text and the end of text (what the byte view masks to)."""
    with torch.no_grad():
        z = model(torch.tensor([ids])).logits[0, :, :len(tokenizer)].double()
    silent = [i for i, b in enumerate(token_bytes(tokenizer)) if not b and i != tokenizer.eos_token_id]
    z[:, silent] = -math.inf
    return torch.log_softmax(z, dim=-1)


def tokenizations(text: bytes, table: list[bytes]):
    """Every sequence of token ids whose bytes are exactly `text`."""
    by_bytes: dict[bytes, list[int]] = {}
    for token_id, piece in enumerate(table):
        if piece:
            by_bytes.setdefault(piece, []).append(token_id)
    if not text:
        yield []
        return
    for cut in range(1, len(text) + 1):
        for token_id in by_bytes.get(text[:cut], []):
            for rest in tokenizations(text[cut:], table):
                yield [token_id] + rest


def path_logprob(model, tokenizer, prompt: list[int], path: list[int]) -> torch.Tensor:
    """log p(path | prompt) and the next-token log-probs after it."""
    logprobs = masked_logprobs(model, prompt + path, tokenizer)
    total = sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(path))
    return total, logprobs[-1]


@pytest.mark.parametrize("which", ["bpe", "sentencepiece"])
def test_the_byte_probability_of_a_text_then_its_end_is_the_sum_over_all_its_tokenizations(which, sp):
    tokenizer = tiny_tokenizer() if which == "bpe" else sp
    model = tiny_model(0, vocab_size=len(tokenizer))
    table, prompt = token_bytes(tokenizer), tokenizer(PROMPT)["input_ids"]
    text = " 3 + 4".encode()
    paths = list(tokenizations(text, table))
    assert len(paths) >= 2  # the claim is about a sum, so there must be several terms
    brute = []
    for path in paths:
        total, after = path_logprob(model, tokenizer, prompt, path)
        brute.append(total + float(after[1]))  # then end of text
    logprobs = byte_logprobs(byte_view(model, tokenizer), prompt, text)
    ours = sum(float(logprobs[i, b]) for i, b in enumerate(text)) + float(logprobs[len(text), 256])
    assert ours == pytest.approx(float(torch.logsumexp(torch.tensor(brute), 0)), abs=1e-4)


def test_the_byte_probability_of_every_prefix_is_the_sum_over_its_covers(sp):
    """Covers: all tokens inside the prefix, the last one may run past its end."""
    model = tiny_model(3, vocab_size=len(sp))
    table, prompt = token_bytes(sp), sp(PROMPT)["input_ids"]
    text = "ab ñ".encode()  # ñ is two bytes: only byte-fallback tokens or merges cover it
    logprobs = byte_logprobs(byte_view(model, sp), prompt, text)
    running = 0.0
    for n in range(1, len(text) + 1):
        running += float(logprobs[n - 1, text[n - 1]])
        terms = []
        for inside in range(n):
            for path in tokenizations(text[:inside], table):
                total, after = path_logprob(model, sp, prompt, path)
                ids = [i for i, piece in enumerate(table) if piece.startswith(text[inside:n])]
                if ids:
                    terms.append(total + float(torch.logsumexp(after[ids], 0)))
        assert running == pytest.approx(float(torch.logsumexp(torch.tensor(terms), 0)), abs=1e-4), text[:n]


def test_a_vocabulary_of_single_bytes_gives_the_token_distribution_itself():
    bt = tiny_byte_tokenizer()
    model = tiny_model(4, vocab_size=len(bt), eos=bt.eos_token_id)
    prompt, text = bt(PROMPT)["input_ids"], b" 7"
    logprobs = byte_logprobs(byte_view(model, bt), prompt, text)
    table = token_bytes(bt)
    token_of = {piece[0]: i for i, piece in enumerate(table) if piece}
    reference = masked_logprobs(model, prompt + [token_of[b] for b in text], bt)[len(prompt) - 1:]
    for position in range(len(text) + 1):
        for byte, token_id in list(token_of.items())[::17]:
            assert float(logprobs[position, byte]) == pytest.approx(float(reference[position, token_id]), abs=1e-4)
        assert float(logprobs[position, 256]) == pytest.approx(float(reference[position, bt.eos_token_id]), abs=1e-4)


# --- the proxy over bytes -----------------------------------------------------------------------------


def cross_tuner(tok, sp, sp_pair, alpha=1.0, base=None, **kwargs):
    expert, anti = sp_pair
    return ProxyTuner(base if base is not None else tiny_model(0), expert, anti, alpha=alpha,
                      tokenizers={"base": tok, "expert": sp, "anti_expert": sp}, **kwargs)


def test_different_vocabularies_decode_byte_by_byte_automatically(tok, sp, sp_pair):
    tuner = cross_tuner(tok, sp, sp_pair)
    assert tuner.byte_level and tuner.vocab_size == 257
    out = tuner.generate(PROMPT, max_new_tokens=12)[0]
    assert len(out.token_ids) == 12 and all(0 <= b < 256 for b in out.token_ids)
    assert out.text == bytes(out.token_ids).decode("utf-8", errors="replace")


def test_alpha_zero_or_expert_equal_to_anti_expert_reproduces_the_base_byte_distribution(tok, sp, sp_pair):
    base = tiny_model(0)
    alone = byte_view(base, tok, prune=1e-5)  # the tuners' default: the same paths pruned
    own = ProxyTuner(base, sp_pair[0], sp_pair[0], tokenizers={"base": tok, "expert": sp, "anti_expert": sp})
    for tuner in (cross_tuner(tok, sp, sp_pair, alpha=0.0, base=base), own):
        out = tuner.generate(PROMPT, max_new_tokens=16, return_details=3)[0]
        text = bytes(out.token_ids)
        expected = byte_logprobs(alone, tok(PROMPT)["input_ids"], text)
        for position, detail in enumerate(out.details):
            combined = dict(detail.top_logprobs)
            for byte, value in combined.items():
                assert value == pytest.approx(float(expected[position, byte]), abs=1e-4)


def test_score_is_the_log_probability_of_the_continuation_bytes(tok, sp, sp_pair):
    tuner = cross_tuner(tok, sp, sp_pair, alpha=0.0, prune=0.0)
    score = tuner.score(PROMPT, " 7 #### 7")
    assert score.token_ids == list(" 7 #### 7".encode())
    expected = byte_logprobs(byte_view(tiny_model(0), tok), tok(PROMPT)["input_ids"], b" 7 #### 7")
    assert score.logprobs == pytest.approx([float(expected[i, b]) for i, b in enumerate(b" 7 #### 7")], abs=1e-4)
    steered = cross_tuner(tok, sp, sp_pair, alpha=1.0, prune=0.0).score(PROMPT, " 7 #### 7")
    assert steered.total != pytest.approx(score.total, abs=1e-3)


def test_batched_equals_one_at_a_time_greedy_and_seeded(tok, sp, sp_pair):
    tuner = cross_tuner(tok, sp, sp_pair)
    prompts = [PROMPT, "def add(a, b):", "The quick brown"]
    for options in ({}, {"temperature": 1.0, "top_p": 0.9, "seed": 5}):
        batched = tuner.generate(prompts, max_new_tokens=10, **options)
        for i, prompt in enumerate(prompts):
            seed = {"seed": options["seed"] + i} if options else {}
            alone = tuner.generate(prompt, max_new_tokens=10, **{**options, **seed})[0]
            assert alone.token_ids == batched[i].token_ids


def test_streaming_equals_generate_and_never_splits_a_character(tok, sp, sp_pair):
    tuner = cross_tuner(tok, sp, sp_pair)
    options = dict(max_new_tokens=24, temperature=1.0, seed=2)
    assert "".join(tuner.stream(PROMPT, **options)) == tuner.generate(PROMPT, **options)[0].text
    tracker = TextTracker(ByteTokenizer())
    pieces = []
    for byte in "aé🙂".encode():
        tracker.add(byte)
        pieces.append(tracker.delta())
    assert pieces == ["a", "", "é", "", "", "", "🙂"]


def test_stop_strings_and_each_roles_own_end_of_text(tok, sp, sp_pair):
    tuner = cross_tuner(tok, sp, sp_pair)
    free = tuner.generate(PROMPT, max_new_tokens=20)[0].text
    stop = free[3:5]
    stopped = tuner.generate(PROMPT, max_new_tokens=20, stop=stop)[0]
    assert stopped.finish_reason == "stop" and stopped.text == free[:free.index(stop)]
    base = tiny_model(0)
    with torch.no_grad():  # the base's and the experts' own end-of-text tokens (id 1 in each vocabulary) win
        base.lm_head.weight[1] = base.lm_head.weight.sum(0) * 0 + 50
    eager = cross_tuner(tok, sp, sp_pair, alpha=0.5, base=base).generate(PROMPT, max_new_tokens=20)[0]
    assert eager.finish_reason == "stop" and eager.token_ids == []


def test_chat_gives_each_role_its_own_template(tok, sp, sp_pair):
    tuner = cross_tuner(tok, sp, sp_pair)
    request = tuner.request(messages=[{"role": "user", "content": "hi"}])
    assert tok.decode(request.prompts["base"]) == "<|user|>hi</s><|assistant|>"
    assert sp.decode(request.prompts["expert"]) == "<|user|>hi<eos><|assistant|>"
    assert len(tuner.chat([{"role": "user", "content": "hi"}], max_new_tokens=6).token_ids) == 6


def test_alpha_schedules_count_bytes_and_read_markers_in_the_text_so_far(tok, sp, sp_pair):
    """At the byte level an output position is a byte: {0: 0.0, marker: 2.0} follows the base's own bytes until
    the text contains the marker, then α = 2, recomputed here from each role's byte view of the whole text."""
    from proxytune.engine.combine import combined_logits

    tuner = cross_tuner(tok, sp, sp_pair, prune=0.0)
    views = [byte_view(model, t) for model, t in ((tiny_model(0), tok), (sp_pair[0], sp), (sp_pair[1], sp))]
    prompt = "The quick brown"  # the tiny base writes ASCII after it ("s qu qu"): text and bytes agree
    prompts = [tok(prompt)["input_ids"], sp(prompt)["input_ids"], sp(prompt)["input_ids"]]
    plain = tuner.generate(prompt, max_new_tokens=14, alpha=0.0)[0]
    assert plain.text[:3].isascii()
    marker = plain.text[1:3]

    def recomputed(alpha_after: float, start: int) -> list[int]:
        written: list[int] = []
        for position in range(14):
            base, expert, anti = (byte_logprobs(view, prompt, bytes(written))[-1:]
                                  for view, prompt in zip(views, prompts))
            alpha = alpha_after if marker in bytes(written).decode("utf-8", "replace") or position >= start else 0.0
            z = combined_logits(base, [expert], [anti], torch.tensor([[alpha]]), every_model_writes=True)
            if int(z.argmax()) == 256:  # the end of text
                break
            written.append(int(z.argmax()))
        return written

    scheduled = tuner.generate(prompt, max_new_tokens=14, alpha_schedule={0: 0.0, marker: 2.0})[0]
    assert scheduled.token_ids == recomputed(2.0, start=99) and scheduled.token_ids[:3] == plain.token_ids[:3]
    assert scheduled.token_ids != plain.token_ids  # α = 2 from the fourth byte on changes the text
    marker = "never written"
    for start in (3, 5):
        by_position = tuner.generate(prompt, max_new_tokens=14, alpha_schedule={0: 0.0, start: 2.0})[0]
        assert by_position.token_ids == recomputed(2.0, start=start)
    # the marker was complete after three bytes: the same as α = 2 from position 3 on
    assert tuner.generate(prompt, max_new_tokens=14, alpha_schedule={0: 0.0, 3: 2.0})[0].token_ids == \
        scheduled.token_ids != by_position.token_ids


def test_a_same_vocabulary_trio_can_be_forced_to_bytes(trio, tok):
    """Same vocabulary: at α = 0 both levels are the base's own distribution over texts (equal step by step
    for a vocabulary of single bytes, where each text has one tokenization); at α ≠ 0 with merges the
    two are different distributions, since the product of per-byte ratios is not the per-token one."""
    tokens, forced = ProxyTuner(*trio, tokenizer=tok, alpha=1.0), ProxyTuner(*trio, tokenizer=tok, byte_level=True)
    assert not tokens.byte_level and forced.byte_level
    continuation = " 7 #### 7"
    at_zero = [t.score(PROMPT, continuation, alpha=0.0).total for t in (tokens, forced)]
    # token level scores one tokenization, byte level all of them: the byte level is at least as likely
    assert at_zero[1] >= at_zero[0] - 1e-5
    assert tokens.score(PROMPT, continuation).total != pytest.approx(forced.score(PROMPT, continuation).total, abs=1e-3)
    bt = tiny_byte_tokenizer()
    models = [tiny_model(seed, vocab_size=len(bt), eos=bt.eos_token_id) for seed in (5, 6, 7)]
    single = [ProxyTuner(*models, tokenizer=bt, alpha=alpha, byte_level=level) for level in (False, True)
              for alpha in (0.0, 1.5)]
    for token_level, byte_level in ((single[0], single[2]), (single[1], single[3])):
        text = token_level.generate(PROMPT, max_new_tokens=10)[0].text
        assert byte_level.generate(PROMPT, max_new_tokens=10)[0].text == text
        assert byte_level.score(PROMPT, text).logprobs == pytest.approx(token_level.score(PROMPT, text).logprobs,
                                                                         abs=1e-4)


def test_alpha_zero_byte_sampling_matches_the_base_text_distribution(tok, sp, sp_pair):
    """Chi-square: the first two bytes sampled at α = 0 against the base's exact probabilities of them."""
    from scipy.stats import chisquare

    base = tiny_model(0)
    tuner = cross_tuner(tok, sp, sp_pair, alpha=0.0, base=base)
    n = 600
    outs = tuner.generate([PROMPT] * n, max_new_tokens=2, temperature=1.0, seed=100, batch_size=200)
    counts = Counter(bytes(o.token_ids) for o in outs)
    view, prompt = byte_view(base, tok, prune=1e-7), tok(PROMPT)["input_ids"]
    first = byte_logprobs(view, prompt, b"")[0].exp()
    expected = {}
    for b0 in first.topk(8).indices.tolist():
        if b0 == 256:
            expected[b""] = float(first[256])
            continue
        second = byte_logprobs(view, prompt, bytes([b0]))[1].exp()
        for b1 in second.topk(8).indices.tolist():
            expected[bytes([b0]) if b1 == 256 else bytes([b0, b1])] = float(first[b0] * second[b1])
    frequent = [k for k, p in expected.items() if p * n >= 5]
    observed = [counts[k] for k in frequent] + [n - sum(counts[k] for k in frequent)]
    wanted = [expected[k] * n for k in frequent] + [n * (1 - sum(expected[k] for k in frequent))]
    assert len(frequent) >= 3
    assert chisquare(observed, wanted).pvalue > 1e-3
    # and the test has power: the proxy at α = 2 is told apart from the base
    steered = cross_tuner(tok, sp, sp_pair, alpha=2.0, base=base)
    other = Counter(bytes(o.token_ids) for o in steered.generate([PROMPT] * n, max_new_tokens=2, temperature=1.0,
                                                                 seed=100, batch_size=200))
    observed = [other[k] for k in frequent] + [n - sum(other[k] for k in frequent)]
    assert chisquare(observed, wanted).pvalue < 1e-3


# --- combinations and bad input -----------------------------------------------------------------------


def test_a_lora_pair_of_another_family_steers_the_base_byte_by_byte(tok, sp):
    """The one-pass LoRA pair's halves run alone in byte mode (each role has its own token paths), with the
    same numbers as the expert and the adapter-off anti-expert as two plain sources."""
    from proxytune.backends.lora_pair import LoraPair

    expert = lora_of(tiny_model(12, vocab_size=len(sp)), seed=3)
    pair = LoraPair(expert)
    tokenizers = {"base": tok, "expert": sp, "anti_expert": sp}
    paired = ProxyTuner(tiny_model(0), pair.expert, pair.anti_expert, tokenizers=tokenizers)
    plain = ProxyTuner(tiny_model(0), TransformersSource(expert), TransformersSource(expert, adapter_disabled=True),
                       tokenizers=tokenizers)
    prompts = [PROMPT, "def add"]
    assert [o.token_ids for o in paired.generate(prompts, max_new_tokens=8)] == \
        [o.token_ids for o in plain.generate(prompts, max_new_tokens=8)]


def test_speculative_decoding_is_refused_with_a_reason(tok, sp, sp_pair):
    with pytest.raises(ProxyTuneError, match="byte"):
        cross_tuner(tok, sp, sp_pair).generate(PROMPT, max_new_tokens=4, speculative=True)


def test_a_vocabulary_without_byte_fallback_is_refused_naming_the_role_and_the_text(tok, sp_pair):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))  # SentencePiece-style, but no <0xNN> tokens to fall back on
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    raw.train_from_iterator(["abc def 3 + 4 ? : Question what is Answer"] * 5,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    narrow = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    expert = tiny_model(11, vocab_size=len(narrow))
    tuner = ProxyTuner(tiny_model(0), expert, expert, tokenizers={"base": tok, "expert": narrow, "anti_expert": narrow})
    with pytest.raises(ProxyTuneError, match=r"expert tokenizer cannot represent prompt 0 'héllo"):
        tuner.generate("héllo", max_new_tokens=2)
    with pytest.raises(ProxyTuneError, match=r"expert model's vocabulary cannot write"):
        tuner.score("abc", " é")


def test_a_remote_role_is_refused_in_byte_mode(tok, sp, sp_pair):
    from openai_fake import FakeOpenAI
    from proxytune.backends.remote.source import RemoteSource
    from proxytune.backends.remote.spec import parse_spec

    with FakeOpenAI(tiny_model(0), tok) as server:
        base = RemoteSource(parse_spec(f"openai:{server.url}?tokenizer=tiny"), tok, name="base")
        with pytest.raises(ProxyTuneError, match="returns only its top-k logprobs"):
            ProxyTuner(base, *sp_pair, tokenizers={"base": tok, "expert": sp, "anti_expert": sp})


# --- the CLI and the server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cross_dirs(tmp_path_factory, sp):
    """A tiny trio on disk whose pair has another vocabulary than the base."""
    root = tmp_path_factory.mktemp("cross")
    dirs = {}
    for role, model, tokenizer in (("base", tiny_model(0), tiny_tokenizer()),
                                   ("expert", tiny_model(11, vocab_size=len(sp)), sp),
                                   ("anti_expert", tiny_model(12, vocab_size=len(sp)), sp)):
        model.save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
        dirs[role] = str(root / role)
    return dirs


def test_the_cli_generates_byte_by_byte_and_says_what_it_cost(cross_dirs, capsys):
    from proxytune.cli import main

    tuner = ProxyTuner.from_pretrained(cross_dirs["base"], cross_dirs["expert"], cross_dirs["anti_expert"])
    expected = tuner.generate(PROMPT, max_new_tokens=12)[0].text
    code = main(["generate", "--base", cross_dirs["base"], "--expert", cross_dirs["expert"], "--anti-expert",
                 cross_dirs["anti_expert"], "--max-new-tokens", "12", "--verbose", PROMPT])
    out, err = capsys.readouterr()
    assert code == 0 and out == expected + "\n"
    assert "proxy: 12 bytes in" in err and "expert (bytes): " in err and "token paths per byte" in err
    assert main(["generate", "--base", cross_dirs["base"], "--expert", cross_dirs["expert"], "--anti-expert",
                 cross_dirs["anti_expert"], "--token-level", PROMPT]) == 2
    assert "vocabulary differs" in capsys.readouterr().err


def test_a_server_over_a_cross_vocabulary_trio_streams_concurrent_requests(cross_dirs):
    import asyncio

    import openai
    from tiny_server import ServerProcess

    tuner = ProxyTuner.from_pretrained(cross_dirs["base"], cross_dirs["expert"], cross_dirs["anti_expert"])
    prompts = [PROMPT, "def add(a, b):", "The quick brown", "x"]
    expected = [o.text for o in tuner.generate(prompts, max_new_tokens=10)]
    server = ServerProcess(cross_dirs).wait_ready()
    try:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

        async def one(prompt):
            stream = await client.completions.create(model="proxytune", prompt=prompt, max_tokens=10, temperature=0,
                                                     stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

        async def every():
            return await asyncio.gather(*(one(p) for p in prompts))

        assert asyncio.run(every()) == expected
        sync = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        reply = sync.completions.create(model="proxytune", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
        own = tuner.generate(PROMPT, max_new_tokens=6)[0]  # random models write invalid UTF-8: compare bytes' logprobs
        assert reply.choices[0].logprobs.token_logprobs == pytest.approx(own.logprobs, abs=1e-4)
    finally:
        server.stop()


# --- llama.cpp ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_gguf():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from llama_server import smollm2_gguf
    from proxytune.backends.llama_cpp.model import GGUFModel
    from proxytune.models.tokenizers import load_gguf_tokenizer

    model = GGUFModel(smollm2_gguf())
    return model, load_gguf_tokenizer(model.path)


def test_a_llama_cpp_model_read_byte_by_byte_sums_over_its_tokenizations(smol_gguf):
    from proxytune.backends.llama_cpp.source import LlamaCppSource

    model, tokenizer = smol_gguf
    source = LlamaCppSource(model, name="smol", threads=1, n_ctx=1024)
    table = token_bytes(tokenizer, "smol")
    eos = tokenizer.eos_token_id
    view = ByteSource(source, ByteVocab(table, source.vocab_size, [eos]), prune=0.0)
    prompt, text = tokenizer("The capital of France is")["input_ids"], b" Paris"
    logprobs = byte_logprobs(view, prompt, text)
    ours = sum(float(logprobs[i, b]) for i, b in enumerate(text)) + float(logprobs[len(text), 256])
    silent = torch.tensor([i for i, piece in enumerate(table[:source.vocab_size]) if not piece and i != eos])
    brute = []
    for path in tokenizations(text, table[:source.vocab_size]):
        z = source.sequence_logits([prompt + path])[0].double()
        z[:, silent] = -math.inf
        lp = torch.log_softmax(z, dim=-1)
        brute.append(sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(path)) + float(lp[-1, eos]))
    assert len(brute) >= 4
    assert ours == pytest.approx(float(torch.logsumexp(torch.tensor(brute), 0)), abs=2e-3)  # llama.cpp batch numerics


def test_a_llama_cpp_base_with_a_pair_of_another_family_batched_equals_one_at_a_time(smol_gguf, sp, sp_pair):
    from proxytune.backends.llama_cpp.source import LlamaCppSource

    model, tokenizer = smol_gguf
    base = LlamaCppSource(model, name="base", threads=1, n_ctx=2048)
    tuner = ProxyTuner(base, *sp_pair, tokenizers={"base": tokenizer, "expert": sp, "anti_expert": sp}, alpha=0.5)
    prompts = ["The capital of France is", "def add(a, b):"]
    batched = tuner.generate(prompts, max_new_tokens=16)
    assert [tuner.generate(p, max_new_tokens=16)[0].text for p in prompts] == [o.text for o in batched]
    alone = ProxyTuner(base, sp_pair[0], sp_pair[0], tokenizers={"base": tokenizer, "expert": sp, "anti_expert": sp})
    assert alone.generate(prompts[0], max_new_tokens=16)[0].text.startswith(" Paris")


@pytest.mark.parametrize("kind", ["transformers", "lora pair half"])
def test_gathering_rows_of_several_sessions_equals_forking_and_joining_them(kind):
    """The byte view's copy of its token paths' rows (`copy_rows`): one copy per row, the same caches, masks
    and next logits as forks joined, bit for bit, for rows of sessions of different lengths (left padding)."""
    import copy

    from proxytune.backends.lora_pair import LoraPair
    from proxytune.backends.protocol import copy_rows

    if kind == "transformers":
        source = TransformersSource(tiny_model(0))
    else:
        source = LoraPair(lora_of(copy.deepcopy(tiny_model(2)))).expert
    prompts = [[[5, 6, 7, 8, 9, 10], [11, 12]], [[13, 14, 15]], [[16, 17, 18, 19, 20, 21, 22, 23], [24], [25, 26]]]
    sessions = []
    for batch in prompts:
        session = source.open(batch)
        session.prefill()
        session.advance(torch.tensor([[30 + i] for i in range(len(batch))]))
        sessions.append(session)
    parts = [(sessions[0], [1, 0, 1]), (sessions[1], [0]), (sessions[2], [2, 0])]
    assert sessions[0].capabilities.gather
    gathered = copy_rows(parts)
    joined = sessions[0].fork([1, 0, 1])
    for session, rows in parts[1:]:
        joined.join(session.fork(rows))
    tokens = torch.tensor([[40 + i] for i in range(6)])
    assert torch.equal(gathered.advance(tokens), joined.advance(tokens))
    inner = (lambda s: s) if kind == "transformers" else (lambda s: s.alone)
    assert torch.equal(inner(gathered).mask, inner(joined).mask)
    for mine, theirs in zip(inner(gathered).cache.layers, inner(joined).cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
