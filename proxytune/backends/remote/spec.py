"""The `openai:` model spec: where a remote model lives and how to talk to it.

    openai:http://127.0.0.1:8080/v1?tokenizer=smollm2-135m-instruct&top_k=20

Everything after `openai:` is the server's OpenAI base URL; query parameters are proxytune's
options (they are not sent to the server). The API key is never part of the spec: it is read from
the environment variable named by `key_env` (default PROXYTUNE_API_KEY).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ...errors import ProxyTuneError

PREFIX = "openai:"
DEFAULT_KEY_ENV = "PROXYTUNE_API_KEY"

OPTION_HELP = {
    "tokenizer": "local spec of the remote model's own tokenizer (registry name, model dir, .gguf); required",
    "model": "model name sent to the server (default: the first one /v1/models lists)",
    "top_k": "logprobs per step the server returns: the candidate set (default 20; OpenAI allows 5)",
    "key_env": f"environment variable holding the API key (default {DEFAULT_KEY_ENV})",
    "timeout": "seconds to wait for one answer (default 120)",
    "connect_timeout": "seconds to wait for a connection (default 5)",
    "tries": "attempts per call, first included (default 4)",
    "backoff": "seconds before the first retry, doubling with jitter (default 0.5)",
    "max_backoff": "longest single wait, Retry-After included (default 20)",
    "context": "context length in tokens (default: max_model_len from /v1/models when given)",
    "concurrency": "rows of a batch in flight at once (default 8)",
    "api": "completions | chat: the endpoint the server has (default completions); a chat-only model cannot "
           "continue a partial reply, so it serves `choose` (one-token answers, the paper's GPT-3.5 setting), "
           "not generation",
    "chunk": "tokens the base drafts per call when it is the base: auto (adapts to the acceptance and the "
             "measured costs; default), N (at most N), 0 (one call per token, no drafting)",
    "sample_drafts": "1: sampling rows draft by the server's own sampling (temperature, top_k = top_k), exact only "
                     "with token_ids=1; default 0: the server's greedy tokens are the drafts (exact on any server)",
    "sampler_fields": "1: with sample_drafts, also send llama.cpp/vLLM fields that switch their other samplers off "
                      "(min_p 0, repeat_penalty 1; default 1); 0 for servers that refuse fields beyond OpenAI's",
    "echo": "1: score a sequence's tokens with one echo call (servers with prompt logprobs: scoring, multi-token "
            "options, the server's echo; default 0: one call per scored token)",
    "send_ids": "1: send token ids instead of text (vLLM, OpenAI; no re-tokenisation at all; default 0)",
    "token_ids": "1: ask for 'token_id:N' keys (vLLM return_tokens_as_token_ids; default 0)",
    "hold_eos": "1: logit_bias −100 on special tokens so the server never stops and every step "
                "returns logprobs (needs raw logprobs, as llama.cpp and vLLM give; default 1)",
    "empty": "eos | drop: what a \"\" top-k key means (llama.cpp renders special tokens as \"\"; default eos)",
    "eos_rank": "with empty=eos: a \"\" key counts as EOS only among the first N entries (default 3)",
    "drift": "warn | error | off: when re-tokenising the sent text would change the tokens (default warn)",
    "verify": "1: check local vs server tokenization at start-up (default 1)",
}


@dataclass(frozen=True)
class RemoteOptions:
    base_url: str
    tokenizer: str
    model: str | None = None
    top_k: int = 20
    key_env: str = DEFAULT_KEY_ENV
    timeout: float = 120.0
    connect_timeout: float = 5.0
    tries: int = 4
    backoff: float = 0.5
    max_backoff: float = 20.0
    context: int | None = None
    concurrency: int = 8
    api: str = "completions"
    chunk: str = "auto"
    sample_drafts: bool = False
    sampler_fields: bool = True
    echo: bool = False
    send_ids: bool = False
    token_ids: bool = False
    hold_eos: bool = True
    empty: str = "eos"
    eos_rank: int = 3
    drift: str = "warn"
    verify: bool = True

    @property
    def chunk_limit(self) -> int | None:
        """The most tokens one call drafts: None = adaptive, 0 = no drafting."""
        return None if self.chunk == "auto" else int(self.chunk)

    @property
    def policy(self):
        from .http import RetryPolicy  # httpx only when a remote model is used

        return RetryPolicy(self.tries, self.backoff, self.max_backoff, self.timeout, self.connect_timeout)

    @property
    def root_url(self) -> str:
        """The server root, where non-OpenAI extras live (/extras/tokenize, /tokenize)."""
        parts = urlsplit(self.base_url)
        path = parts.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[:-3]
        return urlunsplit((parts.scheme, parts.netloc, path, "", ""))

    def api_key(self) -> str | None:
        return os.environ.get(self.key_env) or None


def is_remote_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def _convert(name: str, kind, value: str):
    try:
        if kind is bool or kind == "bool":
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return value.lower() in ("1", "true", "yes")
        if "int" in str(kind):
            return int(value)
        if "float" in str(kind):
            return float(value)
    except ValueError:
        raise ProxyTuneError(f"openai spec option {name}={value!r} is not a valid {kind}") from None
    return value


def parse_spec(spec: str) -> RemoteOptions:
    if not is_remote_spec(spec):
        raise ProxyTuneError(f"{spec!r} is not an openai: spec")
    url = spec[len(PREFIX):]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ProxyTuneError(f"openai spec needs an http(s) URL after 'openai:', e.g. "
                             f"openai:http://127.0.0.1:8080/v1?tokenizer=NAME; got {url!r}")
    if parts.username or parts.password:
        raise ProxyTuneError("put no credentials in the URL: set the API key in an environment variable "
                             f"({DEFAULT_KEY_ENV}, or the one named by key_env=)")
    types = {f.name: f.type for f in fields(RemoteOptions)}
    values: dict = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in ("api_key", "key"):
            raise ProxyTuneError(f"never put an API key in a model spec; export it as {DEFAULT_KEY_ENV} "
                                 f"(or name another variable with key_env=)")
        if name not in OPTION_HELP:
            raise ProxyTuneError(f"unknown openai spec option {name!r}; known: {', '.join(OPTION_HELP)}")
        values[name] = _convert(name, types[name], value)
    if "tokenizer" not in values:
        raise ProxyTuneError("an openai: spec needs tokenizer=LOCAL_SPEC (the remote model's own tokenizer as a "
                             "registered name, model directory or .gguf file): proxy-tuning adds logits by token id, "
                             "and the server only returns token strings")
    if values.get("empty", "eos") not in ("eos", "drop"):
        raise ProxyTuneError("openai spec option empty= must be eos or drop")
    if values.get("drift", "warn") not in ("warn", "error", "off"):
        raise ProxyTuneError("openai spec option drift= must be warn, error or off")
    if values.get("api", "completions") not in ("completions", "chat"):
        raise ProxyTuneError("openai spec option api= must be completions or chat")
    chunk = values.get("chunk", "auto")
    if chunk != "auto" and not (chunk.isdigit() and int(chunk) <= 64):
        raise ProxyTuneError(f"openai spec option chunk= must be auto, 0 (no drafting) or a number of tokens up to 64, "
                             f"got {chunk!r}")
    if values.get("sample_drafts") and not values.get("token_ids"):
        raise ProxyTuneError("openai spec option sample_drafts=1 needs token_ids=1: a sampled draft is exact only when "
                             "the server names every token by its id (vLLM return_tokens_as_token_ids)")
    for name in ("top_k", "tries", "concurrency"):
        if values.get(name, 1) < 1:
            raise ProxyTuneError(f"openai spec option {name}= must be >= 1")
    base_url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return RemoteOptions(base_url=base_url, **values)
