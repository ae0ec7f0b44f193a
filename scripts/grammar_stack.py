"""Where llguidance's recursion gives out: bisects, in child processes, the longest chain of JSON-schema $refs
and of Lark rules that compiles on an ordinary thread (8 MB stack) — the numbers behind engine/grammar_limits.py.

    python scripts/grammar_stack.py        # ~1 minute; prints the last length that compiled and the first that crashed
"""
import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, sys, threading, llguidance
    kind, n = sys.argv[1], int(sys.argv[2])
    if kind == "ref-properties":
        defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i+1}"}}} for i in range(n)}
    elif kind == "ref-anyof":
        defs = {f"d{i}": {"anyOf": [{"type": "array", "items": {"$ref": f"#/$defs/d{i+1}"}}]} for i in range(n)}
    if kind.startswith("ref"):
        defs[f"d{n}"] = {"type": "integer"}
        text = lambda: llguidance.LLMatcher.grammar_from_json_schema({"$ref": "#/$defs/d0", "$defs": defs})
    elif kind == "lark-rules":
        text = lambda: llguidance.LLMatcher.grammar_from_lark(
            "start: r0\\n" + "\\n".join(f"r{i}: r{i+1}" for i in range(n)) + f'\\nr{n}: "a"')
    else:
        text = lambda: llguidance.LLMatcher.grammar_from_lark(
            "start: T0\\n" + "\\n".join(f"T{i}: T{i+1}" for i in range(n)) + f'\\nT{n}: "a"')
    thread = threading.Thread(target=lambda: llguidance.LLMatcher.validate_grammar(text(), None))
    thread.start(); thread.join()
""")


def compiles(kind: str, n: int) -> bool:
    return subprocess.run([sys.executable, "-c", CHILD, kind, str(n)], capture_output=True, timeout=300).returncode == 0


def main() -> None:
    for kind in ("ref-properties", "ref-anyof", "lark-rules", "lark-terminals"):
        low, high = 16, 16
        while compiles(kind, high):
            low, high = high, high * 2
        while high - low > max(8, low // 50):
            middle = (low + high) // 2
            low, high = (middle, high) if compiles(kind, middle) else (low, middle)
        print(json.dumps({"chain": kind, "compiles_at": low, "crashes_at": high}))


if __name__ == "__main__":
    main()
