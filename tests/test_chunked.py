"""Chunked decoding of a remote base: the server drafts its own continuation, the local pair verifies.

The claims: greedy output is identical to plain remote-base proxy decoding (one call per token) on the
same server, whatever the chunk length, the keys (text or ids), the top-k and the server's quirks;
sampling is exact in distribution (a chi-square test against plain remote sampling, with the power to
see a wrong distribution); stats count what really happened; faults keep the text so far.
"""
from __future__ import annotations

import collections

import pytest
import torch
from openai_fake import Fault, FakeOpenAI
from wrapped_sources import Scripted

from proxytune import ProxyTuner
from proxytune.backends.remote.source import RemoteSource
from proxytune.backends.remote.spec import parse_spec
from proxytune.backends.transformers import TransformersSource
from proxytune.engine.chunked import ChunkedDecoding
from proxytune.errors import ProxyTuneError

PROMPTS = ["The quick", "def add", "Answer the", "Tuning language"]


@pytest.fixture()
def fake(trio, tok):
    with FakeOpenAI(trio[0], tok) as server:
        yield server


def remote(server, tok, options: str = "") -> RemoteSource:
    return RemoteSource(parse_spec(f"openai:{server.url}?tokenizer=tiny{options}"), tok)


def near_pair(trio, scale: float = 0.005):
    """An expert close to its anti-expert (a slightly perturbed copy): proxy and base mostly agree, as a
    real tuned pair does (the paper: the top token changes at 13-25 % of positions)."""
    import copy

    expert = copy.deepcopy(trio[2])
    torch.manual_seed(5)
    with torch.no_grad():
        expert.lm_head.weight.add_(scale * torch.randn_like(expert.lm_head.weight))
    return expert, trio[2]


def tuners(fake, tok, trio, options: str, alpha: float, pair=None):
    expert, anti = pair or (trio[1], trio[2])
    plain_source, chunked_source = remote(fake, tok, options + "&chunk=0"), remote(fake, tok, options)
    plain = ProxyTuner(plain_source, expert, anti, tokenizer=tok, alpha=alpha)
    chunked = ProxyTuner(chunked_source, expert, anti, tokenizer=tok, alpha=alpha)
    return plain, chunked


# --- greedy: identical to plain -----------------------------------------------------------------------

