"""`proxytune serve` as users run it: a real process on a loopback port, driven by the official openai
client (sync and async) and by raw HTTP where the client hides what is checked. Tiny models."""
import asyncio
import json

import httpx
import openai
import pytest

from proxytune import ProxyTuner
from proxytune.cli import main
from tiny_server import ServerProcess, save_tiny_trio

KEY = "test-key"
PROMPTS = ["The quick brown fox", "Answer the following question.", "def add(a, b):", "Tuning language models",
           "The lazy dog", "x", "Question: what is 3 + 4?", "return a"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_tiny_trio(tmp_path_factory.mktemp("served"))



@pytest.fixture(scope="module")
def servers(dirs, tmp_path_factory):
    """The server most tests use, and a strict one (1 row, 1 waiting request, 0.3 s per request, over
    models big enough that 240 tokens surely take longer); both start at once to save a load's wait."""
    main = ServerProcess(dirs, "--api-key", KEY, "--max-batch", "32", "--served-model-name", "tiny")
    slow = save_tiny_trio(tmp_path_factory.mktemp("slow"), hidden=256, layers=6)
    strict = ServerProcess(slow, "--max-batch", "1", "--max-queue", "1", "--request-timeout", "0.3")
    yield main.wait_ready(), strict.wait_ready()
    main.stop()
    strict.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def tuner(dirs):
    return ProxyTuner.from_pretrained(dirs["base"], dirs["expert"], dirs["anti_expert"])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def async_client(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def greedy(tuner, prompt, n, **kwargs):
    return tuner.generate(prompt, max_new_tokens=n, **kwargs)[0]


def test_models_lists_the_served_name_and_health_answers(client, server):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completion_is_the_proxy_tuned_greedy_text(client, tuner):
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    expected = greedy(tuner, PROMPTS[0], 12)
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(tuner.encode(PROMPTS[0]))
    assert response.usage.completion_tokens == len(expected.token_ids)


def test_chat_reply_equals_proxy_tuner_chat_async(async_client, tuner):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    response = asyncio.run(async_client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                                temperature=0))
    assert response.object == "chat.completion" and response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == tuner.chat(messages, max_new_tokens=10).text


def test_streamed_chat_has_openais_chunks_and_usage(client, tuner):
    messages = [{"role": "user", "content": "The quick brown fox"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    reply = tuner.chat(messages, max_new_tokens=10)
    assert chunks[-2].choices[0].finish_reason == reply.finish_reason and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].usage.completion_tokens == len(reply.token_ids)  # as the non-streamed usage counts (no EOS)
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == reply.text


def test_the_raw_stream_is_server_sent_events_ending_with_done(server, tuner):
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy(tuner, PROMPTS[1], 8).text


@pytest.mark.parametrize("prompt", ["Answer:", "Question: what is 3 + 4?", "Answer the following question."])
def test_logprobs_are_those_of_proxy_tuner_score(client, tuner, prompt):
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    choice = response.choices[0]
    score = tuner.score(prompt, choice.text)
    assert score.token_ids == greedy(tuner, prompt, 4).token_ids  # (random models: few texts re-tokenize alike)
    assert choice.logprobs.token_logprobs == pytest.approx(score.logprobs, abs=1e-4)
    for logprob, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(logprob, abs=1e-6)  # greedy took the best


def test_streamed_chat_logprobs_come_with_each_token(client, tuner):
    messages = [{"role": "user", "content": "x"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, logprobs=True, top_logprobs=2))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2)
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in reply.choices[0].logprobs.content])
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in entries)


def test_echo_scores_the_prompt_like_score(client, tuner):
    prompt = PROMPTS[0]
    ids = tuner.encode(prompt)
    first = tuner.tokenizer.decode(ids[:1])
    score = tuner.score(first, prompt[len(first):])
    assert [ids[0]] + score.token_ids == ids
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                         temperature=0)
    logprobs = response.choices[0].logprobs
    assert response.choices[0].text == prompt and logprobs.token_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(score.logprobs, abs=1e-4)
    # lm-eval's local-completions sends token ids, max_tokens=1 and reads everything but the last position
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert by_ids.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(score.logprobs, abs=1e-4)


