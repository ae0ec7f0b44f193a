"""A backend is one module and one registration: the loader, the plan and the CLI find it in the registry.

The fake backend below is registered here and nowhere else: no other module names it, yet its specs load in
it, `--backend fake` is a choice, and `--dry-run` prints its plan.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from fake_source import FakeSource

from proxytune.cli import main
from proxytune.errors import ProxyTuneError
from proxytune.models import backend_registry
from proxytune.models.backend import Backend, LoadOptions, RolePlan
from proxytune.models.backend_registry import backend_of, every_role_names, with_backend
from proxytune.models.loading import load_roles

SERVER = "openai:http://127.0.0.1:9/v1?tokenizer=tiny"


class FakeRoles:
    tokenizer = None  # set by the fixture: the tiny tokenizer

    def __init__(self, options: LoadOptions):
        self.options = options

    def source(self, spec: str, role: str, placement):
        if spec == "fake:needs-a-package":
            raise ModuleNotFoundError("No module named 'fakelib'", name="fakelib")
        return FakeSource(seed=len(spec), vocab_size=len(self.tokenizer), name=role), self.tokenizer


def fake_plan(role: str, raw_spec: str, spec: str, placement, counted: set) -> RolePlan:
    return RolePlan(role, raw_spec, "fake", "the fake place", "-", 1234, None, f"runs {spec}")


FAKE = Backend("fake", prefix="fake:", loader=FakeRoles, plan=fake_plan, every_role=True, extra="fake")


@pytest.fixture
def fake_backend(monkeypatch, tok):
    monkeypatch.setattr(backend_registry, "BACKENDS", list(backend_registry.BACKENDS))
    monkeypatch.setattr(FakeRoles, "tokenizer", tok)
    return backend_registry.register(FAKE)


def test_the_built_in_backends_claim_their_prefixes():
    assert backend_of("gguf:model.gguf").name == "llama.cpp"
    assert backend_of(SERVER).name == "remote"
    assert backend_of("some/model").name == backend_of("model.gguf").name == "transformers"
    assert every_role_names() == ["transformers", "llama.cpp"]
    assert with_backend("model", "llama-cpp") == "gguf:model" and with_backend(SERVER, "llama.cpp") == SERVER
    with pytest.raises(ProxyTuneError, match="unknown backend 'remote'; use one of transformers, llama.cpp"):
        with_backend("model", "remote")


def test_a_registered_backend_loads_the_specs_with_its_prefix(fake_backend):
    assert backend_of("fake:big") is fake_backend
    loaded = load_roles({"base": "fake:big", "expert": "fake:small", "anti_expert": "fake:small"}, threads=3)
    assert all(isinstance(source, FakeSource) for source, _ in loaded.values())
    assert loaded["expert"][0] is loaded["anti_expert"][0]  # one spec, one placement: loaded once
    assert loaded["base"][0].name == "base-8"


def test_a_registered_backend_is_a_backend_choice_and_in_the_plan(fake_backend, capsys):
    assert main(["generate", "--backend", "fake", "--base", "big", "--expert", "fake:small", "--anti-expert", SERVER,
                 "--dry-run", "hello"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:4]}
    assert "fake" in rows["base"] and "runs fake:big" in rows["base"]  # a choice of --backend: its prefix put there
    assert "runs fake:small" in rows["expert"]
    assert "server" in rows["anti_expert"]  # a model behind a server stays there


def test_a_missing_package_names_the_backends_extra(fake_backend):
    with pytest.raises(ProxyTuneError, match=r"the fake backend needs fakelib: pip install 'proxytune\[fake\]'"):
        load_roles({"base": "fake:needs-a-package"})


def test_a_name_or_prefix_is_registered_once(fake_backend):
    with pytest.raises(ProxyTuneError, match="clashes with the registered 'fake'"):
        backend_registry.register(Backend("other", prefix="fake:", loader=FakeRoles, plan=fake_plan))


def test_the_registry_imports_no_backends_packages():
    """llama_cpp and the remote source (httpx) are imported when a role of theirs loads, not before."""
    code = ("import sys, proxytune.cli, proxytune.models.loading, proxytune.models.plan; "
            "print([m for m in sys.modules if m.startswith(('llama_cpp', 'proxytune.backends.llama_cpp.', "
            "'proxytune.backends.remote.source', 'proxytune.backends.remote.http'))])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
