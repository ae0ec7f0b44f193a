"""No untrusted file executes: weights load from safetensors only; a pickled checkpoint is refused with the command
that converts it, and that conversion reads tensors only (a pickle that would run code is refused)."""
from __future__ import annotations

import json

import pytest
import torch

from proxytune import ProxyTuner, ProxyTuneError
from proxytune.cli import main
from tiny import tiny_model, tiny_tokenizer


class Boom:
    """Unpickling this would call os.system: what a crafted checkpoint does."""

    def __reduce__(self):
        import os
        return os.system, ("touch /tmp/proxytune-pwned",)


@pytest.fixture
def pickled(tmp_path):
    """A model directory as old checkpoints ship it: config, tokenizer and pytorch_model.bin."""
    model = tiny_model(0)
    model.save_pretrained(tmp_path / "pickled")
    tiny_tokenizer().save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    return tmp_path / "pickled", model


def test_a_model_dir_with_only_pytorch_model_bin_is_refused_with_the_conversion_command(pickled):
    path, _ = pickled
    with pytest.raises(ProxyTuneError, match=r"only pickle files \(pytorch_model.bin\).*proxytune models "
                                             r"to-safetensors"):
        ProxyTuner.from_pretrained(str(path), str(path), str(path))


def test_the_explicit_conversion_gives_a_loadable_model_with_the_same_logits(pickled, tmp_path, capsys):
    path, model = pickled
    target = tmp_path / "converted"
    assert main(["models", "to-safetensors", str(path), str(target)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    tuner = ProxyTuner.from_pretrained(str(target), str(target), str(target), alpha=0.0)
    ids = tuner.tokenizer("The quick brown fox")["input_ids"]
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits[0, -1].float()
    got = tuner.sources["base"].sequence_logits([ids])[0][-1]
    assert torch.allclose(got, want[:got.shape[-1]], atol=1e-5)


def test_the_conversion_never_runs_a_crafted_pickle(pickled, tmp_path, capsys):
    import os

    path, _ = pickled
    torch.save({"weight": Boom()}, path / "pytorch_model.bin")
    if os.path.exists("/tmp/proxytune-pwned"):
        os.remove("/tmp/proxytune-pwned")
    assert main(["models", "to-safetensors", str(path), str(tmp_path / "out")]) == 2
    assert "not a plain tensor file" in capsys.readouterr().err
    assert not os.path.exists("/tmp/proxytune-pwned")


def test_a_sharded_pickled_checkpoint_converts_to_sharded_safetensors_that_load(pickled, tmp_path):
    path, model = pickled
    state = model.state_dict()
    names = sorted(state)
    (path / "pytorch_model.bin").unlink()
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, path / shard)
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    target = tmp_path / "converted"
    assert main(["models", "to-safetensors", str(path), str(target)]) == 0
    assert sorted(p.name for p in target.glob("*.safetensors")) == ["model-00001-of-00002.safetensors",
                                                                    "model-00002-of-00002.safetensors"]
    tuner = ProxyTuner.from_pretrained(str(target), str(target), str(target), alpha=0.0)
    ids = tuner.tokenizer("The quick brown fox")["input_ids"]
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits[0, -1].float()
    assert torch.allclose(tuner.sources["base"].sequence_logits([ids])[0][-1], want[:len(tuner.tokenizer)], atol=1e-5)