def test_the_tokenizer_routes_are_the_base_tokenizer(server, tuner):
    tokens = post(server, "/tokenize", {"prompt": PROMPTS[1], "add_special_tokens": False}).json()
    assert tokens["tokens"] == tuner.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"] == PROMPTS[1]
    info = httpx.get(server.url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == tuner.tokenizer.eos_token and info["model_max_length"] == 256


def test_lm_evals_local_completions_scores_like_score(server, tuner, monkeypatch):
    for module in ("lm_eval", "tenacity", "aiohttp"):  # lm-eval[api]
        pytest.importorskip(module)
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="tiny", auth_token=KEY, max_retries=1)
    pairs = [("Question: what is 3 + 4?", " Answer: 7"), ("The quick brown", " fox jumps over the lazy dog.")]
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                               disable_tqdm=True)
    for (context, continuation), (logprob, is_greedy) in zip(pairs, results):
        score = tuner.score(context, continuation)
        assert logprob == pytest.approx(score.total, abs=1e-3) and is_greedy == score.is_greedy


def test_lm_evals_concurrent_client_gets_every_answer(server, tuner, monkeypatch):
    """num_concurrent=4, echo + max_tokens 1, 32 requests: a request that joined while the others finished at
    their first token used to hang forever, and the next request then failed every running one."""
    for module in ("lm_eval", "tenacity", "aiohttp"):
        pytest.importorskip(module)
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="tiny", auth_token=KEY, max_retries=1,
                             num_concurrent=4, batch_size=1, timeout=60)
    pairs = [(PROMPTS[i % len(PROMPTS)], " " + PROMPTS[(i * 3 + 1) % len(PROMPTS)]) for i in range(32)]
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                               disable_tqdm=True)
    for (context, continuation), (logprob, _) in zip(pairs, results):
        assert logprob == pytest.approx(tuner.score(context, continuation).total, abs=1e-3)
    health = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["running_rows"] == 0


def test_alpha_changes_the_output_and_proxy_false_is_the_base_alone(client, tuner, dirs):
    def complete(**extra):
        return client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=12, temperature=0,
                                         extra_body=extra).choices[0].text

    base_alone = ProxyTuner.from_pretrained(dirs["base"], dirs["expert"], dirs["expert"])  # z_e - z_e = 0
    assert complete(proxy=False) == greedy(base_alone, PROMPTS[3], 12).text
    assert complete(alpha=2.5) == greedy(tuner, PROMPTS[3], 12, alpha=2.5).text
    assert len({complete(), complete(alpha=2.5), complete(proxy=False)}) == 3


def test_an_alpha_schedule_is_the_librarys_with_positions_written_as_json_keys(client, tuner):
    """JSON keys are text: "4" is output position 4, any other key a text marker, as in tuner.request."""
    def complete(schedule):
        return client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=12, temperature=0,
                                         extra_body={"alpha_schedule": schedule}).choices[0].text

    plain = greedy(tuner, PROMPTS[3], 12, alpha=0.0).text
    marker = plain[1:3]
    for sent, meant in (({"0": 0.0, "4": 2.5}, {0: 0.0, 4: 2.5}), ({"0": 0, marker: 2.5}, {0: 0.0, marker: 2.5})):
        expected = tuner.generate(PROMPTS[3], max_new_tokens=12, alpha_schedule=meant)[0].text
        assert complete(sent) == expected
    assert complete({"0": 0.0, "4": 2.5}) != plain != complete({"0": 2.5})


def test_n_choices_and_seeded_sampling(client, tuner):
    options = dict(model="tiny", prompt=PROMPTS[4], max_tokens=10, temperature=1.0, n=3)
    first = client.completions.create(seed=7, **options)
    again = client.completions.create(seed=7, **options)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    assert first.choices[1].text == tuner.generate(PROMPTS[4], max_new_tokens=10, temperature=1.0, seed=8)[0].text


def test_stop_strings_end_the_text(client, tuner):
    full = greedy(tuner, PROMPTS[0], 16).text
    stop = full[5:7]
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert response.choices[0].text == full[:full.index(stop)] and response.choices[0].finish_reason == "stop"


def test_32_concurrent_streams_all_finish_with_the_serial_greedy_outputs(async_client, tuner):
    cases = [(PROMPTS[i % len(PROMPTS)], 6 + (5 * i) % 23) for i in range(32)]

    async def one(prompt, max_tokens):
        stream = await async_client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                       temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def everyone():
        return await asyncio.gather(*(one(p, n) for p, n in cases), return_exceptions=True)

    results = asyncio.run(everyone())
    assert [r for r in results if isinstance(r, Exception)] == []
    assert results == [greedy(tuner, p, n).text for p, n in cases]


