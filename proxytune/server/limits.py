"""What one request may be and ask: sizes checked before anything walks the body, and the work it may give
the engine and the response it may make, so that no request can stall or starve the others.

Bounds where OpenAI is silent or the server needs one: at most MAX_STOP stop strings of at most
MAX_STOP_CHARS characters each; bodies of at most MAX_BODY_BYTES, nested at most MAX_JSON_DEPTH deep; text
must be valid Unicode (a lone surrogate such as "\\ud800" is refused).

A request's work is bounded too, so that no request can stall or starve the others (each refused with a 400
naming its field and the limit): prompts of at most MAX_PROMPT_CHARS characters (all messages together) or a
context's worth of token ids each; rows x max_tokens <= MAX_ROW_TOKENS; rows x max_tokens x top-k of logprobs or
details <= MAX_DETAIL_ENTRIES (what a response carries); rows x the output format's bytes <= MAX_FORMAT_ROW_BYTES
(each row's grammar mask costs about that much tokenizer work per step); at most MAX_SCHEDULE_ENTRIES alpha_schedule entries and
MAX_LOGIT_BIAS logit_bias entries; output formats within engine/grammar_limits.py. Sizes are checked on the raw
JSON, before pydantic walks it.
"""
from __future__ import annotations

import asyncio
import json

from .api_errors import APIError, bad_request

MAX_TOP_LOGPROBS = 20
MAX_STOP = 16  # OpenAI allows 4; each is searched for in every row's new text
MAX_STOP_CHARS = 256
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 32  # the deepest OpenAI body (content parts of a message) is 5; a JSON schema may nest more
MAX_PROMPT_CHARS = 1 << 20  # ~0.75 s to tokenize (off the event loop; the tokenizer releases the GIL)
MAX_ROW_TOKENS = 16_384  # rows x max_tokens: n=16 x 1,024, n=32 x 512
MAX_DETAIL_ENTRIES = 65_536  # rows x max_tokens x k (top_logprobs / logprobs / details): ~10 MB of response at most
MAX_SCHEDULE_ENTRIES = 64  # each row looks its α up in the schedule at every step
MAX_LOGIT_BIAS = 1024  # OpenAI allows 300
MAX_MESSAGES = 1024
# rows x the output format's size: a row's grammar mask costs about its format's size in tokenizer work at each
# step (llguidance tokenizes what the format forces next: 16 KB took 6.7 ms per row per step), so n = 1 at the
# 16 KB format limit, n = 8 at 2 KB, n = 16 at 1 KB
MAX_FORMAT_ROW_BYTES = 16 * 1024
MAX_KEYS = 65_536  # object keys in a body, counted on the raw bytes: a million keys took 0.84 s to parse
BODY_TIMEOUT_S = 30.0  # to receive a whole body once its headers are in