@pytest.mark.parametrize("options", ["&top_k=20", "&top_k=5", "&top_k=320&token_ids=1&send_ids=1",
                                     "&top_k=20&chunk=3", "&top_k=20&chunk=1"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_greedy_chunked_output_is_plain_remote_output(fake, tok, trio, options, alpha):
    plain, chunked = tuners(fake, tok, trio, options, alpha, near_pair(trio))
    want = plain.generate(PROMPTS, max_new_tokens=24)
    got = chunked.generate(PROMPTS, max_new_tokens=24)
    assert [(o.token_ids, o.finish_reason, o.text) for o in got] == [(o.token_ids, o.finish_reason, o.text) for o in want]
    torch.testing.assert_close(torch.tensor([lp for o in got for lp in o.logprobs]),
                               torch.tensor([lp for o in want for lp in o.logprobs]))


def test_a_remote_base_decodes_in_chunks_by_default_and_plain_with_chunk_0(fake, tok, trio):
    plain, chunked = tuners(fake, tok, trio, "&top_k=20", 1.0)
    assert type(chunked.decoding([chunked.request("The quick")])) is ChunkedDecoding
    assert type(chunked.decoding([chunked.request("The quick")], speculative=True)) is ChunkedDecoding
    assert type(plain.decoding([plain.request("The quick")])) is not ChunkedDecoding


def test_chunks_cost_a_fraction_of_a_call_per_token_and_stats_say_so_honestly(fake, tok, trio):
    plain, chunked = tuners(fake, tok, trio, "&top_k=320&token_ids=1&send_ids=1&chunk=8", 0.3, near_pair(trio))
    before = fake.completions
    outputs = chunked.generate(PROMPTS, max_new_tokens=32)
    stats = chunked.sources["base"].stats
    generated = sum(len(o.token_ids) + (o.finish_reason == "stop") for o in outputs)
    assert stats.calls == fake.completions - before  # every HTTP call counted, start-up excluded
    assert stats.tokens == generated
    assert stats.calls_per_token == pytest.approx(stats.calls / generated)
    assert stats.calls_per_token < 0.5 and stats.tokens_per_call > 2
    assert stats.drafted >= stats.tokens - len(PROMPTS)  # what was kept was drafted (first tokens: prefill)
    assert stats.bytes_sent > 0 and stats.bytes_received > 0 and stats.seconds > 0
    plain.generate(PROMPTS, max_new_tokens=32)
    assert plain.sources["base"].stats.calls_per_token == 1.0


def test_alpha_zero_accepts_every_draft(fake, tok, trio):
    _, chunked = tuners(fake, tok, trio, "&top_k=320&token_ids=1&send_ids=1&chunk=8", 0.0)
    output = chunked.generate("The quick", max_new_tokens=33)[0]
    assert len(output.token_ids) == 33
    # the prefill, then chunks of 8 (one more where the raw argmax is a special token the server holds back)
    assert chunked.sources["base"].stats.calls <= 1 + 4 + 1
    assert all(p["max_tokens"] <= 8 for p in fake.payloads[-4:])


def test_stop_strings_eos_and_max_tokens_end_rows_inside_a_chunk(fake, tok, trio):
    plain, chunked = tuners(fake, tok, trio, "&top_k=20", 0.5, near_pair(trio))
    text = plain.generate("The quick", max_new_tokens=24)[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    for kwargs in ({"stop": [stop]}, {"max_new_tokens": 5}, {"max_new_tokens": 1}):
        kwargs = {"max_new_tokens": 24, **kwargs}
        want = plain.generate(PROMPTS, **kwargs)
        got = chunked.generate(PROMPTS, **kwargs)
        assert [(o.text, o.finish_reason) for o in got] == [(o.text, o.finish_reason) for o in want]


def test_streaming_shows_each_token_as_soon_as_it_is_verified(fake, tok, trio):
    plain, chunked = tuners(fake, tok, trio, "&top_k=320&token_ids=1&send_ids=1", 0.3, near_pair(trio))
    request = chunked.request("The quick", max_new_tokens=20)
    steps = list(chunked.decoding([request]).steps())
    assert all(len(events) == 1 for events in steps)  # one event per token, never a chunk at once
    assert "".join(chunked.stream("The quick", max_new_tokens=20)) == plain.generate("The quick", max_new_tokens=20)[0].text


def test_rows_of_a_batch_are_drafted_concurrently(fake, tok, trio):
    _, chunked = tuners(fake, tok, trio, "&top_k=20&concurrency=4", 0.5)
    fake.delay = 0.1
    chunked.generate(PROMPTS, max_new_tokens=6)
    assert fake.max_in_flight >= 2


def test_details_and_logprobs_match_plain_decoding(fake, tok, trio):
    plain, chunked = tuners(fake, tok, trio, "&top_k=20", 0.5, near_pair(trio))
    want = plain.generate(PROMPTS[:2], max_new_tokens=10, return_details=3)
    got = chunked.generate(PROMPTS[:2], max_new_tokens=10, return_details=3)
    for a, b in zip(got, want):
        assert [[t for t, _ in d.top["proxy"]] for d in a.details] == [[t for t, _ in d.top["proxy"]] for d in b.details]
        torch.testing.assert_close(torch.tensor([[p for _, p in d.top["proxy"]] for d in a.details]),
                                   torch.tensor([[p for _, p in d.top["proxy"]] for d in b.details]))


# --- sampling: exact in distribution ------------------------------------------------------------------

def samples(tuner, n: int, seed: int, tokens: int = 4) -> list[tuple]:
    outputs = tuner.generate(["The quick"] * n, max_new_tokens=tokens, temperature=0.5, seed=seed, batch_size=n)
    return [tuple(o.token_ids) + ("<end>",) * (tokens - len(o.token_ids)) for o in outputs]


def homogeneity_p(a: list, b: list) -> float:
    """Chi-square test that two samples come from one distribution (cells under 5 expected pooled)."""
    from scipy.stats import chi2_contingency

    a, b = collections.Counter(a), collections.Counter(b)
    na, nb = sum(a.values()), sum(b.values())
    big = [cell for cell in set(a) | set(b) if (a[cell] + b[cell]) * min(na, nb) / (na + nb) >= 5]
    table = [[a[c] for c in big] + [na - sum(a[c] for c in big)], [b[c] for c in big] + [nb - sum(b[c] for c in big)]]
    if table[0][-1] + table[1][-1] == 0:
        table = [row[:-1] for row in table]
    return float(chi2_contingency(table)[1])


def views(rows: list[tuple]) -> list[list]:
    """What is compared: the first two tokens jointly, then each later position on its own."""
    return [[r[:2] for r in rows]] + [[r[j] for r in rows] for j in range(2, len(rows[0]))]


@pytest.mark.parametrize("regime", ["near", "far"])
@pytest.mark.parametrize("options", ["&top_k=20&chunk=4", "&top_k=20&token_ids=1&send_ids=1&sample_drafts=1&chunk=4"])
def test_sampling_is_exact_in_distribution(fake, tok, trio, options, regime, monkeypatch):
    """Plain remote sampling and chunked sampling give one distribution (the first two tokens jointly and
    each later one), with the proxy near the base (most drafts accepted) and far from it (most rejected:
    the residual draws). Far from it, a chunked decoding that accepts every draft is seen to differ, so
    the test has the power to see a wrong acceptance rule."""
    import proxytune.engine.chunked as chunked_module

    pair, n = (near_pair(trio, 0.02) if regime == "near" else (trio[1], trio[2])), 300
    plain, chunked = tuners(fake, tok, trio, options, 0.5, pair)
    want, got = samples(plain, n, seed=1), samples(chunked, n, seed=2)
    if regime == "near":
        assert chunked.sources["base"].stats.tokens_per_call > 1.1  # drafts were accepted, not just resampled
    assert min(homogeneity_p(a, b) for a, b in zip(views(want), views(got))) > 1e-3 / 3
    if regime == "far":  # wrong: every draft accepted (q(d) taken as ~0)
        monkeypatch.setattr(chunked_module, "draft_distributions",
                            lambda given, tokens, vocab: [torch.full((vocab,), 1e-9)] * len(tokens))
        _, broken = tuners(fake, tok, trio, options, 0.5, pair)
        assert min(homogeneity_p(a, b) for a, b in zip(views(want), views(samples(broken, n, seed=3)))) < 1e-6


def test_seeded_sampling_repeats_whatever_the_chunk_length(fake, tok, trio):
    pair = near_pair(trio)
    runs = []
    for chunk in ("2", "5", "auto"):
        _, chunked = tuners(fake, tok, trio, f"&top_k=20&chunk={chunk}", 0.5, pair)
        runs.append([o.token_ids for o in chunked.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=7)])
    assert runs[0] == runs[1] == runs[2]


def test_sampled_drafts_need_exact_token_ids(fake, tok):
    with pytest.raises(ProxyTuneError, match="sample_drafts=1 needs token_ids=1"):
        parse_spec(f"openai:{fake.url}?tokenizer=tiny&sample_drafts=1")
    with pytest.raises(ProxyTuneError, match="chunk= must be auto, 0"):
        parse_spec(f"openai:{fake.url}?tokenizer=tiny&chunk=-2")


# --- faults and quirks --------------------------------------------------------------------------------

def test_a_server_that_dies_mid_chunk_keeps_the_text_so_far(fake, tok, trio):
    plain, chunked = tuners(fake, tok, trio, "&top_k=320&token_ids=1&send_ids=1&chunk=4&tries=2&backoff=0.01",
                            0.3, near_pair(trio))
    want = plain.generate("Answer the", max_new_tokens=24)[0]
    assert len(want.token_ids) == 24
    fake.fault = Fault(start=fake.completions + 3, count=10 ** 6, status=0)
    got = chunked.generate("Answer the", max_new_tokens=24)[0]
    assert got.finish_reason == "error" and "base model at" in got.error and "failed after 2 tries" in got.error
    assert 3 <= len(got.token_ids) < 24 and got.token_ids == want.token_ids[:len(got.token_ids)]


def test_fewer_logprobs_or_entries_than_asked_change_nothing_but_the_cost(fake, tok, trio):
    plain, chunked = tuners(fake, tok, trio, "&top_k=20", 0.5, near_pair(trio))
    for cap in ("logprobs_cap", "entries_cap"):
        setattr(fake, cap, 3 if cap == "logprobs_cap" else 2)
        want = plain.generate(PROMPTS, max_new_tokens=16)
        got = chunked.generate(PROMPTS, max_new_tokens=16)
        setattr(fake, cap, None)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert all(o.finish_reason != "error" for o in got)


def test_a_re_tokenisation_drift_ends_the_chunk_never_the_row(fake, tok, trio):
    """The proxy picks "T", "h", "e" (the tokenizer would write "The"): a one-token call after them sends
    text the server splits otherwise, so the chunk must stop where that happens to stay equal to plain."""
    split = [tok.convert_tokens_to_ids(c) for c in ["T", "h", "e"]]
    assert tok("The", add_special_tokens=False)["input_ids"] != split
    script = [tok.convert_tokens_to_ids("Ġ")] + split * 3
    start = len("The quick")
    # the server's own continuation is the script too (one character per token), so a chunk would run on
    fake.steer = lambda ids: (script[len(tok.decode(ids)) - start] if len(tok.decode(ids)) - start < len(script)
                              else None)
    expert = Scripted(TransformersSource(trio[1]), script, push=500.0)
    anti = TransformersSource(trio[2])
    plain_source, chunked_source = remote(fake, tok, "&top_k=320&chunk=0"), remote(fake, tok, "&top_k=320")
    want = ProxyTuner(plain_source, expert, anti, tokenizer=tok, alpha=1.0).generate("The quick", max_new_tokens=14)[0]
    got = ProxyTuner(chunked_source, expert, anti, tokenizer=tok, alpha=1.0).generate("The quick", max_new_tokens=14)[0]
    assert want.token_ids[1:4] == split and plain_source.stats.drift > 0
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason != "error"


def test_a_server_that_refuses_llama_cpp_sampler_fields_is_asked_again_without_them(fake, tok, trio):
    plain, chunked = tuners(fake, tok, trio, "&top_k=20", 0.5, near_pair(trio))
    fake.refuse_fields = {"repeat_penalty", "min_p", "typical_p"}
    want = plain.generate(PROMPTS[:2], max_new_tokens=12)
    got = chunked.generate(PROMPTS[:2], max_new_tokens=12)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert chunked.sources["base"].sampler_fields is False
    first_without = next(i for i, p in enumerate(fake.payloads) if p["max_tokens"] > 1 and "min_p" not in p)
    assert not any("min_p" in p for p in fake.payloads[first_without + 2:])  # two rows were in flight


# --- chat-only bases ----------------------------------------------------------------------------------

def test_a_chat_only_base_serves_choose_and_refuses_generation_with_a_pointer(fake, tok, trio):
    from proxytune.facade.choice import choose

    fake.chat_only = True
    source = remote(fake, tok, "&top_k=320&api=chat")
    tuner = ProxyTuner(source, trio[1], trio[2], tokenizer=tok, alpha=1.0)
    with pytest.raises(ProxyTuneError, match="chat-only .*Use `choose`"):
        tuner.generate("The quick", max_new_tokens=4)
    messages = [{"role": "user", "content": "The quick brown"}]
    options = [tok.decode([i]) for i in (44, 56, 38)]  # three one-token answers
    got = choose(tuner, options, messages=messages)
    assert fake.payloads[-1]["messages"] == messages and fake.payloads[-1]["top_logprobs"] == 320
    # the same choice as a completions base given the chat-formatted prompt (what the chat endpoint renders)
    fake.chat_only = False
    local = ProxyTuner(remote(fake, tok, "&top_k=320"), trio[1], trio[2], tokenizer=tok, alpha=1.0)
    want = choose(local, options, messages=messages)
    assert got.index == want.index and got.scores == pytest.approx(want.scores, abs=1e-4)
    with pytest.raises(ProxyTuneError, match="one-token options"):
        choose(tuner, ["The quick", "def add"], messages=messages)


def test_generate_verbose_prints_the_cost_in_one_line_per_remote_role(fake, tok, trio, tmp_path, capsys):
    from proxytune.cli import main

    for name, model in (("expert", trio[1]), ("anti", trio[2])):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    base = f"openai:{fake.url}?tokenizer={tmp_path / 'expert'}&top_k=320&token_ids=1&send_ids=1"
    assert main(["generate", "--base", base, "--expert", str(tmp_path / "expert"), "--anti-expert",
                 str(tmp_path / "anti"), "--alpha", "0", "--max-new-tokens", "12", "--verbose", "The quick"]) == 0
    err = capsys.readouterr().err
    assert "proxy: 12 tokens in" in err and "ms per token" in err
    line = next(line for line in err.splitlines() if line.startswith("base: "))
    assert "generated tokens" in line and "tokens per call" in line and "B sent" in line


def test_a_format_and_penalties_over_a_remote_base_give_plain_remote_output(fake, tok, trio):
    """Chunks are verified against the shaped p̃ (the server's drafts cannot be masked): same tokens as plain."""
    plain, chunked = tuners(fake, tok, trio, "&top_k=320&token_ids=1&send_ids=1", 1.0, near_pair(trio))
    fmt = {"type": "regex", "regex": "(fox|dog|the)( [a-z]{1,6}){2,5}"}
    options = dict(max_new_tokens=30, response_format=fmt, frequency_penalty=0.8, logit_bias={9: 2.0})
    want = plain.generate(PROMPTS, **options)
    got = chunked.generate(PROMPTS, **options)
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in want]
    assert all(o.finish_reason == "stop" and o.text.split(" ")[0] in ("fox", "dog", "the") for o in got)