def test_a_client_that_drops_mid_stream_frees_its_slot_and_stalls_no_one(server, async_client, tuner):
    async def drop_after_two_chunks():
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0, "stream": True}
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
            async with http.stream("POST", server.url + "/v1/completions", json=body) as response:
                lines = response.aiter_lines()
                await anext(lines)
                await anext(lines)  # then leave without reading on

    cancelled_before = httpx.get(server.url + "/health").json().get("cancelled_rows", 0)

    async def scenario():
        dropper = asyncio.create_task(drop_after_two_chunks())
        others = [async_client.completions.create(model="tiny", prompt=p, max_tokens=20, temperature=0)
                  for p in PROMPTS[:4]]
        results = await asyncio.wait_for(asyncio.gather(*others), timeout=60)
        await dropper
        for _ in range(100):  # the dropped row leaves at the engine's next step
            if httpx.get(server.url + "/health").json()["running_rows"] == 0:
                return results
            await asyncio.sleep(0.05)
        raise AssertionError("the dropped stream still holds its row")

    results = asyncio.run(scenario())
    assert [r.choices[0].text for r in results] == [greedy(tuner, p, 20).text for p in PROMPTS[:4]]
    assert httpx.get(server.url + "/health").json()["cancelled_rows"] == cancelled_before + 1  # not run to the end


def post(server, path, body, key=KEY, raw=None, headers=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
               **(headers or {})}
    return httpx.post(server.url + path, json=None if raw is not None else body, content=raw, headers=headers,
                      timeout=30)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
