"""Placement per role (device, dtype, device map), each checkpoint's own dtype by default, Hub ids from the
local cache, the loading plan, and roles stepping concurrently when their hardware is apart.

On this CPU-only machine "apart" is declared: the engine reads each session's `capabilities.place`, so
tests give the roles distinct places to make them run in threads, and the numbers must not change.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from proxytune import ProxyTuner
from proxytune.cli import main
from proxytune.engine.session import ProxySession, concurrent_groups, run_by_place
from proxytune.errors import ProxyTuneError
from proxytune.models.placement import Placement, check_device, parse_place, placement_of, placements_of
from proxytune.models.plan import weight_bytes

PROMPTS = ["The quick brown fox", "def add(a, b):\n", "Answer the following question. Question: what is 3 + 4?"]


@pytest.fixture(scope="module")
def trio_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("placed")
    tokenizer = tiny_tokenizer()
    for seed, role in enumerate(("base", "expert", "anti")):
        tiny_model(seed).save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
    bf16 = tiny_model(0).to(torch.bfloat16)
    bf16.save_pretrained(root / "base-bf16")
    tokenizer.save_pretrained(root / "base-bf16")
    return {name: str(root / name) for name in ("base", "expert", "anti", "base-bf16")}


def load(dirs, **options):
    return ProxyTuner.from_pretrained(dirs["base"], dirs["expert"], dirs["anti"], **options)


def dtypes(tuner):
    return {role: next(source.model.parameters()).dtype for role, source in tuner.sources.items()}


# --- placement per role ------------------------------------------------------------------------------

def test_each_checkpoint_loads_in_its_own_dtype_unless_asked(trio_dirs):
    own = ProxyTuner.from_pretrained(trio_dirs["base-bf16"], trio_dirs["expert"], trio_dirs["anti"])
    assert dtypes(own) == {"base": torch.bfloat16, "expert": torch.float32, "anti_expert": torch.float32}
    asked = ProxyTuner.from_pretrained(trio_dirs["base-bf16"], trio_dirs["expert"], trio_dirs["anti"], dtype="float32")
    assert set(dtypes(asked).values()) == {torch.float32}


def test_a_role_placed_on_its_own_equals_the_same_models_placed_by_hand(trio_dirs):
    placed = load(trio_dirs, placement={"expert": {"dtype": "bfloat16"}, "anti-expert": {"dtype": "bfloat16"}})
    assert dtypes(placed) == {"base": torch.float32, "expert": torch.bfloat16, "anti_expert": torch.bfloat16}
    from transformers import AutoModelForCausalLM

    by_hand = ProxyTuner(*(AutoModelForCausalLM.from_pretrained(trio_dirs[name], dtype=dtype) for name, dtype in
                           (("base", torch.float32), ("expert", torch.bfloat16), ("anti", torch.bfloat16))),
                         tokenizer=tiny_tokenizer())
    for ours, theirs in zip(placed.generate(PROMPTS, max_new_tokens=12), by_hand.generate(PROMPTS, max_new_tokens=12)):
        assert ours.token_ids == theirs.token_ids and ours.logprobs == theirs.logprobs


def test_an_explicit_device_map_places_every_layer_and_changes_nothing(trio_dirs, monkeypatch):
    """On the CPU every layer goes to the CPU (a real split across GPUs is in scripts/device_check.sh)."""
    from transformers import AutoModelForCausalLM

    layers = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}
    maps, original = [], AutoModelForCausalLM.from_pretrained

    def spying(*args, **kwargs):
        maps.append(kwargs.get("device_map"))
        return original(*args, **kwargs)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spying)
    mapped = load(trio_dirs, placement={"base": {"device_map": layers}})
    assert maps.count(layers) == 1  # the base's map reached transformers, the pair's none
    assert {str(p.device) for p in mapped.sources["base"].model.parameters()} == {"cpu"}
    plain = load(trio_dirs)
    ours = mapped.generate(PROMPTS, max_new_tokens=10, batch_size=3)
    theirs = plain.generate(PROMPTS, max_new_tokens=10, batch_size=3)
    assert [o.token_ids for o in ours] == [t.token_ids for t in theirs]
    assert [o.logprobs for o in ours] == [t.logprobs for t in theirs]


@pytest.mark.parametrize("text, parsed", [
    ("base:device_map=auto", {"base": {"device_map": "auto"}}),
    ("expert:device=cpu,dtype=bfloat16", {"expert": {"device": "cpu", "dtype": "bfloat16"}}),
    ('base:device_map={"model.layers.0": "cuda:0", "lm_head": "cuda:1"},dtype=float16',
     {"base": {"device_map": {"model.layers.0": "cuda:0", "lm_head": "cuda:1"}, "dtype": "float16"}}),
])
def test_place_options_read_as_transformers_users_write_them(text, parsed):
    assert parse_place([text]) == parsed


@pytest.mark.parametrize("value, message", [
    ({"device": "gpu"}, "unknown device 'gpu'"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"device_map": "everywhere"}, "device_map 'everywhere'"),
    ({"device": "cpu", "device_map": "auto"}, "give device or device_map, not both"),
    ({"quantize": "3bit"}, "quantize '3bit'"),
    ({"devise": "cpu"}, "unknown key 'devise'"),
])
def test_impossible_placements_are_refused_before_loading(value, message):
    with pytest.raises(ProxyTuneError, match=message):
        placement_of(value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_and_quantisation_without_a_gpu_are_one_line_errors(trio_dirs, capsys):
    with pytest.raises(ProxyTuneError, match="asks for CUDA"):
        check_device("cuda:1")
    with pytest.raises(ProxyTuneError, match="needs a CUDA GPU"):
        placement_of({"quantize": "4bit"})
    common = ["generate", "--base", trio_dirs["base"], "--expert", trio_dirs["expert"], "--anti-expert",
              trio_dirs["anti"], "hello"]
    for extra in (["--device", "cuda"], ["--device", "gpu"], ["--place", "base:quantize=8bit"],
                  ["--place", "bsae:device=cpu"], ["--place", "base"]):
        assert main(common + extra) == 2
        error = capsys.readouterr().err
        assert len(error.strip().splitlines()) == 1 and "Traceback" not in error, extra


def test_placements_name_roles_in_either_spelling():
    assert placements_of({"anti-expert": {"dtype": "bf16"}}, ["base", "expert", "anti_expert"]) == \
        {"anti_expert": Placement(dtype="bf16")}
    with pytest.raises(ProxyTuneError, match="unknown role 'tuned'"):
        placements_of({"tuned": {}}, ["base", "expert", "anti_expert"])


# --- model names as transformers users write them -----------------------------------------------------

def test_a_hub_id_resolves_through_the_local_cache_and_is_refused_when_absent(trio_dirs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-base" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for file in Path(trio_dirs["base"]).iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (tmp_path / "hub" / "models--tiny-org--tiny-base" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-base" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    by_id = ProxyTuner.from_pretrained("tiny-org/tiny-base", trio_dirs["expert"], trio_dirs["anti"])
    by_path = load(trio_dirs)
    assert by_id.generate(PROMPTS[0], max_new_tokens=8)[0].token_ids == \
        by_path.generate(PROMPTS[0], max_new_tokens=8)[0].token_ids
    with pytest.raises(ProxyTuneError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE=1"):
        ProxyTuner.from_pretrained("tiny-org/absent", trio_dirs["expert"], trio_dirs["anti"])


# --- the plan ---------------------------------------------------------------------------------------------

def test_dry_run_prints_the_plan_and_loads_nothing(trio_dirs, capsys, monkeypatch):
    import proxytune.models.loading as loading

    monkeypatch.setattr(loading, "load_plain", lambda *a, **k: pytest.fail("--dry-run loaded a model"))
    assert main(["generate", "--base", trio_dirs["base-bf16"], "--expert", trio_dirs["expert"], "--anti-expert",
                 trio_dirs["anti"], "--place", "expert:dtype=float16", "--dry-run", "hello"]) == 0
    out = capsys.readouterr().out
    parameters = sum(p.numel() for p in tiny_model(0).parameters())
    assert weight_bytes(Path(trio_dirs["base-bf16"]), torch.bfloat16, None) == 2 * parameters
    rows = {line.split()[0]: line for line in out.splitlines()[1:4]}
    assert "bfloat16" in rows["base"] and "float16" in rows["expert"] and "float32" in rows["anti_expert"]
    # KV per token: 2 x 2 layers x 2 KV heads x 16 per head x 4 bytes (fp32), times 4096 positions
    assert f"{2 * 2 * 2 * 16 * 4 * 4096 / 2**20:.1f} MiB" in rows["anti_expert"]


# --- roles in parallel ----------------------------------------------------------------------------------

def test_places_that_share_hardware_run_in_one_group():
    a, b, gpu0, gpu01 = frozenset({"cpu"}), frozenset({"server x"}), frozenset({"cuda:0"}), frozenset({"cuda:0", "cuda:1"})
    assert concurrent_groups([a, b, a]) == [[0, 2], [1]]
    assert concurrent_groups([gpu0, frozenset({"cuda:1"}), gpu01]) == [[0, 1, 2]]
    assert concurrent_groups([a, None, b]) == [[0, 1, 2]]  # unknown: shares with everything


def test_calls_on_places_apart_really_run_at_the_same_time():
    meet = threading.Barrier(2, timeout=10)  # passes only if both calls are inside it together

    def call(name):
        return lambda: (meet.wait(), name)[1]
    assert run_by_place({"a": call("a"), "b": call("b")}, {"a": frozenset({"x"}), "b": frozenset({"y"})}) == \
        {"a": "a", "b": "b"}
    alone = threading.Barrier(2, timeout=0.3)
    with pytest.raises(threading.BrokenBarrierError):  # one place: one after another, never together
        run_by_place({"a": lambda: alone.wait(), "b": lambda: alone.wait()},
                     {"a": frozenset({"x"}), "b": frozenset({"x"})})


def test_the_first_error_in_role_order_is_raised_and_its_place_stops_there():
    ran = []

    def fail(name):
        def call():
            ran.append(name)
            raise ValueError(name)
        return call
    calls = {"a": lambda: ran.append("a"), "b": fail("b"), "c": lambda: ran.append("c"), "d": fail("d")}
    places = {"a": frozenset({"x"}), "b": frozenset({"x"}), "c": frozenset({"x"}), "d": frozenset({"y"})}
    with pytest.raises(ValueError, match="b"):
        run_by_place(calls, places)
    assert "c" not in ran and {"a", "b", "d"} <= set(ran)


def apart(tuner):
    """Declare each role's model on hardware of its own (as on three GPUs)."""
    for role, source in tuner.sources.items():
        source.place = frozenset({f"lane {role}"})
    return tuner


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.9, top_p=0.9, seed=3)], ids=["greedy", "sampled"])
def test_roles_stepping_in_parallel_give_the_numbers_of_one_after_another(trio, tok, settings, monkeypatch):
    tuner = apart(ProxyTuner(*trio, tokenizer=tok, alpha=0.8))
    seen = set()
    forward = type(tuner.sources["base"]).forward

    def recording(self, **inputs):
        seen.add(threading.current_thread().name.split("_")[0])
        return forward(self, **inputs)
    monkeypatch.setattr(type(tuner.sources["base"]), "forward", recording)
    parallel = tuner.generate(PROMPTS, max_new_tokens=16, batch_size=2, **settings)
    assert "proxytune-role" in seen  # the roles did run in the pool's threads
    monkeypatch.setattr(ProxySession, "concurrent", False)
    sequential = tuner.generate(PROMPTS, max_new_tokens=16, batch_size=2, **settings)
    assert [(o.token_ids, o.logprobs) for o in parallel] == [(o.token_ids, o.logprobs) for o in sequential]
    spec = tuner.generate(PROMPTS, max_new_tokens=16, speculative=True, **settings)
    monkeypatch.setattr(ProxySession, "concurrent", True)
    assert [o.token_ids for o in tuner.generate(PROMPTS, max_new_tokens=16, speculative=True, **settings)] == \
        [o.token_ids for o in spec]


def test_a_session_on_a_place_of_its_own_declares_it(trio, tok):
    tuner = ProxyTuner(*trio, tokenizer=tok)
    assert tuner.sources["base"].open([[5, 6]]).capabilities.place == frozenset({"cpu"})
    assert json.dumps(sorted(tuner.sources["base"].place)) == '["cpu"]'
