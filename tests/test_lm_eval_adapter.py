"""The lm-evaluation-harness adapter: lm-eval's own evaluator, local JSON tasks, tiny models."""
import json
import textwrap

import pytest

pytest.importorskip("lm_eval")

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

from proxytune.integrations.lm_eval import ProxyTuneLM  # noqa: E402
from proxytune.facade.tuner import ProxyTuner  # noqa: E402

QUESTIONS = [
    {"question": "what is 3 + 4?", "choices": ["7", "8", "9"], "answer": 0, "target": "7",
     "text": "The quick brown fox jumps over the lazy dog."},
    {"question": "def add(a, b):", "choices": ["return a + b", "pass"], "answer": 0, "target": "return a + b",
     "text": "Tuning language models by proxy shifts the logits of a large model."},
]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "mc.yaml").write_text(common + textwrap.dedent("""\
        task: proxytune_tiny_mc
        output_type: multiple_choice
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{answer}}"
        target_delimiter: " "
        metric_list:
          - metric: acc
        """))
    (root / "gen.yaml").write_text(common + textwrap.dedent("""\
        task: proxytune_tiny_gen
        output_type: generate_until
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_target: "{{target}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 8
          do_sample: false
        metric_list:
          - metric: exact_match
        """))
    (root / "rolling.yaml").write_text(common + textwrap.dedent("""\
        task: proxytune_tiny_rolling
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
        """))
    return root


@pytest.fixture(scope="module")
def tuner():
    return ProxyTuner(*[tiny_model(seed) for seed in range(3)], tokenizer=tiny_tokenizer(), alpha=0.8)


def evaluate(tuner, tasks_dir, task, **options):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=ProxyTuneLM(tuner=tuner, batch_size=2), tasks=[task],
                                   task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                                   log_samples=True, **options)


def test_multiple_choice_picks_the_option_score_batch_likes_best(tuner, tasks_dir):
    out = evaluate(tuner, tasks_dir, "proxytune_tiny_mc")
    for sample in out["samples"]["proxytune_tiny_mc"]:
        doc = sample["doc"]
        context = f"Question: {doc['question']}\nAnswer:"
        scores = tuner.score_batch([(context, " " + choice) for choice in doc["choices"]])
        logged = [resp[0][0] for resp in sample["resps"]]
        assert logged == pytest.approx([s.total for s in scores], abs=1e-4)
    expected = sum(max(range(len(q["choices"])), key=lambda i: tuner.score(
        f"Question: {q['question']}\nAnswer:", " " + q["choices"][i]).total) == q["answer"] for q in QUESTIONS)
    assert out["results"]["proxytune_tiny_mc"]["acc,none"] == pytest.approx(expected / len(QUESTIONS))


def test_generate_until_is_proxy_tuned_greedy_decoding_cut_at_until(tuner, tasks_dir):
    out = evaluate(tuner, tasks_dir, "proxytune_tiny_gen")
    for sample in out["samples"]["proxytune_tiny_gen"]:
        context = f"Question: {sample['doc']['question']}\nAnswer:"
        expected = tuner.generate(context, max_new_tokens=8, stop=["\n"])[0].text
        assert sample["resps"][0][0] == expected and "\n" not in expected


def test_apply_chat_template_renders_with_the_base_template_and_decodes_the_proxy(tuner, tasks_dir):
    """lm-eval's --apply_chat_template (recommended for instruct models) once raised NotImplementedError."""
    out = evaluate(tuner, tasks_dir, "proxytune_tiny_gen", apply_chat_template=True)
    for sample in out["samples"]["proxytune_tiny_gen"]:
        question = f"Question: {sample['doc']['question']}\nAnswer:"
        context = tuner.tokenizers["base"].apply_chat_template([{"role": "user", "content": question}],
                                                               tokenize=False, add_generation_prompt=True)
        assert sample["arguments"][0][0] == context and "<|user|>" in context
        assert sample["resps"][0][0] == tuner.generate(context, max_new_tokens=8, stop=["\n"])[0].text


def test_rolling_loglikelihood_sums_every_token_once(tuner, tasks_dir, capsys):
    lm = ProxyTuneLM(tuner=tuner, max_length=8)  # short windows: the text is split into several

    class Request:
        def __init__(self, *args):
            self.args = args

    text = QUESTIONS[1]["text"]
    windowed = lm.loglikelihood_rolling([Request(text)])[0]
    assert "proxytune loglikelihood_rolling (a given tuner)" in capsys.readouterr().err  # a named progress bar
    whole = ProxyTuneLM(tuner=tuner).loglikelihood_rolling([Request(text)])[0]
    bos_scored = tuner.score("", text).total  # one window: conditioned on BOS only
    assert whole == pytest.approx(bos_scored, abs=1e-3)
    assert windowed < 0 and windowed != pytest.approx(whole, abs=1e-3)  # less context per token, another sum
    out = evaluate(tuner, tasks_dir, "proxytune_tiny_rolling")
    assert out["results"]["proxytune_tiny_rolling"]["word_perplexity,none"] > 1


def test_proxytune_lm_eval_command_passes_through_with_the_model_registered(tasks_dir, tmp_path, capsys):
    from proxytune.cli import main

    for seed, role in enumerate(("base", "expert", "anti")):
        tiny_model(seed).save_pretrained(tmp_path / role)
        tiny_tokenizer().save_pretrained(tmp_path / role)
    model_args = f"base={tmp_path / 'base'},expert={tmp_path / 'expert'},anti_expert={tmp_path / 'anti'},alpha=0.8"
    assert main(["lm-eval", "run", "--model", "proxytune", "--model_args", model_args, "--tasks", "proxytune_tiny_mc",
                 "--include_path", str(tasks_dir)]) == 0
    printed = capsys.readouterr().out
    assert "proxytune_tiny_mc" in printed and "acc" in printed
