"""Trio configs: one TOML file names every role, its placement, α per pair and chat templates; usable by every
verb (--config), registered by name (`models add`), refused with the file and key named when wrong."""
from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from proxytune import ProxyTuner
from proxytune.cli import main
from proxytune.errors import ProxyTuneError
from proxytune.models.trio_config import add_user_trio, read_config

PROMPTS = ["The quick brown fox", "def add(a, b):\n"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("config-trio")
    for seed, role in enumerate(("base", "expert", "anti", "expert2")):
        tiny_model(seed).save_pretrained(root / role)
        tiny_tokenizer().save_pretrained(root / role)
    return {role: str(root / role) for role in ("base", "expert", "anti", "expert2")}


def simple_config(dirs, alpha: float, expert_keys: str = "", anti_keys: str = "") -> str:
    return (f'alpha = {alpha}\n[base]\nmodel = "{dirs["base"]}"\n[expert]\nmodel = "{dirs["expert"]}"\n{expert_keys}'
            f'[anti-expert]\nmodel = "{dirs["anti"]}"\n{anti_keys}')


def write(path, text):
    path.write_text(text)
    return path


def test_a_config_loads_the_trio_it_names_with_its_placements_and_alpha(dirs, tmp_path):
    config = write(tmp_path / "trio.toml", simple_config(dirs, 0.6, 'dtype = "bfloat16"\n', 'dtype = "bfloat16"\n'))
    tuner = ProxyTuner.from_config(config)
    assert tuner.alphas == [0.6]
    assert next(tuner.sources["expert"].model.parameters()).dtype == torch.bfloat16
    assert next(tuner.sources["base"].model.parameters()).dtype == torch.float32
    same = ProxyTuner.from_pretrained(dirs["base"], dirs["expert"], dirs["anti"], alpha=0.6,
                                      placement={"expert": {"dtype": "bfloat16"}, "anti_expert": {"dtype": "bfloat16"}})
    assert [o.token_ids for o in tuner.generate(PROMPTS, max_new_tokens=8)] == \
        [o.token_ids for o in same.generate(PROMPTS, max_new_tokens=8)]


def test_several_pairs_each_with_its_alpha_and_a_role_with_its_own_chat_template(dirs, tmp_path):
    config = write(tmp_path / "pairs.toml", f"""
[base]
model = "{dirs['base']}"
chat_template = "{{% for m in messages %}}[{{{{ m['content'] }}}}]{{% endfor %}}"
[[pairs]]
alpha = 0.5
expert = {{ model = "{dirs['expert']}" }}
anti_expert = {{ model = "{dirs['anti']}" }}
[[pairs]]
alpha = 1.5
expert = {{ model = "{dirs['expert2']}" }}
anti_expert = {{ model = "{dirs['anti']}" }}
""")
    tuner = ProxyTuner.from_config(config)
    assert tuner.alphas == [0.5, 1.5] and tuner.schema.names[-2:] == ["expert_2", "anti_expert_2"]
    messages = [{"role": "user", "content": "hi"}]
    request = tuner.request(messages=messages)
    assert request.prompts["base"] == tiny_tokenizer()("[hi]", add_special_tokens=False)["input_ids"]
    assert request.prompts["expert"] == tiny_tokenizer()(tiny_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text, message", [
    ('[base]\nmodel = "x"\n[expert]\nmodel = "y"\n', "the anti_expert needs model"),
    ('[base]\nmodel = "x"\ndevise = "cpu"\n', "unknown key 'devise' for the base"),
    ('colour = 1\n', "unknown key 'colour'"),
    ('[base]\nmodel = "x"\ndevice = "gpu"\n', "unknown device 'gpu'"),
    ('alpha = "strong"\n[base]\nmodel="x"\n[expert]\nmodel="y"\n[anti_expert]\nmodel="z"\n', "alpha must be"),
    ('[base\n', "not valid TOML"),
])
def test_a_wrong_config_names_the_file_and_what_to_fix(tmp_path, text, message):
    with pytest.raises(ProxyTuneError, match=message) as error:
        read_config(write(tmp_path / "bad.toml", text))
    assert "bad.toml" in str(error.value)


def test_every_verb_takes_config_and_models_add_registers_it_by_name(dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_CONFIG", str(tmp_path / "user"))
    config = write(tmp_path / "trio.toml", simple_config(dirs, 0.6))
    expected = ProxyTuner.from_pretrained(dirs["base"], dirs["expert"], dirs["anti"], alpha=0.6).generate(
        "The quick", max_new_tokens=6)[0].text
    assert main(["generate", "--config", str(config), "--max-new-tokens", "6", "The quick"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["models", "add", "mytrio", str(config)]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", "mytrio", "--max-new-tokens", "6", "The quick"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert ProxyTuner.from_pretrained("mytrio").alphas == [0.6]
    assert main(["generate", "--model", "mytrio", "--alpha", "0", "--max-new-tokens", "6", "The quick"]) == 0
    base_alone = ProxyTuner.from_pretrained(dirs["base"], dirs["expert"], dirs["anti"], alpha=0.0).generate(
        "The quick", max_new_tokens=6)[0].text
    assert capsys.readouterr().out == base_alone + "\n"  # --alpha given on the command line wins
    assert main(["models", "list"]) == 0 and "mytrio" in capsys.readouterr().out
    assert main(["models", "add", "demo", str(config)]) == 2  # a built-in name is not shadowed
    out = tmp_path / "eval"
    assert main(["eval", "gsm", "--config", str(config), "--limit", "1", "--max-new-tokens", "4", "--output",
                 str(out), "--no-progress"]) == 0


@pytest.mark.parametrize("line, fragment", [
    ('byte_level = "false"', "byte_level"),  # a string is not a boolean (it used to turn byte level on)
    ('prune = "abc"', "prune"),
    ("prune = 2.0", "prune"),
    ('backend = "vllm-or-whatever"', "backend"),
])
def test_trio_options_are_typed(tmp_path, line, fragment):
    path = tmp_path / "trio.toml"
    path.write_text(f'{line}\n[base]\nmodel = "b"\n[expert]\nmodel = "e"\n[anti_expert]\nmodel = "a"\n')
    with pytest.raises(ProxyTuneError, match=fragment):
        read_config(path)


def test_a_trio_config_never_sets_trust_remote_code_and_models_list_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROXYTUNE_CONFIG", str(tmp_path / "config"))
    evil = tmp_path / "evil.toml"
    evil.write_text('trust_remote_code = "no"\n[base]\nmodel = "b"\n[expert]\nmodel = "e"\n[anti_expert]\nmodel = "a"\n')
    with pytest.raises(ProxyTuneError, match="--trust-remote-code on the command line"):
        read_config(evil)
    with pytest.raises(ProxyTuneError):
        add_user_trio("shared", evil)  # nothing is registered
    good = tmp_path / "good.toml"
    good.write_text('byte_level = true\n[base]\nmodel = "b"\n[expert]\nmodel = "e"\n[anti_expert]\nmodel = "a"\n')
    add_user_trio("shared", good)
    from proxytune.cli.models import list_models
    list_models()
    out = capsys.readouterr().out
    assert "only --trust-remote-code" in out and "base=b, expert=e, anti_expert=a, alpha=1, byte_level=True" in out
