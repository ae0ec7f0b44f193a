"""Token-level analysis: what the measures count, that α = 0 changes nothing, and the files it writes."""
import json
import shutil

import pytest
from tiny import save_lora, tiny_model, tiny_tokenizer

from proxytune.evaluation.analysis import run_analysis
from proxytune.evaluation.analysis.measures import analyze, equation_sides
from proxytune.evaluation.analysis.page import render
from proxytune.evaluation.analysis.traces import pieces
from proxytune.cli import main
from proxytune.facade.tuner import ProxyTuner

PROMPTS = ["Answer the following question. Question: what is 3 + 4? Answer:", "def add(a, b):"]


@pytest.fixture(scope="module")
def tuner():
    return ProxyTuner(*[tiny_model(seed) for seed in range(3)], tokenizer=tiny_tokenizer())


def token(piece, start, proxy, base, proxy_top=1, base_top=1):
    return {"piece": piece, "start": start, "end": start + len(piece), "chosen": {"proxy": proxy, "base": base},
            "top_id": {"proxy": proxy_top, "base": base_top}, "top": {}}


def test_equation_sides_split_reasoning_from_result():
    text = "so 35 × 3 = 105 kiwi\nTotal: 105 + 35 = $140\nper day (160-48)*5=560 emails, x = 5"
    found = [(text[a:b], text[c:d]) for (a, b), (c, d) in equation_sides(text)]
    assert found == [("35 × 3", "105"), ("105 + 35", "$140"), ("(160-48)*5", "560")]


def test_measures_count_changed_positions_and_shifts_by_side():
    # "12 + 3 = 15": the proxy raised "12"(lhs) by 0.4 and "15"(rhs) by 0.1, and changed the first decision only.
    tokens = [token("12", 0, 0.9, 0.5, proxy_top=7, base_top=8), token(" +", 2, 0.5, 0.5), token(" 3", 4, 0.6, 0.6),
              token(" =", 6, 0.9, 0.9), token(" 15", 8, 0.8, 0.7)]
    result = analyze([{"tokens": tokens}], math=True)
    assert result["top_token_change"]["overall"] == pytest.approx(1 / 5)
    assert result["top_token_change"]["by_position"]["0-9"] == {"changed": 1, "positions": 5, "share": 0.2}
    assert result["probability_shift"]["mean"] == pytest.approx((0.4 + 0.1) / 5)
    eq = result["equation_shift"]
    assert eq["equations"] == 1
    assert eq["lhs"] == {"mean_shift": pytest.approx(0.4 / 3), "tokens": 3}  # "12", " +", " 3"
    assert eq["rhs"] == {"mean_shift": pytest.approx(0.1), "tokens": 1}


def test_pieces_rebuild_the_decoded_text(tuner):
    output = tuner.generate(PROMPTS[0], max_new_tokens=20)[0]
    spans = pieces(tuner.tokenizer, output.token_ids)
    assert "".join(p for p, _, _ in spans) == tuner.tokenizer.decode(output.token_ids, skip_special_tokens=True)
    assert all(text == "".join(p for p, _, _ in spans)[start:end] for text, start, end in spans)


def test_alpha_zero_changes_no_decision_and_moves_no_probability(tuner, tmp_path):
    result = run_analysis(tuner, PROMPTS, tmp_path, max_new_tokens=12, alpha=0.0)
    assert result["top_token_change"]["overall"] == 0.0
    assert result["probability_shift"]["mean"] == pytest.approx(0.0, abs=1e-6)


