"""`proxytune serve` against an attacker and a careless client (issue 13): every bad input is a 4xx naming what
to fix and harms no other request; nothing runs unbounded; faults are reported; shutdown drains.

Real server processes over the tiny trio: one over local models, one over a remote base (a fake OpenAI server
in this process, slowed to 30 ms a call so that requests last long enough to be cut).
"""
from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time

import httpx
import pytest

from openai_fake import Fault, FakeOpenAI
from test_grammar_limits import ref_chain, rule_chain
from tiny_server import ServerProcess, save_tiny_trio

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
OK = {"prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_tiny_trio(tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="module")
def server(dirs):
    process = ServerProcess(dirs, "--api-key-env", "HARDENING_KEY", "--max-echo-tokens", "40",
                            env={"HARDENING_KEY": KEY}).wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def fake(trio, tok):
    with FakeOpenAI(trio[0], tok) as server:
        server.delay = 0.03
        yield server


@pytest.fixture(scope="module")
def remote_dirs(dirs, fake):
    base = f"openai:{fake.url}?tokenizer={dirs['base']}&top_k=320&token_ids=1&tries=2&backoff=0.01"
    return {"base": base, "expert": dirs["expert"], "anti_expert": dirs["anti_expert"]}


@pytest.fixture(scope="module")
def remote_server(remote_dirs, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY + "\n")
    process = ServerProcess(remote_dirs, "--api-key-file", str(key_file)).wait_ready()
    yield process
    process.stop()


def post(server, path="/v1/completions", body=None, raw=None, headers=None, timeout=30.0):
    return httpx.post(server.url + path, content=raw if raw is not None else json.dumps(body).encode(),
                      headers={**AUTH, **(headers or {})}, timeout=timeout)


def stream_lines(server, body, timeout=60.0) -> list[str]:
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=timeout) as response:
        return [line for line in response.iter_lines() if line]


def events(lines: list[str]) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