DONE = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {**DONE, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {**DONE, "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ("/v1/completions", {**DONE, "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/completions", {**DONE, "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {**DONE, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**DONE, "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {**DONE, "n": 0}, 400, "n"),
    ("/v1/completions", {**DONE, "model": "gpt-4"}, 400, "model"),
    ("/v1/completions", {**DONE, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**DONE, "prompt": "fox " * 300}, 400, "prompt"),
    ("/v1/completions", {**DONE, "prompt": "fox " * 10, "max_tokens": 250}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 255}, 400, "max_completion_tokens"),
    ("/v1/completions", {**DONE, "alpha": "strong"}, 400, "alpha"),
    ("/v1/completions", {**DONE, "alpha": 1e39}, 400, "alpha"),  # finite in JSON, inf in float32
    ("/v1/completions", {**DONE, "alpha_schedule": {}}, 400, "alpha_schedule"),
    ("/v1/completions", {**DONE, "alpha_schedule": {"-3": 1.0}}, 400, "alpha_schedule"),
    ("/v1/completions", {**DONE, "alpha_schedule": {"0": 1e39}}, 400, "alpha_schedule"),
    ("/v1/completions", {**DONE, "alpha_schedule": {"0": [1.0, 2.0]}}, 400, "alpha_schedule"),  # one pair
    ("/v1/completions", {**DONE, "alpha_schedule": {"0": "high"}}, 400, "alpha_schedule"),
    ("/v1/completions", {**DONE, "alpha_schedule": {"0": 1.0}, "proxy": False}, 400, "alpha_schedule"),
    ("/v1/completions", {**DONE, "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {**DONE, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {**DONE, "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {**DONE, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/completions", {**DONE, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {**DONE, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/embeddings", {"input": "hi"}, 404, None),
])
def test_bad_requests_get_their_status_in_openais_schema_and_the_server_goes_on(server, path, body, status, param):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert post(server, "/v1/completions", DONE).status_code == 200


def test_malformed_json_a_missing_key_and_a_wrong_key(server):
    assert post(server, "/v1/completions", None, raw=b'{"prompt": "hi",').status_code == 400
    for key in (None, "wrong"):
        response = post(server, "/v1/completions", DONE, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert post(server, "/v1/completions", DONE).status_code == 200


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="hi", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="tiny", input="hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0).models.list()


def test_a_full_queue_answers_503_with_retry_after_and_slow_requests_time_out(servers):
    strict = servers[1]
    body = {"prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0}

    async def burst():
        async with httpx.AsyncClient(timeout=30) as http:
            return await asyncio.gather(*(http.post(strict.url + "/v1/completions", json=body) for _ in range(6)))

    responses = asyncio.run(burst())
    assert {r.status_code for r in responses} == {503, 504}
    full = next(r for r in responses if r.status_code == 503)
    assert full.headers["retry-after"] == "1" and full.json()["error"]["code"] == "queue_full"
    assert next(r for r in responses if r.status_code == 504).json()["error"]["code"] == "timeout"
    assert httpx.post(strict.url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=30).status_code == 200


def test_a_stream_that_times_out_ends_with_an_error_event(servers):
    body = {"prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0, "stream": True}
    with httpx.stream("POST", servers[1].url + "/v1/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert json.loads(lines[-1][6:])["error"]["code"] == "timeout", lines[-3:]


@pytest.mark.parametrize("options, message", [
    (["--base", "BASE"], "missing --expert, --anti-expert"),
    (["--model", "demo", "--port", "PORT"], "cannot listen on 127.0.0.1"),  # the port is taken by the server
    (["--model", "demo", "--max-batch", "0"], "--max-batch must be >= 1"),
    (["--model", "demo", "--api-key-env", "PROXYTUNE_NO_SUCH_VARIABLE"], "that environment variable is not set"),
    (["--model", "demo", "--api-key-file", "/nonexistent/key"], "--api-key-file: cannot read /nonexistent/key"),
])
def test_bad_serve_options_are_one_line_and_exit_code_2(dirs, server, options, message, capsys):
    options = [o.replace("BASE", dirs["base"]).replace("PORT", str(server.port)) for o in options]
    assert main(["serve", *options]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


SCHEMA = {"type": "object", "properties": {"animal": {"enum": ["fox", "dog"]}, "n": {"type": "integer"}},
          "required": ["animal", "n"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}


def test_response_format_and_penalties_are_those_of_the_library(client, tuner):
    """The server's structured output and penalties are ProxyTuner's: same text, valid JSON, n choices apart."""
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA}}
    messages = [{"role": "user", "content": "def add(a, b):"}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                              response_format=fmt, frequency_penalty=0.5, logit_bias={"7": 3})
    expected = tuner.chat(messages, max_new_tokens=40, response_format=fmt, frequency_penalty=0.5,
                          logit_bias={7: 3})
    assert response.choices[0].message.content == expected.text
    assert json.loads(expected.text)["animal"] in ("fox", "dog")
    sampled = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, n=4, seed=2,
                                        temperature=1.0, extra_body={"repetition_penalty": 1.2, "response_format": fmt})
    for choice in sampled.choices:
        assert choice.finish_reason == "stop" and set(json.loads(choice.text)) == {"animal", "n"}


def test_alone_and_details_give_each_models_own_text_and_every_roles_numbers(client, tuner):
    """The playground's extension fields: `alone` decodes one model by itself (beside proxy rows), `details`
    adds each role's top tokens and the probability each gave the chosen one, streamed and not."""
    prompt = PROMPTS[1]
    for role in ("base", "expert"):
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                        extra_body={"alone": role})
        assert got.choices[0].text == tuner.generate(prompt, max_new_tokens=10, alone=role)[0].text
    expected = tuner.generate(prompt, max_new_tokens=10, return_details=3)[0]
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body={"details": 3}).model_dump()["choices"][0]["proxytune"]
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                       extra_body={"details": 3})
    streamed = [d for chunk in stream for d in (chunk.model_dump()["choices"][0].get("proxytune") or [])]
    for details in (whole, streamed):
        assert [d["token_id"] for d in details][:len(expected.token_ids)] == expected.token_ids
        for got, want in zip(details, expected.details):
            assert set(got["top"]) == {"base", "expert", "anti_expert", "proxy"} and len(got["top"]["proxy"]) == 3
            for role, p in want.chosen_prob.items():
                assert got["chosen"][role] == pytest.approx(p, abs=1e-5)
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0).model_dump()
    assert "proxytune" not in plain["choices"][0]  # plain OpenAI clients see nothing new


@pytest.mark.parametrize("body, param", [({**DONE, "alone": "teacher"}, "alone"),
                                          ({**DONE, "alone": "base", "alpha": 2}, "alone"),
                                          ({**DONE, "details": 50}, "details")])
def test_bad_extension_fields_are_400s(server, body, param):
    response = post(server, "/v1/completions", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_the_playground_page_is_served_without_the_key_and_loads_nothing_from_elsewhere(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "proxytune playground" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # no outside URL in the page
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{server.url}/ui/{name}").status_code == 200
    assert httpx.get(server.url + "/ui/secret.py").status_code == 404
    assert httpx.get(server.url + "/v1/models").status_code == 401  # the API still needs the key


def test_no_ui_serves_no_page(tuner):
    from fastapi.testclient import TestClient

    from proxytune.server import create_app

    for ui, status in ((True, 200), (False, 404)):
        with TestClient(create_app(tuner, ui=ui), base_url="http://localhost") as client:
            assert client.get("/").status_code == status and client.get("/ui/app.js").status_code == status
            assert client.get("/health").status_code == 200
