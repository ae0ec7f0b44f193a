"""One Settings object per request, made at the edge and carried whole; α per request; the decoding mode as
one value (plain, speculative, auto) — through the library, the CLI, batch files, the scheduler and the server.

Every mode gives the same tokens (speculative == plain), so the tests compare each mode with plain decoding
of the same request alone.
"""
from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from proxytune import ProxyTuner, ProxyTuneError, Settings
from proxytune.cli import main
from proxytune.engine.decoding import Decoding
from proxytune.engine.speculative import SpeculativeDecoding
from proxytune.server import create_app
from proxytune.server.scheduler import Scheduler
from proxytune.server.schemas import PromptRows

PROMPTS = ["The quick brown", "def add(a, b):", "Answer the following question.", "Tuning language"]


@pytest.fixture(scope="module")
def tuner(trio, tok):
    return ProxyTuner(*trio, tokenizer=tok)


def tokens(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs]


# --- the settings object --------------------------------------------------------------------------------

def test_a_requests_settings_reach_the_engine_as_they_were_made(tuner):
    settings = Settings.of(max_new_tokens=7, temperature=0.7, top_k=5, stop=["\n"], seed=3, alpha=0.5,
                           return_details=2, repetition_penalty=1.2, mode="speculative")
    request = tuner.request(PROMPTS[0], settings=settings)
    assert request.settings == settings.but(alpha=(0.5,))  # only α per pair was settled, for this one-pair trio
    assert request.settings.sampling is settings.sampling and request.settings.shaping is settings.shaping


def test_keyword_options_and_a_settings_object_are_the_same_request(tuner):
    loose = tuner.request(PROMPTS[1], max_new_tokens=5, temperature=0.5, top_p=0.9, seed=1, alpha=2.0)
    made = tuner.request(PROMPTS[1], settings=Settings.of(max_new_tokens=5, temperature=0.5, top_p=0.9, seed=1,
                                                          alpha=2.0))
    assert loose == made
    with pytest.raises(ProxyTuneError, match="not both"):
        tuner.request(PROMPTS[1], settings=Settings(), temperature=0.5)


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1), "temperature"), (dict(alpha=float("nan")), "alpha must be a finite"),
    (dict(alpha_schedule={"3": 1.0}), "alpha_schedule key '3' is text"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop=[1]), "stop must be"), (dict(mode="fast"), "decoding must be one of"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(response_format={"type": "regex"}), "response_format"),
])
def test_settings_are_checked_when_made_before_any_model_is_involved(bad, message):
    with pytest.raises(ProxyTuneError, match=message):
        Settings.of(**bad)


def test_a_batch_rows_options_change_only_what_they_name():
    flags = Settings.of(max_new_tokens=9, temperature=0.8, top_p=0.9, response_format={"type": "json_object"})
    row = flags.with_options(top_k=4, logit_bias={"5": -100})
    assert row.sampling.top_p == 0.9 and row.sampling.top_k == 4 and row.max_new_tokens == 9
    assert row.shaping.grammar is flags.shaping.grammar and row.shaping.logit_bias == ((5, -100),)


def test_alpha_is_per_request_rows_of_different_alpha_in_one_batch_equal_each_alone(trio, tok, tuner):
    requests = [tuner.request(p, max_new_tokens=10, alpha=a) for p, a in zip(PROMPTS, (0.0, 0.5, 1.0, 3.0))]
    together = tuner.run(requests)
    for prompt, alpha, output in zip(PROMPTS, (0.0, 0.5, 1.0, 3.0), together):
        default = ProxyTuner(*trio, tokenizer=tok, alpha=alpha)  # the same α as the tuner's default
        assert output.token_ids == default.generate(prompt, max_new_tokens=10)[0].token_ids


def test_the_role_schema_holds_no_alpha(tuner):
    assert not any(hasattr(pair, "alpha") for pair in tuner.pairs)


# --- the decoding mode ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, kind", [("plain", Decoding), ("speculative", SpeculativeDecoding),
                                        ("auto", SpeculativeDecoding)])
def test_each_mode_decodes_as_it_says_and_gives_plains_tokens(tuner, mode, kind):
    plain = tokens(tuner.generate(PROMPTS, max_new_tokens=12))
    requests = [tuner.request(p, max_new_tokens=12, mode=mode) for p in PROMPTS]
    assert type(tuner.decoding(requests)) is kind
    assert tokens(tuner.run(requests)) == plain
    assert tokens(tuner.generate(PROMPTS, max_new_tokens=12, mode=mode)) == plain


def test_auto_decodes_rows_with_an_alpha_schedule_plainly_and_speculative_refuses_them(tuner):
    schedule = {0: 2.0, 4: 0.5}
    auto = [tuner.request(p, max_new_tokens=8, alpha_schedule=schedule, mode="auto") for p in PROMPTS[:2]]
    assert type(tuner.decoding(auto)) is Decoding
    assert tokens(tuner.run(auto)) == tokens(tuner.generate(PROMPTS[:2], max_new_tokens=8, alpha_schedule=schedule))
    with pytest.raises(ProxyTuneError, match="α schedule"):
        tuner.generate(PROMPTS[0], max_new_tokens=8, alpha_schedule=schedule, mode="speculative")


