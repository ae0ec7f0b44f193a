"""What an output format may ask of the grammar compiler, checked before llguidance sees it.

llguidance (Rust) recurses over a JSON schema's `$ref` chains and a Lark grammar's rule chains; past the
calling thread's stack the process dies (SIGSEGV), every request in flight with it. Measured with llguidance
1.9.1 on an 8 MB thread stack (scripts/grammar_stack.py): a chain of ~920 objects linked by `$ref` through
`properties` (~90 KB of schema), ~675 through `anyOf`/`items`, ~2,670 chained Lark rules, ~3,550 chained
terminals. Two guards, each enough alone for what they cover:

- limits well below those depths, refused with the limit's name: JSON nesting along `$ref` chains
  (MAX_SCHEMA_DEPTH levels), `$defs` entries (MAX_DEFINITIONS), Lark rule chains (MAX_RULE_DEPTH), and the
  format's size (MAX_FORMAT_BYTES) — every recursion level costs at least a few bytes of input, so the size
  bounds what a construct not analysed here (a `%json` block inside Lark) can nest;
- compilation on a thread of its own with a COMPILE_STACK_BYTES stack (32× the measured 8 MB), so even a
  chain at the size limit stays an order of magnitude away from the edge.

Large formats also cost time at every step, on the engine thread, for every row that uses them (measured with
SmolLM2's 49k vocabulary: a string literal of 8 KB took 4.5 ms per row per mask, 30 KB 23 ms, 100 KB 66 ms; a
schema of 10,000 properties 3.9 s), which the size limit bounds too: 16 KB, about OpenAI's own limit.
"""
from __future__ import annotations

import re
import threading
from typing import Callable, TypeVar

from ..errors import ProxyTuneError

MAX_FORMAT_BYTES = 16 * 1024  # the schema's JSON text, the regex or the Lark grammar (OpenAI: 15,000 characters)
MAX_SCHEMA_DEPTH = 256  # JSON levels along any path, `$ref`s followed (~2,700 crash on 8 MB)
MAX_DEFINITIONS = 1000  # entries of `$defs` / `definitions`
MAX_RULE_DEPTH = 256  # a Lark rule (or terminal) using another, chained (~2,700 crash on 8 MB)
COMPILE_STACK_BYTES = 256 * 1024 * 1024  # virtual: pages are touched only as deep as the compiler goes

T = TypeVar("T")
_STACK_LOCK = threading.Lock()


def check_size(kind: str, text: str) -> None:
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_FORMAT_BYTES:
        raise ProxyTuneError(f"response_format: the {kind} has {size} bytes; proxytune compiles formats of at most "
                             f"{MAX_FORMAT_BYTES} bytes (MAX_FORMAT_BYTES): simplify it")


def _pointer(root, ref: str):
    """The node a local `$ref` ("#/$defs/a") names, or None (a remote or broken ref: the compiler says)."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def schema_depth(schema) -> int:
    """The deepest path through the schema in JSON levels, each `$ref` followed to its target (a cycle, a
    recursive schema, counts once). Stops counting past MAX_SCHEMA_DEPTH (raising)."""
    done: dict[int, int] = {}
    on_path: set[int] = set()

    def depth(node, level: int) -> int:
        if level > MAX_SCHEMA_DEPTH:
            raise ProxyTuneError(f"response_format: the JSON schema nests more than {MAX_SCHEMA_DEPTH} levels deep "
                                 f"(MAX_SCHEMA_DEPTH, counting through $ref): flatten it or shorten its $ref chains")
        if not isinstance(node, (dict, list)):
            return 0
        key = id(node)
        if key in done:
            return done[key]
        if key in on_path:  # recursion in the schema: llguidance expands it lazily
            return 0
        on_path.add(key)
        children = list(node.values()) if isinstance(node, dict) else list(node)
        if isinstance(node, dict) and isinstance(node.get("$ref"), str):
            target = _pointer(schema, node["$ref"])
            if target is not None:
                children.append(target)
        deepest = 1 + max((depth(child, level + 1) for child in children), default=0)
        on_path.discard(key)
        done[key] = deepest
        return deepest

    return depth(schema, 1)


def check_schema(schema) -> None:
    if isinstance(schema, dict):
        for name in ("$defs", "definitions"):
            defs = schema.get(name)
            if isinstance(defs, dict) and len(defs) > MAX_DEFINITIONS:
                raise ProxyTuneError(f"response_format: the JSON schema has {len(defs)} {name}; proxytune compiles "
                                     f"at most {MAX_DEFINITIONS} (MAX_DEFINITIONS)")
    schema_depth(schema)


_RULE = re.compile(r"^\s*[?!]?([A-Za-z_][A-Za-z0-9_]*)(?:\.-?\d+)?\s*:", re.MULTILINE)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STRINGS = re.compile(r'"(?:[^"\\\n]|\\.)*"|/(?:[^/\\\n]|\\.)+/[a-z]*|//[^\n]*')


def rule_depth(grammar: str) -> int:
    """The longest chain of Lark rules and terminals using one another (a cycle counts once), read from the
    grammar's definitions: `name: ...` starts one, the lines after it (`| ...`) continue it."""
    starts = list(_RULE.finditer(grammar))
    uses: dict[str, set[str]] = {}
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(grammar)
        body = _STRINGS.sub(" ", grammar[match.end():end])  # names inside literals and regexes are not rules
        uses.setdefault(match.group(1), set()).update(_NAME.findall(body))
    done: dict[str, int] = {}
    for root in uses:  # iterative depth-first search: the grammar may be hostile
        if root in done:
            continue
        stack = [(root, iter(sorted(uses[root])))]
        on_path = {root}
        while stack:
            name, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(name)
                done[name] = 1 + max((done.get(c, 0) for c in uses[name] if c in uses and c not in on_path),
                                     default=0)
                if done[name] > MAX_RULE_DEPTH:
                    return done[name]
            elif child in uses and child not in done and child not in on_path:
                stack.append((child, iter(sorted(uses[child]))))
                on_path.add(child)
                if len(stack) > MAX_RULE_DEPTH:
                    return len(stack)
    return max(done.values(), default=0)


def check_lark(grammar: str) -> None:
    depth = rule_depth(grammar)
    if depth > MAX_RULE_DEPTH:
        raise ProxyTuneError(f"response_format: the grammar chains more than {MAX_RULE_DEPTH} rules (MAX_RULE_DEPTH: "
                             f"a rule using a rule using a rule ...): shorten its chains")


def on_big_stack(function: Callable[[], T]) -> T:
    """function() on a thread with a COMPILE_STACK_BYTES stack; its result or its exception, here."""
    result: list = []

    def run():
        try:
            result.append((True, function()))
        except BaseException as error:  # handed to the caller's thread
            result.append((False, error))

    with _STACK_LOCK:  # threading.stack_size is process-wide: set it only for this thread's creation
        previous = threading.stack_size(COMPILE_STACK_BYTES)
        try:
            thread = threading.Thread(target=run, name="proxytune-grammar", daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value
