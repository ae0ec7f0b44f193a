"""`proxytune tune`: completion-only loss, a lower held-out loss, an adapter that loads as an expert."""
import json

import pytest

from proxytune.errors import ProxyTuneError
from proxytune.training.data import IGNORE, read_jsonl, tokenize
from proxytune.training.tuning import TuneConfig, tune

ROWS = [{"prompt": f"Question: what is {a} + {b}? Answer:", "completion": f" {a + b} #### {a + b}"}
        for a in range(1, 7) for b in range(1, 5)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tiny_model(3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config(tiny_dir, tmp_path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    options = dict(model=str(tiny_dir), data=str(write_jsonl(tmp_path / "train.jsonl", ROWS)),
                   output=str(tmp_path / "expert"), heldout_fraction=0.2, epochs=6, batch_size=4,
                   learning_rate=5e-3, lora_r=8, save_every=0, progress=False, dtype="float32")
    return TuneConfig(**(options | overrides))


def test_loss_covers_completion_tokens_and_eos_only(tok):
    [example] = tokenize([{"prompt": "Question: what is 3 + 4? Answer:", "completion": " 7"}], tok, 64)
    prompt_len = len(tok("Question: what is 3 + 4? Answer:")["input_ids"])
    assert example.labels[:prompt_len] == [IGNORE] * prompt_len
    assert example.labels[prompt_len:] == tok(" 7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("full", [False, True])
def test_the_chunked_loss_is_transformers_loss_and_gradient_without_the_full_logits(tiny_dir, tmp_path, tok, full):
    """completion_loss runs the output layer only on positions that predict a completion token, a few at a
    time, recomputed in the backward pass: the same mean loss and the same gradients as model(**batch).loss."""
    import torch

    from proxytune.training.data import collate
    from proxytune.training.tuning import build_model, completion_loss

    model, tokenizer = build_model(config(tiny_dir, tmp_path, full=full), torch.device("cpu"))
    if not full:  # LoRA starts as a no-op: move B off zero so the adapter's own gradients are tested too
        torch.manual_seed(0)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02)
    batch = collate(tokenize(ROWS[:5], tokenizer, 64), tokenizer.pad_token_id)  # rows of different lengths
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(loss_of):
        loss = loss_of()
        grads = torch.autograd.grad(loss, trainable)
        return loss.detach(), grads

    reference = loss_and_grads(lambda: model(**batch).loss)
    for chunk in (3, 1000):  # several chunks (some positions in each), or one
        summed, count = completion_loss(model, batch, full, chunk=chunk)
        assert count == int((batch["labels"][:, 1:] != IGNORE).sum())
        chunked = loss_and_grads(lambda: completion_loss(model, batch, full, chunk=chunk)[0] / count)
        assert float(chunked[0]) == pytest.approx(float(reference[0]), rel=1e-5)
        for mine, theirs in zip(chunked[1], reference[1]):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_chat_rows_train_on_the_assistant_reply_only(tok):
    row = {"messages": [{"role": "user", "content": "what is 3 + 4?"}, {"role": "assistant", "content": "7"}]}
    [example] = tokenize([row], tok, 64)
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    assert tok.decode(learned[:-1]) == "7" and learned[-1] == tok.eos_token_id


def test_lora_tuning_lowers_heldout_loss_and_the_adapter_loads_as_an_expert(tiny_dir, tmp_path):
    summary = tune(config(tiny_dir, tmp_path))
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"] - 0.5
    adapter = tmp_path / "expert"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)

    from proxytune.facade.tuner import ProxyTuner

    tuner = ProxyTuner.from_pretrained(str(tiny_dir), str(adapter), str(tiny_dir), dtype="float32")
    prompt = "Question: what is 2 + 3? Answer:"
    request = tuner.request(prompt, max_new_tokens=4)
    from proxytune.facade.compare import generate_as

    base_text, expert_text = generate_as(tuner, request, "base"), generate_as(tuner, request, "expert")
    assert expert_text != base_text  # the adapter is live for the expert, off for the anti-expert (= base here)
    assert tuner.generate(prompt, max_new_tokens=4)[0].text == expert_text  # base == anti-expert: proxy == expert


def test_full_tuning_writes_a_model_directory(tiny_dir, tmp_path):
    summary = tune(config(tiny_dir, tmp_path, full=True, epochs=3, learning_rate=1e-3))
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    assert (tmp_path / "expert" / "config.json").exists() and (tmp_path / "expert" / "tokenizer.json").exists()


def test_resume_continues_from_the_checkpoint_to_the_same_result(tiny_dir, tmp_path):
    straight = tune(config(tiny_dir, tmp_path / "a", epochs=2))

    class Stop(Exception):
        pass

    import proxytune.training.tuning as tuning

    real_save, calls = tuning.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        raise Stop

    resumed_config = config(tiny_dir, tmp_path / "b", epochs=2, save_every=3)
    tuning.save_checkpoint = save_then_die
    try:
        with pytest.raises(Stop):
            tune(resumed_config)
    finally:
        tuning.save_checkpoint = real_save
    assert (tmp_path / "b" / "expert" / "checkpoint").exists()
    resumed = tune(config(tiny_dir, tmp_path / "b", epochs=2, save_every=3, resume=True))
    assert resumed["steps_this_run"] == straight["steps"] - 3
    assert resumed["heldout_loss_after"] == pytest.approx(straight["heldout_loss_after"], abs=1e-4)
    assert not (tmp_path / "b" / "expert" / "checkpoint").exists()
    # the time reported is the whole training's, both runs together; the memory the larger of their peaks
    history = json.loads((tmp_path / "b" / "expert" / "tune_summary.json").read_text())["history"]
    first_run = next(h["seconds"] for h in history if h["step"] == 3 and "train_loss" in h)
    assert resumed["train_seconds"] == pytest.approx(first_run + resumed["train_seconds_this_run"], abs=0.15)
    assert resumed["peak_rss_gb"] > 0


def test_other_sets_are_measured_before_and_after_training(tiny_dir, tmp_path):
    # a recipe is chosen on one set (validation) and the result reported on another (held-out)
    validation = write_jsonl(tmp_path / "validation.jsonl", ROWS[::5])
    summary = tune(config(tiny_dir, tmp_path, loss_sets={"validation": str(validation)}))
    losses = summary["losses"]["validation"]
    assert losses["after"] < losses["before"] - 0.5
    assert summary["train_seconds"] == summary["train_seconds_this_run"] > 0


def test_bad_input_is_reported_clearly(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ProxyTuneError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(bad)
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ProxyTuneError, match=r"bad.jsonl:2: expected an object"):
        read_jsonl(bad)
    bad.write_text("\n\n")
    with pytest.raises(ProxyTuneError, match="holds no examples"):
        read_jsonl(bad)
    with pytest.raises(ProxyTuneError, match="unknown model 'nope'.*registered: .*qwen2.5-coder-0.5b-instruct"):
        tune(config(tiny_dir, tmp_path, model="nope"))
    (tmp_path / "expert").mkdir()
    (tmp_path / "expert" / "keep.txt").write_text("precious")
    with pytest.raises(ProxyTuneError, match="exists and is not empty.*--overwrite"):
        tune(config(tiny_dir, tmp_path))
    assert (tmp_path / "expert" / "keep.txt").exists()


def test_cli_reports_errors_in_one_line(tiny_dir, tmp_path, capsys):
    from proxytune.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    assert main(["tune", "--anti-expert", "nope", "--data", str(data), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_model_means_a_trio_in_tune_too_and_tunes_its_anti_expert(tmp_path, capsys, monkeypatch):
    import proxytune.training.tuning as tuning
    from proxytune.cli import main

    tuned = []
    summary = dict.fromkeys(("steps", "heldout_loss_before", "heldout_loss_after", "train_tokens_per_second",
                             "train_seconds_this_run"), 0)
    monkeypatch.setattr(tuning, "tune", lambda config: tuned.append(config.model) or summary)
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    out = ["--data", str(data), "--output", str(tmp_path / "out")]
    assert main(["tune", "--model", "qwen2.5-coder-0.5b-instruct", *out]) == 2
    err = capsys.readouterr().err
    assert "--model names a trio" in err and "give --anti-expert qwen2.5-coder-0.5b-instruct" in err
    assert main(["tune", "--model", "demo", *out]) == 0
    assert main(["tune", "--anti-expert", "some-model", *out]) == 0
    assert tuned == ["qwen2.5-coder-0.5b-instruct", "some-model"]  # the demo trio's anti-expert, then the model


def test_a_crafted_checkpoint_is_refused_and_never_executed(tiny_dir, tmp_path):
    """`tune --resume` on a directory someone else wrote: a pickle that runs code on load must not run."""
    import pickle

    import proxytune.training.tuning as tuning

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint = tmp_path / "c" / "expert" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / tuning.STATE).write_bytes(pickle.dumps({"step": Payload()}))
    with pytest.raises(ProxyTuneError, match="not a checkpoint this program wrote"):
        tune(config(tiny_dir, tmp_path / "c", epochs=1, save_every=1, resume=True))
    assert not marker.exists()
