"""Request bodies of /v1/completions and /v1/chat/completions -> checked parameters -> engine Requests.

Every mistake is a 400 naming the parameter, the way OpenAI reports it. Two extension fields, sent
by the openai client through `extra_body`: `alpha` (a number, or one per expert pair) and
`proxy: false` (the base model alone, i.e. alpha = 0: for A/B comparisons).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Sequence

from ..engine.decoding import Request
from ..errors import ProxyTuneError
from ..facade.tuner import check_alpha
from ..engine.sampling import SamplingParams
from .api_errors import APIError, bad_request

MAX_TOP_LOGPROBS = 20
UNSUPPORTED = ("logit_bias", "presence_penalty", "frequency_penalty", "suffix", "tools", "functions",
               "response_format", "best_of")
NEUTRAL = {"best_of": (None, 1), "response_format": (None, {"type": "text"})}  # values that change nothing


@dataclass
class Params:
    kind: str  # "chat" | "completion"
    model: str
    prompts: list  # completion: one str or list[int] per prompt; chat: [messages]
    n: int
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    echo: bool
    alpha: float | list[float] | None  # None: the server's default
    max_tokens_given: bool = False  # asked for explicitly: refused when prompt + max_tokens overflow the context


@dataclass
class PromptRows:
    """One prompt of a request and its n choices, as engine requests."""
    prompt_ids: list[int]  # the base model's prompt tokens
    text: str  # the prompt as text (echo)
    requests: list[Request]


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _integer(body: dict, name: str, default, low: int, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        limits = f"between {low} and {high}" if high is not None else f">= {low}"
        raise bad_request(f"{name} must be {limits}, got {value}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {value!r}", name)
    if value < low or value > high or (low_open and value == low):
        raise bad_request(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request(f"stop must be a string or a list of strings, got {stop!r}", "stop")
    return tuple(s for s in stop if s)


def _alpha(body: dict, n_pairs: int):
    if body.get("proxy") is not None and not isinstance(body["proxy"], bool):
        raise bad_request(f"proxy must be true or false, got {body['proxy']!r}", "proxy")
    alpha = body.get("alpha")
    if body.get("proxy") is False:
        return [0.0] * n_pairs  # the base model alone: z = z_base exactly
    if alpha is None:
        return None
    values = alpha if isinstance(alpha, list) else [alpha]
    if not values:
        raise bad_request(f"alpha must be a finite number or a list of them, got {alpha!r}", "alpha")
    for value in values:
        try:
            check_alpha(value)  # the library's own check: finite, and finite in float32 where it is used
        except ProxyTuneError as error:
            raise bad_request(f"{error} (alpha: a number or one per expert pair)", "alpha") from None
    if isinstance(alpha, list) and len(alpha) != n_pairs:
        raise bad_request(f"alpha has {len(alpha)} values for {n_pairs} expert pairs", "alpha")
    return [float(a) for a in alpha] if isinstance(alpha, list) else float(alpha)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object with role and content", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text can reach a text model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str) or message.get("role") not in ("system", "user", "assistant", "developer"):
            raise bad_request(f"messages[{i}] needs a role (system, user, assistant) and string content, "
                              f"got {message!r}", "messages")
        plain.append({"role": "system" if message["role"] == "developer" else message["role"], "content": content})
    return plain


def _prompts(body: dict) -> list:
    prompt = body.get("prompt")
    is_ids = lambda value: isinstance(value, list) and value and all(  # noqa: E731
        isinstance(t, int) and not isinstance(t, bool) for t in value)
    if isinstance(prompt, str) or is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        return list(prompt)
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of such lists "
                      "(none of them empty)", "prompt")


def parse(body: dict, kind: str, served_names: Sequence[str], n_pairs: int, max_rows: int,
          context: int | None, default_max_tokens: int) -> Params:
    """Check every field of a completions (kind="completion") or chat (kind="chat") body."""
    model = body.get("model")
    if model is not None and model not in served_names:
        raise bad_request(f"unknown model {model!r}; this server serves {', '.join(served_names)}", "model",
                          "model_not_found")
    for name in UNSUPPORTED:
        if body.get(name) not in NEUTRAL.get(name, (None, 0, {}, [])):
            raise bad_request(f"{name} is not supported by proxytune serve", name)
    prompts = [_messages(body)] if kind == "chat" else _prompts(body)
    echo = kind == "completion" and _boolean(body, "echo", False)
    token_limit = context or 1_000_000
    max_tokens = _integer(body, "max_completion_tokens", None, 1, token_limit) if kind == "chat" else None
    given = max_tokens is not None or body.get("max_tokens") is not None
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", default_max_tokens, 0 if echo else 1, token_limit)
    n = _integer(body, "n", 1, 1, max_rows)
    if n * len(prompts) > max_rows:
        raise bad_request(f"{len(prompts)} prompts x n={n} is more than the {max_rows} rows this server decodes "
                          f"at once", "n")
    if kind == "chat":
        logprobs = _boolean(body, "logprobs", False)
        top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top_logprobs and not logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    else:
        top_logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        logprobs = top_logprobs is not None
        top_logprobs = top_logprobs or 0
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise bad_request("stream_options is only allowed with stream: true, as an object", "stream_options")
    include_usage = bool(options) and _boolean(options, "include_usage", False)
    if stream and echo and logprobs:
        raise bad_request("echo with logprobs is not available while streaming; use stream: false", "echo")
    try:
        sampling = SamplingParams(_number(body, "temperature", 1.0, 0.0, 2.0),
                                  _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
                                  _integer(body, "top_k", 0, 0), _number(body, "min_p", 0.0, 0.0, 1.0))
    except ProxyTuneError as error:
        raise bad_request(str(error)) from None
    seed = _integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1)
    return Params(kind, model or served_names[0], prompts, n, max_tokens, sampling, _stop(body), seed, stream,
                  include_usage, logprobs, top_logprobs, echo, _alpha(body, n_pairs), given)


def build(tuner, params: Params, chat_roles: Sequence[str]) -> list[PromptRows]:
    """Engine requests: n rows per prompt; choice i is seeded with seed + i (as ProxyTuner.generate)."""
    details = params.top_logprobs if params.logprobs else 0
    options = dict(max_new_tokens=max(params.max_tokens, 1), temperature=params.sampling.temperature,
                   top_p=params.sampling.top_p, top_k=params.sampling.top_k, min_p=params.sampling.min_p,
                   stop=list(params.stop), alpha=params.alpha, return_details=details)
    rows = []
    for i, prompt in enumerate(params.prompts):
        try:
            if params.kind == "chat":
                first = tuner.request(messages=prompt, chat_roles=chat_roles, label="messages", **options)
            elif isinstance(prompt, str):
                first = tuner.request(prompt, label=f"prompt {i}" if len(params.prompts) > 1 else "prompt", **options)
            else:
                # the options are checked by tuner.request on a stand-in prompt, then the ids replace it
                first = token_request(tuner, prompt, tuner.request("x", **options))
        except ProxyTuneError as error:
            code = "context_length_exceeded" if "context" in str(error) else None
            raise bad_request(str(error), "messages" if params.kind == "chat" else "prompt", code) from None
        if params.max_tokens_given:
            check_room(tuner, first, params)
        if params.seed is None:
            choices = [first] + [dataclasses.replace(first) for _ in range(params.n - 1)]
        else:
            choices = [dataclasses.replace(first, seed=params.seed + c) for c in range(params.n)]
        ids = first.prompts["base"]
        text = prompt if isinstance(prompt, str) else tuner.tokenizer.decode(ids) if params.kind == "completion" else ""
        rows.append(PromptRows(ids, text, choices))
    return rows


def check_room(tuner, request: Request, params: Params) -> None:
    """As OpenAI does: a max_tokens that the context cannot hold after the prompt is refused, not cut short."""
    for role, source in tuner.sources.items():
        prompt = len(request.prompts[role])
        if source.max_length and prompt + params.max_tokens > source.max_length:
            field = "max_completion_tokens" if params.kind == "chat" else "max_tokens"
            raise bad_request(f"the {role} model's context holds {source.max_length} tokens, but you asked for "
                              f"{prompt + params.max_tokens} ({prompt} in the prompt, {params.max_tokens} to "
                              f"generate); lower {field} to at most {max(source.max_length - prompt, 0)} or "
                              f"shorten the prompt", field, "context_length_exceeded")


def token_request(tuner, ids: list[int], template: Request) -> Request:
    """A request over a prompt given as token ids (lm-eval's tokenized requests): every role gets them."""
    if any(t < 0 or t >= tuner.vocab_size for t in ids):
        raise ProxyTuneError(f"prompt token ids must be in [0, {tuner.vocab_size})")
    for role, source in tuner.sources.items():
        if source.max_length and len(ids) >= source.max_length:
            raise ProxyTuneError(f"prompt has {len(ids)} tokens for the {role} model, whose context holds "
                                 f"{source.max_length}; shorten it to leave room for new tokens")
    return dataclasses.replace(template, prompts={role: list(ids) for role in tuner.roles})


def context_length(tuner) -> int | None:
    limits = [s.max_length for s in tuner.sources.values() if s.max_length]
    return min(limits) if limits else None


def check_body_size(raw: bytes, limit: int = 16 * 1024 * 1024) -> None:
    if len(raw) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes")
