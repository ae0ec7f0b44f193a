"""`proxytune generate` as a user runs it: a real process over models saved to disk."""
import json
import subprocess
import sys

import pytest

from proxytune import ProxyTuner
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def trio_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trio")
    dirs = []
    for seed, role in enumerate(("base", "expert", "anti")):
        path = root / role
        tiny_model(seed).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        dirs.append(str(path))
    return dirs


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "proxytune", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


def test_generate_prints_the_proxy_tuned_text(trio_dirs):
    base, expert, anti = trio_dirs
    done = cli("generate", "--base", base, "--expert", expert, "--anti-expert", anti, "--max-new-tokens", "12",
               "The quick brown")
    assert done.returncode == 0, done.stderr
    expected = ProxyTuner.from_pretrained(base, expert, anti).generate("The quick brown", max_new_tokens=12)[0].text
    assert done.stdout == expected + "\n"


def test_compare_shows_base_alone_expert_alone_and_proxy(trio_dirs):
    base, expert, anti = trio_dirs
    done = cli("generate", "--base", base, "--expert", expert, "--anti-expert", anti, "--max-new-tokens", "8",
               "--compare", "-", stdin="Answer")
    assert done.returncode == 0, done.stderr
    tuner = ProxyTuner.from_pretrained(base, expert, anti)
    expected_base = ProxyTuner.from_pretrained(base, expert, expert).generate("Answer", max_new_tokens=8)[0].text
    expected_proxy = tuner.generate("Answer", max_new_tokens=8)[0].text
    assert "=== base alone ===\n" + expected_base + "\n" in done.stdout
    assert "=== expert alone ===" in done.stdout
    assert "=== proxy-tuned ===\n" + expected_proxy + "\n" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--base", "/nonexistent/model", "--expert", "x", "--anti-expert", "y", "hi"], "neither an existing path"),
    (["--base", "BASE", "hi"], "missing --expert, --anti-expert"),
    (["--base", "BASE", "--expert", "BASE", "--anti-expert", "BASE", "--max-new-tokens", "0", "hi"], "max_new_tokens"),
    (["--base", "BASE", "--expert", "BASE", "--anti-expert", "BASE", "--alpha", "nan", "hi"], "alpha"),
])
def test_bad_input_is_one_line_and_exit_code_2(trio_dirs, args, message):
    args = [a.replace("BASE", trio_dirs[0]) for a in args]
    done = cli("generate", *args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_backslash_n_on_the_command_line_is_a_newline_unless_no_escape(trio_dirs, capsys):
    """The README's `generate "Answer ...\\n\\nQuestion: ..."` passes a backslash and an n: read as llama.cpp
    reads it, a newline (in stop strings too); --no-escape keeps it literal."""
    from proxytune.cli import main

    base, expert, anti = trio_dirs
    models = ["--base", base, "--expert", expert, "--anti-expert", anti, "--max-new-tokens", "10"]
    tuner = ProxyTuner.from_pretrained(base, expert, anti)
    assert main(["generate", *models, "Answer:\\n\\tdef add(a, b):"]) == 0
    assert capsys.readouterr().out == tuner.generate("Answer:\n\tdef add(a, b):", max_new_tokens=10)[0].text + "\n"
    assert main(["generate", *models, "--no-escape", "Answer:\\n"]) == 0
    assert capsys.readouterr().out == tuner.generate("Answer:\\n", max_new_tokens=10)[0].text + "\n"
    text = tuner.generate("The quick", max_new_tokens=10)[0].text
    assert main(["generate", *models, "--stop", text[3:6].replace("\n", "\\n"), "The quick"]) == 0
    assert capsys.readouterr().out == text[:3] + "\n"


def test_decoding_settings_are_refused_before_any_model_loads(trio_dirs, capsys, monkeypatch):
    import proxytune.cli.generate as generate
    from proxytune.cli import main

    monkeypatch.setattr(generate, "load_tuner", lambda args: pytest.fail("loaded models before checking settings"))
    base, expert, anti = trio_dirs
    for bad, message in ((["--temperature", "-1"], "temperature"), (["--top-p", "0"], "top_p"),
                         (["--top-k", "-2"], "top_k"), (["--alpha", "inf"], "alpha"),
                         (["--max-new-tokens", "0"], "max_new_tokens"), (["--min-p", "1"], "min_p"),
                         (["--frequency-penalty", "3"], "frequency_penalty"),
                         (["--logit-bias", "5:1"], "TOKEN_ID=BIAS"), (["--regex", "[0-9"], "invalid regex"),
                         (["--json-schema", '{"type": 5}'], "invalid json_schema"),
                         (["--json-schema", "/no/such.json"], "neither a file nor JSON"),
                         (["--grammar", "/no/such.lark"], "no such file")):
        assert main(["generate", "--base", base, "--expert", expert, "--anti-expert", anti, *bad, "hi"]) == 2
        assert message in capsys.readouterr().err


def test_stop_of_the_wrong_type_is_a_clear_error(trio_dirs):
    from proxytune.errors import ProxyTuneError

    tuner = ProxyTuner.from_pretrained(*trio_dirs)
    for stop in (3, [3], {"x": 1}, b"x"):
        with pytest.raises(ProxyTuneError, match="stop must be a string or a list of strings"):
            tuner.generate("hi", max_new_tokens=2, stop=stop)


def test_version(capsys):
    from proxytune import __version__
    from proxytune.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"proxytune {__version__}\n"


def test_a_mistyped_option_is_named_with_the_closest_spelling_by_the_verb(capsys):
    from proxytune.cli import main

    assert main_exit(main, ["generate", "--model", "demo", "--temprature", "0.5", "hi"]) == 2
    error = capsys.readouterr().err
    assert "proxytune generate: error: unknown option --temprature; did you mean --temperature?" in error
    assert "usage: proxytune generate" in error and "Traceback" not in error
    assert main_exit(main, ["serve", "--model", "demo", "--max-btach", "4"]) == 2
    assert "did you mean --max-batch?" in capsys.readouterr().err


def main_exit(main, argv) -> int:
    with pytest.raises(SystemExit) as done:
        main(argv)
    return done.value.code


def test_role_kinds_are_accepted_in_either_spelling_and_printed_in_one(trio_dirs):
    from proxytune.engine.prompts import chat_role_kinds
    from proxytune.errors import ProxyTuneError

    assert chat_role_kinds("expert, anti-expert") == ("expert", "anti_expert")
    assert chat_role_kinds(["anti_expert", "anti-expert"]) == ("anti_expert",)
    with pytest.raises(ProxyTuneError, match="may name base, expert, anti_expert"):
        chat_role_kinds("expert,antiexpert")
    tuner = ProxyTuner.from_pretrained(*trio_dirs)
    messages = [{"role": "user", "content": "hi"}]
    assert tuner.request(messages=messages, chat_roles=("anti-expert",)).prompts == \
        tuner.request(messages=messages, chat_roles=("anti_expert",)).prompts


def test_threads_sets_torchs_threads_and_llama_threads_only_llama_cpps(trio_dirs, monkeypatch):
    import argparse

    import torch

    from proxytune.cli._models import set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(argparse.Namespace(threads=1, llama_threads=None)) == 1 and torch.get_num_threads() == 1
        assert set_threads(argparse.Namespace(threads=1, llama_threads=3)) == 3
        assert set_threads(argparse.Namespace(threads=None, llama_threads=None)) is None
    finally:
        torch.set_num_threads(before)


def test_each_model_loading_is_named_and_library_noise_is_off_unless_verbose(trio_dirs):
    base, expert, anti = trio_dirs
    models = ["--base", base, "--expert", expert, "--anti-expert", anti, "--max-new-tokens", "4"]
    quiet = cli("generate", *models, "The quick")
    assert quiet.returncode == 0
    assert [line for line in quiet.stderr.splitlines() if line] == \
        [f"proxytune: loading {path} (float32 on cpu)" for path in (base, expert, anti)]
    loud = cli("generate", *models, "--verbose", "The quick")
    assert "Loading weights" in loud.stderr and "proxytune: loading" in loud.stderr


# --- batch files -------------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    import json
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path):
    import json
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_batch_file_decodes_every_row_with_its_own_settings(trio_dirs, tmp_path, capsys):
    from proxytune.cli import main

    base, expert, anti = trio_dirs
    rows = [{"id": "a", "prompt": "The quick"}, {"prompt": "def add(a, b):", "max_new_tokens": 3},
            {"id": "c", "messages": [{"role": "user", "content": "hi"}], "alpha": 0.0},
            {"id": "d", "prompt": "Answer:", "temperature": 0.9, "seed": 7}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert main(["generate", "--base", base, "--expert", expert, "--anti-expert", anti, "--max-new-tokens", "6",
                 "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                 "--batch-size", "2"]) == 0
    got = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    tuner = ProxyTuner.from_pretrained(base, expert, anti)
    assert got["a"]["text"] == tuner.generate("The quick", max_new_tokens=6)[0].text
    assert got["2"]["text"] == tuner.generate("def add(a, b):", max_new_tokens=3)[0].text  # id: the line number
    assert got["c"]["text"] == tuner.chat([{"role": "user", "content": "hi"}], max_new_tokens=6, alpha=0.0).text
    assert got["d"]["text"] == tuner.generate("Answer:", max_new_tokens=6, temperature=0.9, seed=7)[0].text
    assert all(r["finish_reason"] in ("stop", "length") and r["completion_tokens"] <= 6 for r in got.values())


def test_a_batch_run_resumes_where_it_stopped(trio_dirs, tmp_path, monkeypatch):
    from proxytune.cli import main

    base, expert, anti = trio_dirs
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in ("one", "two", "three", "four")])
    argv = ["generate", "--base", base, "--expert", expert, "--anti-expert", anti, "--max-new-tokens", "4",
            "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    assert main(argv) == 0
    whole = {r["id"]: r["text"] for r in read_jsonl(tmp_path / "out.jsonl")}
    lines = (tmp_path / "out.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "out.jsonl").write_text(lines[0] + lines[1][:10])  # killed while writing the second row
    asked = []
    original = ProxyTuner.request
    monkeypatch.setattr(ProxyTuner, "request", lambda self, *a, **k: asked.append(a) or original(self, *a, **k))
    assert main(argv) == 0
    assert len(asked) == 3  # the finished row is not decoded again
    assert {r["id"]: r["text"] for r in read_jsonl(tmp_path / "out.jsonl")} == whole


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\nnot json\n', ":2: not valid JSON"),
    ('{"prompt": "a", "temprature": 1}\n', "unknown field 'temprature'"),
    ('{"text": "a"}\n', 'give an object with "prompt" or "messages"'),
    ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "appears twice"),
    ('{"prompt": "a"}\n{"prompt": "b", "seed": 1.5}\n', "line 2: seed"),
    ('{"prompt": "a", "seed": true}\n', "line 1: seed"),
    ('{"prompt": "a", "seed": 18446744073709551616}\n', "line 1: seed"),
    ('{"prompt": "a", "id": [1]}\n', "line 1: id"),
    ('{"prompt": "a", "max_new_tokens": "8"}\n', "line 1: max_new_tokens"),
    ('{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n'.encode("latin-1"), ":2: not UTF-8"),
    ('{"prompt": "a"}\n' + json.dumps({"prompt": "b", "response_format": {"type": "grammar", "grammar": "start: r0\n" + "\n".join(
        f"r{i}: r{i + 1}" for i in range(300)) + '\nr300: "a"'}}) + "\n", "line 2: response_format: the grammar chains"),
])
def test_a_bad_batch_file_is_refused_before_loading_naming_the_line(trio_dirs, tmp_path, capsys, monkeypatch,
                                                                    content, message):
    import proxytune.cli.generate as generate
    from proxytune.cli import main

    monkeypatch.setattr(generate, "load_tuner", lambda args: pytest.fail("loaded models for a bad file"))
    path = tmp_path / "in.jsonl"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    base, expert, anti = trio_dirs
    assert main(["generate", "--base", base, "--expert", expert, "--anti-expert", anti,
                 "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("output", ["notes.md", "in.jsonl", "other.jsonl"])
def test_an_output_that_is_not_this_commands_results_is_refused_and_left_as_it_is(trio_dirs, tmp_path, capsys,
                                                                                 monkeypatch, output):
    import proxytune.cli.generate as generate
    from proxytune.cli import main

    monkeypatch.setattr(generate, "load_tuner", lambda args: pytest.fail("loaded models for a bad output"))
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}])
    (tmp_path / "notes.md").write_text("# my notes\n\n" + "a paragraph worth keeping\n" * 1400)
    write_jsonl(tmp_path / "other.jsonl", [{"id": "x", "label": "a dataset, not results"}])
    before = (tmp_path / output).read_bytes()
    base, expert, anti = trio_dirs
    assert main(["generate", "--base", base, "--expert", expert, "--anti-expert", anti,
                 "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / output)]) == 2
    assert "choose another --output" in capsys.readouterr().err
    assert (tmp_path / output).read_bytes() == before


def test_a_second_run_on_an_output_being_written_is_refused(trio_dirs, tmp_path, capsys):
    from proxytune.cli import main
    from proxytune.outputs import exclusive

    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}])
    base, expert, anti = trio_dirs
    argv = ["generate", "--base", base, "--expert", expert, "--anti-expert", anti, "--max-new-tokens", "2",
            "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    with exclusive(tmp_path / "out.jsonl"):  # what a run in another process holds while it writes
        import subprocess
        import sys
        other = subprocess.run([sys.executable, "-m", "proxytune", *argv], capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "being written by another run" in other.stderr
    assert not (tmp_path / "out.jsonl").exists()
    assert main(argv) == 0 and len(read_jsonl(tmp_path / "out.jsonl")) == 1  # once the other run ended


def test_a_prompt_file_is_read_and_a_missing_one_is_an_error(trio_dirs, tmp_path, capsys):
    from proxytune.cli import main

    base, expert, anti = trio_dirs
    models = ["--base", base, "--expert", expert, "--anti-expert", anti, "--max-new-tokens", "5"]
    (tmp_path / "p.txt").write_text("Answer:\\n")  # taken as it is: a backslash and an n
    assert main(["generate", *models, "--prompt-file", str(tmp_path / "p.txt")]) == 0
    expected = ProxyTuner.from_pretrained(base, expert, anti).generate("Answer:\\n", max_new_tokens=5)[0].text
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", *models, "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    error = capsys.readouterr().err
    assert "--prompt-file" in error and "no such file" in error


def test_output_formats_and_penalties_on_the_command_line_and_in_batch_rows(trio_dirs, tmp_path, capsys):
    import json

    from proxytune.cli import main

    base, expert, anti = trio_dirs
    schema = {"type": "object", "properties": {"animal": {"enum": ["fox", "dog"]}}, "required": ["animal"],
              "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    models = ["--base", base, "--expert", expert, "--anti-expert", anti]
    assert main(["generate", *models, "--max-new-tokens", "30", "--json-schema", str(tmp_path / "schema.json"),
                 "--frequency-penalty", "0.5", "--logit-bias", "9=2", "The quick"]) == 0
    printed = capsys.readouterr().out
    tuner = ProxyTuner.from_pretrained(base, expert, anti)
    fmt = {"type": "json_schema", "json_schema": {"name": "cli", "schema": schema}}
    expected = tuner.generate("The quick", max_new_tokens=30, response_format=fmt, frequency_penalty=0.5,
                              logit_bias={9: 2.0})[0].text
    assert printed == expected + "\n" and json.loads(printed)["animal"] in ("fox", "dog")
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Answer:", "response_format": {"type": "regex", "regex": "[0-9]{4}"}},
                                        {"prompt": "def", "repetition_penalty": 1.5}])
    assert main(["generate", *models, "--max-new-tokens", "8", "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    got = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert len(got["1"]["text"]) == 4 and got["1"]["text"].isdigit()
    assert got["2"]["text"] == tuner.generate("def", max_new_tokens=8, repetition_penalty=1.5)[0].text