def test_rows_asking_for_different_modes_are_decoded_in_batches_of_their_own_in_order(tuner):
    requests = [tuner.request(p, max_new_tokens=10, mode=m) for p, m in zip(PROMPTS, ("plain", "speculative") * 2)]
    assert tokens(tuner.run(requests)) == tokens(tuner.generate(PROMPTS, max_new_tokens=10))
    with pytest.raises(ProxyTuneError, match="one batch is decoded one way"):
        tuner.decoding(requests)


# --- the scheduler and the server ---------------------------------------------------------------------

async def drain(job, timeout=60.0):
    while True:
        kind, payload = await asyncio.wait_for(job.queue.get(), timeout)
        if kind in ("done", "error"):
            return kind, payload


def test_the_scheduler_runs_a_batch_per_mode_and_every_row_equals_plain_alone(tuner):
    scheduler = Scheduler(tuner, max_batch=16)
    modes = ("plain", "speculative", "auto", "speculative", "plain", "auto")
    schedules = (None, None, {0: 1.5, 3: 0.5}, None, {0: 2.0}, None)

    async def go():
        jobs = []
        for i, (mode, schedule) in enumerate(zip(modes, schedules)):
            request = tuner.request(PROMPTS[i % 4], max_new_tokens=6 + i, mode=mode, alpha_schedule=schedule)
            jobs.append(scheduler.submit([PromptRows(request.prompts["base"], PROMPTS[i % 4], [request])]))
        return [await drain(job) for job in jobs]

    scheduler.start()
    try:
        results = asyncio.run(go())
    finally:
        scheduler.stop()
    for i, (kind, outputs) in enumerate(results):
        assert kind == "done"
        alone = tuner.generate(PROMPTS[i % 4], max_new_tokens=6 + i, alpha_schedule=schedules[i])[0]
        assert outputs[0].token_ids == alone.token_ids


@pytest.fixture(scope="module")
def speculative_server(tuner):
    with TestClient(create_app(tuner, decoding="speculative"), base_url="http://localhost") as client:
        yield client


def complete(client, **body):
    return client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0, **body})


@pytest.mark.parametrize("body", [{}, {"decoding": "plain"}, {"decoding": "auto"},
                                  {"alpha_schedule": {"0": 2.0, "3": 1.0}}])
def test_a_speculative_server_answers_as_plain_decoding_would(speculative_server, tuner, body):
    answer = complete(speculative_server, **body)
    assert answer.status_code == 200, answer.text
    schedule = {0: 2.0, 3: 1.0} if "alpha_schedule" in body else None
    assert answer.json()["choices"][0]["text"] == tuner.generate(PROMPTS[0], max_new_tokens=10,
                                                                 alpha_schedule=schedule)[0].text


@pytest.mark.parametrize("body, field", [({"decoding": "fast"}, "decoding"),
                                         ({"decoding": "speculative", "alpha_schedule": {"0": 2.0}}, "decoding")])
def test_a_bad_decoding_field_is_a_400_naming_it(speculative_server, body, field):
    answer = complete(speculative_server, **body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == field


# --- the CLI and batch files --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from tiny_server import save_tiny_trio

    return save_tiny_trio(tmp_path_factory.mktemp("settings"))


def models(dirs) -> list[str]:
    return ["--base", str(dirs["base"]), "--expert", str(dirs["expert"]), "--anti-expert", str(dirs["anti_expert"])]


def test_generate_gives_the_same_text_in_every_mode(dirs, capsys):
    texts = []
    for mode in ("plain", "speculative", "auto"):
        assert main(["generate", *models(dirs), "--max-new-tokens", "12", "--decoding", mode, "Tuning"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2]


def test_a_batch_file_row_may_name_its_decoding_mode(dirs, tmp_path, capsys):
    rows = [{"prompt": p, "decoding": m} for p, m in zip(PROMPTS, ("speculative", "plain", "auto", "speculative"))]
    source, plain, mixed = tmp_path / "in.jsonl", tmp_path / "plain.jsonl", tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "plain_in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    options = ["--max-new-tokens", "8"]
    assert main(["generate", *models(dirs), *options, "--input", str(source), "--output", str(mixed)]) == 0
    assert main(["generate", *models(dirs), *options, "--input", str(tmp_path / "plain_in.jsonl"),
                 "--output", str(plain)]) == 0
    by_id = lambda path: {r["id"]: r["text"] for r in map(json.loads, path.read_text().splitlines())}  # noqa: E731
    assert by_id(mixed) == by_id(plain)
    source.write_text(json.dumps({"prompt": "x", "decoding": "fast"}) + "\n")
    assert main(["generate", *models(dirs), "--input", str(source), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "line 1" in capsys.readouterr().err