BAD = [  # (what, raw body, extra headers, status, param)
    ("a lone surrogate in the prompt", rb'{"prompt": "hi \ud800 there", "max_tokens": 2}', {}, 400, "prompt"),
    ("a lone surrogate in a chat message",
     rb'{"messages": [{"role": "user", "content": "\udfff"}], "max_tokens": 2}', {}, 400, "messages"),
    ("JSON nested 100,000 deep", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, None),
    ("JSON nested 40 deep", b'{"prompt": "hi", "user": ' + b"[" * 40 + b"]" * 40 + b"}", {}, 400, "user"),
    ("100 stop strings", json.dumps({**OK, "stop": [f"s{i}" for i in range(100)]}).encode(), {}, 400, "stop"),
    ("a 1,000-character stop string", json.dumps({**OK, "stop": "x" * 1000}).encode(), {}, 400, "stop"),
    ("an unknown field", json.dumps({**OK, "foo": 1}).encode(), {}, 400, "foo"),
    ("a typo: max_token", json.dumps({"prompt": "hi", "max_token": 40}).encode(), {}, 400, "max_token"),
    ("an unknown field in a message",
     json.dumps({"messages": [{"role": "user", "content": "hi", "colour": "red"}]}).encode(), {}, 400, "messages"),
    ("NaN temperature", b'{"prompt": "hi", "temperature": NaN}', {}, 400, "temperature"),
    ("Infinity top_p", b'{"prompt": "hi", "top_p": Infinity}', {}, 400, "top_p"),
    ("alpha 1e39 (inf in float32)", json.dumps({**OK, "alpha": [1e39]}).encode(), {}, 400, "alpha"),
    ("a seed beyond 64 bits", json.dumps({**OK, "seed": 2 ** 64}).encode(), {}, 400, "seed"),
    ("n: true", json.dumps({**OK, "n": True}).encode(), {}, 400, "n"),
    ("max_tokens as a string", json.dumps({**OK, "max_tokens": "8"}).encode(), {}, 400, "max_tokens"),
    ("token ids out of the vocabulary", json.dumps({**OK, "prompt": [1, 2, 10 ** 9]}).encode(), {}, 400, "prompt"),
    ("echo beyond --max-echo-tokens", json.dumps({"prompt": "word " * 30, "echo": True, "logprobs": 1,
                                                   "max_tokens": 1}).encode(), {}, 400, "prompt"),
    ("a text/plain POST (no CORS preflight)", json.dumps(OK).encode(), {"Content-Type": "text/plain"}, 415, None),
    ("a form POST", b"prompt=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
    ("a foreign Host (DNS rebinding)", json.dumps(OK).encode(), {"Host": "evil.example"}, 403, None),
    ("a foreign web page's Origin", json.dumps(OK).encode(), {"Origin": "http://evil.example"}, 403, None),
    ("a sandboxed page's Origin: null", json.dumps(OK).encode(), {"Origin": "null"}, 403, None),
    ("a 17 MB body", json.dumps({"prompt": "x" * (17 * 1024 * 1024)}).encode(), {}, 413, None),
    # issue 32: what crashed, stalled or starved the server
    ("a schema chaining 1,000 $refs (SIGSEGV)", json.dumps({**OK, "response_format": {
        "type": "json_schema", "json_schema": {"name": "chain", "schema": ref_chain(1000)}}}).encode(), {}, 400,
     "response_format"),
    ("a schema chaining 120 $refs in 10 KB", json.dumps({**OK, "response_format": {
        "type": "json_schema", "json_schema": {"name": "chain", "schema": ref_chain(120)}}}).encode(), {}, 400,
     "response_format"),
    ("a grammar chaining 3,000 rules (SIGSEGV)", json.dumps({**OK, "response_format": {
        "type": "grammar", "grammar": rule_chain(3000)}}).encode(), {}, 400, "response_format"),
    ("a 100 KB string literal", json.dumps({**OK, "response_format": {
        "type": "grammar", "grammar": 'start: "' + "ab " * 34_000 + '"'}}).encode(), {}, 400, "response_format"),
    ("a 1 MB literal (too many expressions)", json.dumps({**OK, "response_format": {
        "type": "regex", "regex": "a" * 1_000_000}}).encode(), {}, 400, "response_format"),
    ("a 500-property schema (the parser's limit mid-way)", json.dumps({**OK, "max_tokens": 24, "response_format": {
        "type": "json_schema", "json_schema": {"name": "wide", "schema": {"type": "object", "properties": {
            f"p{i}": {"type": "integer"} for i in range(500)}}}}}).encode(), {}, 400, "response_format"),
    ("a 2 KB format at n = 16 (rows x format bytes)", json.dumps({**OK, "n": 16, "response_format": {
        "type": "regex", "regex": "a" * 2000}}).encode(), {}, 400, "response_format"),
    ("an unsatisfiable format", json.dumps({**OK, "response_format": {
        "type": "regex", "regex": "[^\\x00-\\U0010FFFF]"}}).encode(), {}, 400, "response_format"),
    ("alpha_schedule with 1M keys (refused before parsing)", json.dumps(
        {**OK, "alpha_schedule": {str(i): 1 for i in range(1_000_000)}}).encode(), {}, 400, None),
    ("alpha_schedule with 65 keys", json.dumps({**OK, "alpha_schedule": {str(i): 1 for i in range(65)}}).encode(), {},
     400, "alpha_schedule"),
    ("2M token ids, far past the context", json.dumps({**OK, "prompt": [5] * 2_000_000}).encode(), {}, 400, "prompt"),
    ("n=32 x 200 tokens with details 20", json.dumps({**OK, "n": 32, "max_tokens": 200, "details": 20}).encode(),
     {}, 400, "details"),
    ("n=32 x 200 tokens with top 20 logprobs", json.dumps({**OK, "n": 32, "max_tokens": 200, "logprobs": 20}).encode(),
     {}, 400, "top_logprobs"),
    ("a 2 M-character prompt", json.dumps({**OK, "prompt": "fox " * 500_000}).encode(), {}, 400, "prompt"),
]


@pytest.mark.parametrize("what, raw, headers, status, param", BAD, ids=[b[0] for b in BAD])
def test_every_bad_input_is_a_4xx_naming_what_to_fix_and_the_server_goes_on(server, what, raw, headers, status,
                                                                               param):
    path = "/v1/chat/completions" if raw.startswith(b'{"messages"') else "/v1/completions"
    response = post(server, path, raw=raw, headers=headers)
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert post(server, body=OK).status_code == 200


def test_a_requests_work_is_bounded_whatever_the_context():
    """rows x max_tokens and what the response carries, against a model with no known context."""
    from proxytune.server.api_errors import APIError
    from proxytune.server.limits import MAX_ROW_TOKENS
    from proxytune.server.schemas import parse

    def check(**body):
        return parse({"prompt": "hi", **body}, "completion", ["tiny"], 1, 64, None, 16)

    assert check(n=16, max_tokens=MAX_ROW_TOKENS // 16).n == 16
    for body, field in [(dict(n=32, max_tokens=1000), "max_tokens"),
                        (dict(n=4, max_tokens=1000, details=20), "details"),
                        (dict(prompt=[[1]] * 65, max_tokens=1), "prompt")]:
        with pytest.raises(APIError) as refused:
            check(**body)
        assert refused.value.status == 400 and refused.value.param == field, refused.value


def test_unknown_fields_are_refused_as_openai_refuses_them(server):
    error = post(server, body={**OK, "foo": 1}).json()["error"]
    assert error["message"].startswith("Unrecognized request argument supplied: foo")


def test_a_page_served_from_this_server_and_loopback_names_pass_the_guard(server):
    for host in ("localhost", f"127.0.0.1:{server.port}"):
        headers = {"Host": host, "Origin": f"http://{host}"}
        assert post(server, body=OK, headers=headers).status_code == 200


def test_a_10_mb_prompt_is_refused_before_tokenizing_and_the_server_answers_meanwhile(server):
    answered: list[float] = []

    def health_while_waiting():
        start = time.monotonic()
        httpx.get(server.url + "/health", timeout=30)
        answered.append(time.monotonic() - start)

    watcher = threading.Thread(target=health_while_waiting)
    response_holder = {}
    sender = threading.Thread(target=lambda: response_holder.setdefault(
        "response", post(server, body={"prompt": "fox " * 2_500_000, "max_tokens": 2})))
    sender.start()
    time.sleep(0.3)
    watcher.start()
    sender.join(60)
    watcher.join(60)
    response = response_holder["response"]
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert answered and answered[0] < 10, answered  # was 28 s: tokenizing ran on the event loop, three times


def test_an_alpha_that_breaks_the_logits_fails_its_request_alone(server):
    """3e38 passes as a float32 number but α·(z_expert − z_anti) overflows: that request gets the reason, the
    concurrent streams their usual text."""
    body = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
    reference = events(stream_lines(server, body))

    async def scenario():
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as http:
            async def healthy():
                async with http.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as r:
                    return [json.loads(line[6:]) for line in [x async for x in r.aiter_lines()] if
                            line.startswith("data: {")]
            bad = http.post(server.url + "/v1/completions", json={**body, "alpha": 3e38, "temperature": 1})
            return await asyncio.gather(healthy(), bad, healthy())

    first, bad, second = asyncio.run(scenario())
    text = lambda chunks: "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))  # noqa: E731
    assert text(first) == text(second) == text(reference)
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "generation_failed"
    assert "lower alpha" in bad.json()["error"]["message"]


def test_a_non_streaming_client_that_gives_up_frees_its_rows_at_once(remote_server):
    before = httpx.get(remote_server.url + "/health").json()["cancelled_rows"]
    with pytest.raises(httpx.ReadTimeout):
        post(remote_server, body={"prompt": "The quick", "max_tokens": 200, "temperature": 0}, timeout=0.6)
    for _ in range(100):
        state = httpx.get(remote_server.url + "/health").json()
        if state["running_rows"] == 0:
            break
        time.sleep(0.05)
    assert state["running_rows"] == 0 and state["cancelled_rows"] == before + 1  # not decoded to 200 tokens


def test_a_remote_base_that_goes_down_is_reported_and_health_recovers(remote_server, fake):
    body = {"prompt": "The quick", "max_tokens": 30, "temperature": 0}
    fake.fault = Fault(start=fake.completions + 5, count=10 ** 6, status=0)  # connections dropped from call 6
    try:
        lines = stream_lines(remote_server, body)
        last = events(lines)[-1]
        assert "error" in last and "failed after 2 tries" in last["error"]["message"], lines[-3:]
        assert sum(bool(c.get("choices") and c["choices"][0]["text"]) for c in events(lines)) >= 1  # text so far
        response = post(remote_server, body=body)  # while it is down: never 200 with empty text
        assert response.status_code == 500 and "base model at" in response.json()["error"]["message"]
        health = httpx.get(remote_server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "base model at" in health.json()["reason"]
    finally:
        fake.fault = None
    for _ in range(100):  # /health's own probe brings it back, without any traffic
        health = httpx.get(remote_server.url + "/health")
        if health.status_code == 200:
            break
        time.sleep(0.2)
    assert health.json()["status"] == "ok"
    assert post(remote_server, body=body).status_code == 200


def test_sigterm_drains_running_streams_with_an_error_event(remote_dirs):
    process = ServerProcess(remote_dirs, "--shutdown-grace", "1").wait_ready()
    lines: list[str] = []
    body = {"prompt": "The quick", "max_tokens": 250, "temperature": 0, "stream": True}

    def read():
        with httpx.stream("POST", process.url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    while len(lines) < 3:
        time.sleep(0.05)
    process.process.send_signal(signal.SIGTERM)
    reader.join(30)
    assert process.process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    last = json.loads(lines[-1][6:])
    assert last["error"]["code"] == "server_shutting_down", lines[-2:]
    assert 3 <= len(lines) < 250


def test_the_api_key_comes_from_a_variable_or_a_file_never_the_command_line(server, remote_server):
    for process in (server, remote_server):
        assert KEY not in " ".join(process.process.args)
        assert httpx.post(process.url + "/v1/completions", json=OK).status_code == 401
        assert post(process, body=OK).status_code == 200


# --- the fuzzer --------------------------------------------------------------------------------------

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
          "seed", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "alpha", "alpha_schedule", "proxy",
          "top_k", "min_p", "user", "logit_bias", "response_format", "suffix", "best_of", "presence_penalty"]


def junk(rng: random.Random, depth: int = 0):
    """A value of any JSON type, often extreme."""
    choice = rng.randrange(14)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2 ** 31, -(2 ** 63), 2 ** 64, 10 ** 30, 255, 256, 8191, 8192])
    if choice == 3:
        return rng.choice([0.0, -0.0, 1e-320, 1e39, -1e39, 3e38, 1e308, 0.5, 2.0000001, -2.5])
    if choice == 4:
        return rng.choice(["", " ", "hi", "\u0000", "\ufeff", "🙂" * 50, "x" * 5000, "\n" * 100, "<|endoftext|>"])
    if choice == 5 and depth < 3:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(5))]
    if choice == 6 and depth < 3:
        return {rng.choice(FIELDS + ["role", "content", "type", "text"]): junk(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    if choice == 7:
        return [rng.randrange(-5, 400) for _ in range(rng.randrange(1, 20))]
    if choice == 8:
        return [{"role": rng.choice(["user", "system", "assistant", "tool", "x"]), "content": junk(rng, 3)}]
    if choice == 9:
        return {"include_usage": junk(rng, 3)}
    if choice == 10:
        return [rng.random() * 4 - 2 for _ in range(rng.randrange(3))]
    if choice == 11:
        return rng.choice(["stop", ["a", "b"], ["\n"] * 20, [""]])
    return rng.choice([1, 4, 0.7, "tiny", "proxytune", False])


def fuzzed(rng: random.Random) -> tuple[str, bytes]:
    path = rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
    body = {"prompt": "The quick", "max_tokens": 3} if "chat" not in path else {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for _ in range(rng.randrange(1, 5)):
        field = rng.choice(FIELDS + ["tokens", "add_special_tokens", "zzz"])
        if rng.random() < 0.15:
            body.pop(field, None)
        else:
            body[field] = junk(rng)
    raw = json.dumps(body).encode()
    mutation = rng.randrange(10)
    if mutation == 0:
        raw = raw[: rng.randrange(len(raw))]  # truncated JSON
    elif mutation == 1:
        raw = raw.replace(b'"', b"'", 1)
    elif mutation == 2:
        raw = json.dumps(junk(rng)).encode()  # not an object
    return path, raw


def test_fuzzed_requests_get_4xx_or_200_and_a_concurrent_stream_is_unaffected(server):
    healthy = {"prompt": "Tuning language models", "max_tokens": 24, "temperature": 0}
    reference = events(stream_lines(server, healthy))
    rng = random.Random(13)
    requests = [fuzzed(rng) for _ in range(400)]
    statuses: dict[int, int] = {}
    latencies: list[float] = []

    async def scenario():
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as http:
            async def stream_once():
                start = time.monotonic()
                async with http.stream("POST", server.url + "/v1/completions", json={**healthy, "stream": True}) as r:
                    chunks = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: {")]
                latencies.append(time.monotonic() - start)
                return chunks

            async def fire(batch):
                answers = await asyncio.gather(*(http.post(server.url + path, content=raw) for path, raw in batch))
                for answer in answers:
                    statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            alone = await stream_once()
            during = []
            for start in range(0, len(requests), 50):
                results = await asyncio.gather(stream_once(), fire(requests[start:start + 50]))
                during.append(results[0])
            return alone, during

    alone, during = asyncio.run(scenario())
    text = lambda chunks: "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))  # noqa: E731
    assert all(text(chunks) == text(reference) for chunks in [alone] + during)
    print(f"\nfuzz: {len(requests)} requests, statuses {dict(sorted(statuses.items()))}; healthy 24-token stream "
          f"{latencies[0]:.2f} s alone, {sum(latencies[1:]) / len(latencies[1:]):.2f} s on average beside 50 fuzzed")
    assert not [status for status in statuses if status >= 500], statuses
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_logprobs_of_tokens_a_remote_base_never_offered_are_valid_json(fake, tok, trio):
    """A remote base gives its top-k only: other tokens have log p̃ = −inf, which JSON cannot carry (it was a 500,
    "Out of range float values are not JSON compliant"). They are sent as OpenAI's −9999."""
    from fastapi.testclient import TestClient

    from proxytune import ProxyTuner
    from proxytune.backends.remote.source import RemoteSource
    from proxytune.backends.remote.spec import parse_spec
    from proxytune.server import create_app

    base = RemoteSource(parse_spec(f"openai:{fake.url}?tokenizer=tiny&top_k=3"), tok)
    tuner = ProxyTuner(base, trio[1], trio[2], tokenizer=tok)
    with TestClient(create_app(tuner), base_url="http://localhost") as client:
        plain = client.post("/v1/completions", json={**OK, "logprobs": 5})
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 3, "logprobs": True, "top_logprobs": 5})
        streamed = client.post("/v1/completions", json={**OK, "logprobs": 5, "stream": True})
    assert plain.status_code == chat.status_code == streamed.status_code == 200
    tops = plain.json()["choices"][0]["logprobs"]["top_logprobs"]
    assert all(len(top) >= 1 for top in tops) and -9999.0 in [v for top in tops for v in top.values()]
    alternatives = chat.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [a["logprob"] for a in alternatives][-1] == -9999.0
    assert all(json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {"))
