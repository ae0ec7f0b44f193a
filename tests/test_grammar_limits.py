"""No output format can take the process down: what would overflow llguidance's stack is refused with the limit's
name before it reaches the compiler, the compiler runs on a deep stack anyway, and a format that allows no text
is refused up front (a 400 at the server, not a 200 with empty text)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from proxytune import ProxyTuner
from proxytune.engine import grammar_limits
from proxytune.engine.grammar_limits import MAX_FORMAT_BYTES, MAX_RULE_DEPTH, rule_depth, schema_depth
from proxytune.engine.shaping import compile_grammar
from proxytune.errors import ProxyTuneError


def ref_chain(n: int, compact: bool = False) -> dict:
    """n objects, each holding the next by $ref: what overflowed the stack at n ≈ 950 (94 KB)."""
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def rule_chain(n: int) -> str:
    """n Lark rules, each using the next: what overflowed the stack at n ≈ 2,700 (104 KB at 3,000)."""
    return "start: r0\n" + "\n".join(f"r{i}: r{i + 1}" for i in range(n)) + f'\nr{n}: "a"'


@pytest.fixture(scope="module")
def tuner(trio, tok):
    return ProxyTuner(*trio, tokenizer=tok)


def test_the_schema_that_crashed_the_server_is_refused_naming_the_limit(tuner):
    with pytest.raises(ProxyTuneError, match="MAX_FORMAT_BYTES"):
        tuner.shaping(response_format={"type": "json_schema", "json_schema": {"schema": ref_chain(1000)}})
    small_but_deep = ref_chain(120)  # 10 KB: under the size limit, but 360 levels through its $refs
    assert len(json.dumps(small_but_deep)) < MAX_FORMAT_BYTES
    with pytest.raises(ProxyTuneError, match="MAX_SCHEMA_DEPTH"):
        compile_grammar("json_schema", small_but_deep, tuner.grammar_tokens)


def test_the_grammar_that_crashed_the_server_is_refused_naming_the_limit(tuner):
    with pytest.raises(ProxyTuneError, match="MAX_FORMAT_BYTES"):
        compile_grammar("lark", rule_chain(3000), tuner.grammar_tokens)
    with pytest.raises(ProxyTuneError, match="MAX_RULE_DEPTH"):
        compile_grammar("lark", rule_chain(MAX_RULE_DEPTH + 5), tuner.grammar_tokens)


def test_depths_are_counted_through_refs_and_rules_and_recursion_counts_once():
    assert schema_depth(ref_chain(10)) == schema_depth(ref_chain(11)) - 3  # object -> properties -> x, per link
    tree = {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array",
                                                                         "items": {"$ref": "#/$defs/node"}}}}},
            "$ref": "#/$defs/node"}
    assert schema_depth(tree) < 10
    assert rule_depth(rule_chain(40)) == 42  # start, r0 .. r40
    assert rule_depth('start: "r1 r2 r3" a\na: /r[0-9]+/ start') == 2  # literals name no rules; the cycle once


def test_formats_within_the_limits_compile_and_work(tuner):
    assert compile_grammar("json_schema", ref_chain(40), tuner.grammar_tokens).matcher() is not None
    assert compile_grammar("lark", rule_chain(200), tuner.grammar_tokens).matcher() is not None


def test_a_format_that_allows_no_text_is_refused(tuner):
    with pytest.raises(ProxyTuneError, match="allows no text"):
        compile_grammar("regex", "[^\\x00-\\U0010FFFF]", tuner.grammar_tokens)  # a class of no character
    with pytest.raises(ProxyTuneError, match="minimum"):  # what llguidance itself sees
        compile_grammar("json_schema", {"type": "integer", "minimum": 5, "maximum": 2}, tuner.grammar_tokens)


def test_the_compiler_runs_on_a_stack_deep_enough_for_what_kills_an_ordinary_thread():
    """A chain past the limits, compiled by llguidance directly: on an ordinary thread the process dies; through
    on_big_stack it compiles (the second guard, should a construct escape the checks)."""
    chain = json.dumps(ref_chain(1400))
    script = textwrap.dedent(f"""
        import json, sys, threading, llguidance
        from proxytune.engine.grammar_limits import on_big_stack
        schema = json.loads({chain!r})
        compile = lambda: llguidance.LLMatcher.validate_grammar(
            llguidance.LLMatcher.grammar_from_json_schema(schema), None)
        if sys.argv[1] == "big":
            print("compiled", on_big_stack(compile) is not None)
        else:
            thread = threading.Thread(target=compile); thread.start(); thread.join()
            print("compiled")
    """)
    big = subprocess.run([sys.executable, "-c", script, "big"], capture_output=True, text=True, timeout=120)
    assert big.returncode == 0 and "compiled" in big.stdout, big.stderr
    plain = subprocess.run([sys.executable, "-c", script, "plain"], capture_output=True, text=True, timeout=120)
    assert plain.returncode < 0  # killed by a signal: why the limits exist
    assert grammar_limits.COMPILE_STACK_BYTES >= 32 * 8 * 1024 * 1024