def test_the_page_is_self_contained_and_shows_every_role_on_hover(tuner, tmp_path):
    result = run_analysis(tuner, PROMPTS, tmp_path, max_new_tokens=12, math=True)
    traces = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    page = (tmp_path / "tokens.html").read_text()
    assert "<script" not in page and "src=" not in page and "http" not in page
    assert page.count("class='tok") == sum(len(t["tokens"]) for t in traces)
    for role in ("proxy", "base", "expert", "anti"):
        assert f"{role}:" in page
    for name in ("top_token_change", "probability_shift", "equation_shift"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert json.loads((tmp_path / "analysis.json").read_text())["generations"] == 2 == result["generations"]
    assert "&lt;b&gt;" in render([{"label": "x", "prompt": "<b>", "tokens": []}], [])  # text is escaped


def test_analyze_command_on_a_task_and_on_a_prompts_file(tmp_path, capsys):
    root = tmp_path / "models"
    for seed, role in enumerate(("base", "expert", "anti")):
        tiny_model(seed).save_pretrained(root / role)
        tiny_tokenizer().save_pretrained(root / role)
    models = ["--base", str(root / "base"), "--expert", str(root / "expert"), "--anti-expert", str(root / "anti")]
    assert main(["analyze", "gsm", *models, "--limit", "1", "--max-new-tokens", "8", "--output",
                 str(tmp_path / "gsm")]) == 0
    assert "Equations" in capsys.readouterr().out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert main(["analyze", str(prompts), *models, "--max-new-tokens", "8", "--output", str(tmp_path / "p")]) == 0
    assert "2 generations" in capsys.readouterr().out
    assert main(["analyze", "nonsense", *models, "--output", str(tmp_path / "x")]) == 2
    assert "neither a task (gsm, humaneval) nor a prompts file" in capsys.readouterr().err


def test_rescoring_a_greedy_output_gives_the_trace_decoding_recorded(tuner):
    from proxytune.evaluation.analysis.traces import collect, rescored_trace

    decoded = collect(tuner, PROMPTS[:1], max_new_tokens=10, alpha=0.7)[0]
    rescored = rescored_trace(tuner, PROMPTS[0], [t["id"] for t in decoded["tokens"]], alpha=0.7)
    assert [t["piece"] for t in rescored["tokens"]] == [t["piece"] for t in decoded["tokens"]]
    for a, b in zip(decoded["tokens"], rescored["tokens"]):
        assert a["top_id"] == b["top_id"]
        assert a["chosen"] == pytest.approx(b["chosen"], abs=1e-4)


def test_analyze_an_eval_directory_rescoring_its_proxy_answers(tmp_path, capsys):
    root = tmp_path / "models"
    for seed, role in enumerate(("base", "expert", "anti")):
        tiny_model(seed).save_pretrained(root / role)
        tiny_tokenizer().save_pretrained(root / role)
    models = ["--base", str(root / "base"), "--expert", str(root / "expert"), "--anti-expert", str(root / "anti")]
    assert main(["eval", "gsm", *models, "--limit", "2", "--max-new-tokens", "6", "--output", str(tmp_path / "ev"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "ev"), "--output", str(tmp_path / "an")]) == 0
    assert "2 generations, " in capsys.readouterr().out
    traces = [json.loads(line) for line in (tmp_path / "an" / "traces.jsonl").read_text().splitlines()]
    results = [json.loads(line) for line in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    proxy = [r for r in results if r["role"] == "proxy"]
    assert [t["label"] for t in traces] == [r["id"] for r in proxy]
    # greedy: at every position the proxy's top token is the token it chose
    assert all(tok["top_id"]["proxy"] == tok["id"] for trace in traces for tok in trace["tokens"])


def test_analyze_refuses_an_eval_whose_expert_adapter_has_other_weights_now(tmp_path, capsys):
    """Rescoring old answers with a new expert shipped under the same name would analyse a decoding that never
    happened: the digest recorded by eval tells."""
    root = tmp_path / "models"
    for seed, role in enumerate(("base", "anti")):
        tiny_model(seed).save_pretrained(root / role)
        tiny_tokenizer().save_pretrained(root / role)

    save_lora(root / "anti", root / "expert", seed=1)
    models = ["--base", str(root / "base"), "--expert", str(root / "expert"), "--anti-expert", str(root / "anti")]
    assert main(["eval", "gsm", *models, "--limit", "1", "--max-new-tokens", "4", "--output", str(tmp_path / "ev"),
                 "--no-progress"]) == 0
    assert main(["analyze", str(tmp_path / "ev"), "--output", str(tmp_path / "an")]) == 0
    save_lora(root / "anti", root / "expert", seed=2)
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "ev"), "--output", str(tmp_path / "an2")]) == 2
    assert "holds other weights now" in capsys.readouterr().err
    shutil.rmtree(root / "expert")
    assert main(["analyze", str(tmp_path / "ev"), "--output", str(tmp_path / "an3")]) == 2
    assert "is not on this machine" in capsys.readouterr().err