async def read_body(request, limit: int = MAX_BODY_BYTES, timeout: float = BODY_TIMEOUT_S) -> bytes:
    """The body, read no further than `limit` bytes (413 beyond it, before the rest is even received) and
    within `timeout` seconds (408 after: a client that trickles its body holds no connection for long)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    try:
        return await asyncio.wait_for(_read(request, limit), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None


async def _read(request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, refused (400) when it is not JSON, nests deeper than MAX_JSON_DEPTH or
    holds text that is not valid Unicode (`check_tree`, called once the sizes are checked)."""
    keys = raw.count(b'":') - raw.count(b'\\":')  # a key ends in `":`; a quote inside a string is escaped
    if keys > MAX_KEYS:
        raise bad_request(f"the request body holds about {keys} object keys; this server takes at most {MAX_KEYS} "
                          f"(MAX_KEYS)")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad_request(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def check_tree(body: dict) -> None:
    """Depth and Unicode of every value, without recursion (the body may be hostile)."""
    stack = [(value, 1, key) for key, value in body.items()]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", field)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise bad_request(f"{field} holds text that is not valid Unicode ({error.reason} at character "
                                  f"{error.start}): send UTF-8 text", field) from None
        elif isinstance(value, dict):
            for key, item in value.items():  # JSON keys are strings: checked as text too
                stack += [(key, depth + 1, field), (item, depth + 1, field)]
        elif isinstance(value, list):
            stack.extend((item, depth + 1, field) for item in value)


def too_much(field: str, what: str, limit: int, name: str, code: str | None = None) -> APIError:
    return bad_request(f"{field} {what}; this server takes at most {limit} ({name}): split the request", field, code)


def check_sizes(raw: dict, max_rows: int, context: int | None) -> None:
    """The sizes of what pydantic would walk, from the raw JSON: a hostile body costs len() calls, no more."""
    prompt = raw.get("prompt")
    if isinstance(prompt, list):
        lists = [p for p in prompt if isinstance(p, list)] if prompt and isinstance(prompt[0], list) else [prompt]
        if len(prompt) > max_rows:
            raise too_much("prompt", f"holds {len(prompt)} prompts", max_rows, "--max-batch")
        longest = max((len(p) for p in lists), default=0)
        if context and longest > context:
            raise bad_request(f"prompt has {longest} token ids; the context holds {context}", "prompt",
                              "context_length_exceeded")
        texts = [p for p in prompt if isinstance(p, str)]
    else:
        texts = [prompt] if isinstance(prompt, str) else []
    messages = raw.get("messages")
    if isinstance(messages, list):
        if len(messages) > MAX_MESSAGES:
            raise too_much("messages", f"holds {len(messages)} messages", MAX_MESSAGES, "MAX_MESSAGES")
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            texts += [content] if isinstance(content, str) else [
                part.get("text") for part in content or [] if isinstance(part, dict)] if isinstance(content, list) else []
    chars = sum(len(t) for t in texts if isinstance(t, str))
    if chars > MAX_PROMPT_CHARS:
        raise too_much("messages" if messages is not None else "prompt", f"holds {chars} characters",
                       MAX_PROMPT_CHARS, "MAX_PROMPT_CHARS", "context_length_exceeded")
    for field, limit, name in (("alpha_schedule", MAX_SCHEDULE_ENTRIES, "MAX_SCHEDULE_ENTRIES"),
                               ("logit_bias", MAX_LOGIT_BIAS, "MAX_LOGIT_BIAS")):
        value = raw.get(field)
        if isinstance(value, dict) and len(value) > limit:
            raise too_much(field, f"has {len(value)} entries", limit, name)


def check_work(params, rows: int, response_format) -> None:
    """What the request (schemas.Params, and its response_format before it is compiled) asks the engine to do
    and the server to send back, against the budget."""
    field = "max_completion_tokens" if params.kind == "chat" and params.max_tokens_given else "max_tokens"
    if rows * params.max_tokens > MAX_ROW_TOKENS:
        raise too_much(field, f"x {rows} rows is {rows * params.max_tokens} tokens to generate", MAX_ROW_TOKENS,
                       "MAX_ROW_TOKENS")
    size = len(json.dumps(response_format)) if isinstance(response_format, dict) else 0
    if response_format and response_format.get("type") not in (None, "text") and rows * size > MAX_FORMAT_ROW_BYTES:
        raise too_much("response_format", f"of {size} bytes x {rows} rows is {rows * size} bytes of grammar to "
                       f"follow at every step", MAX_FORMAT_ROW_BYTES, "MAX_FORMAT_ROW_BYTES (fewer rows or a smaller "
                       "format)")
    k = max(params.top_logprobs if params.logprobs else 0, params.details)
    if rows * params.max_tokens * k > MAX_DETAIL_ENTRIES:
        raise too_much("details" if params.details >= params.top_logprobs else "top_logprobs",
                       f"x {rows} rows x {params.max_tokens} tokens is {rows * params.max_tokens * k} entries to "
                       f"send back", MAX_DETAIL_ENTRIES, "MAX_DETAIL_ENTRIES")
