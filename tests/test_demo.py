"""`proxytune demo`: one held-out GSM question, three answers side by side (on a tiny trio here)."""
import json

import pytest

from proxytune.models import registry
from proxytune.cli import main

pytest.importorskip("reasoning_gym")


@pytest.fixture(scope="module")
def tiny_trio(tmp_path_factory):
    from tiny import tiny_model, tiny_tokenizer

    from proxytune.training.tuning import TuneConfig, tune

    root = tmp_path_factory.mktemp("demo")
    for name, seed in (("base", 0), ("small", 1)):
        tiny_model(seed).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    rows = [{"prompt": f"Question: {a} + {a}?\nAnswer:", "completion": f" #### {2 * a}"} for a in range(12)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tune(TuneConfig(model=str(root / "small"), data=str(root / "train.jsonl"), output=str(root / "expert"),
                    epochs=2, lora_r=4, save_every=0, progress=False, dtype="float32"))
    return {"base": str(root / "base"), "expert": str(root / "expert"), "anti_expert": str(root / "small")}


def test_demo_prints_question_answer_and_three_labelled_generations(tiny_trio, monkeypatch, capsys):
    from proxytune.datasets import gsm

    monkeypatch.setitem(registry.TRIOS, "tiny-demo", tiny_trio)
    assert main(["demo", "--model", "tiny-demo", "--max-new-tokens", "6", "--dtype", "float32", "--index", "1"]) == 0
    out = capsys.readouterr().out
    example = gsm.heldout_examples(2, seed=0)[1]
    assert f"Question: {example.question}" in out and f"Correct answer: {example.answer}" in out
    headers = [line for line in out.splitlines() if line.startswith("=== ")]
    assert [h.split(" ===")[0] for h in headers] == ["=== base alone (1.5B)", "=== expert alone (0.5B + GSM LoRA)",
                                                     "=== proxy-tuned (alpha=1)"]
    assert all("tok/s" in h and ("correct" in h or "wrong" in h) for h in headers)


def test_demo_rejects_unknown_trios_and_empty_questions(capsys):
    assert main(["demo", "--model", "nope"]) == 2
    assert "unknown trio 'nope'" in capsys.readouterr().err
    assert main(["demo", "--question", "  "]) == 2
