"""Response bodies and stream chunks shaped exactly as OpenAI sends them.

Chat: `chat.completion` / `chat.completion.chunk` (first chunk carries the role, the last an empty
delta with the finish_reason). Completions: `text_completion` for both. A stream ends with
`data: [DONE]`; with stream_options.include_usage every chunk has "usage": null and one last chunk
with no choices carries the usage. Log-probabilities are those of the combined (proxy-tuned)
distribution p̃ = softmax(z_base + α(z_expert − z_anti_expert)), before any sampling warper.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"


DONE = "data: [DONE]\n\n"


class TokenStrings:
    """The text of single tokens, cached (token strings repeat a lot in logprobs)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]


@dataclass
class TokenLogprob:
    """One position: the token, its log p̃, and the best alternatives (log p̃, best first)."""
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None = None


IMPOSSIBLE = -9999.0  # OpenAI's logprob for a token that cannot occur; JSON has no -Infinity


def json_logprob(logprob: float | None) -> float | None:
    """A log-probability JSON can carry: −inf (a token outside a remote base's top-k) becomes IMPOSSIBLE."""
    if logprob is None:
        return None
    return logprob if logprob > IMPOSSIBLE else IMPOSSIBLE


def chat_logprobs(positions: list[TokenLogprob], text_of: TokenStrings) -> dict:
    def entry(token_id, logprob):
        text = text_of(token_id)
        return {"token": text, "logprob": json_logprob(logprob), "bytes": list(text.encode("utf-8"))}

    content = [{**entry(p.token_id, p.logprob), "top_logprobs": [entry(t, lp) for t, lp in p.top or []]}
               for p in positions]
    return {"content": content, "refusal": None}


def completion_logprobs(positions: list[TokenLogprob], text_of: TokenStrings, offset: int = 0) -> dict:
    tokens, offsets = [], []
    for p in positions:
        offsets.append(offset)
        tokens.append(text_of(p.token_id))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [json_logprob(p.logprob) for p in positions],
            "top_logprobs": [None if p.top is None else top_by_text(p.top, text_of) for p in positions],
            "text_offset": offsets}


def top_by_text(top: list[tuple[int, float]], text_of: TokenStrings) -> dict[str, float]:
    # Legacy completions key alternatives by text; tokens that print alike (partial UTF-8) keep the best.
    best: dict[str, float] = {}
    for token_id, logprob in top:
        best.setdefault(text_of(token_id), json_logprob(logprob))
    return best


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Shape:
    """The fixed parts of one response: id, creation time, model, chat or completion."""
    kind: str  # "chat" | "completion"
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or new_id("chatcmpl" if self.kind == "chat" else "cmpl")

    def response(self, choices: list[dict], usage_: dict) -> dict:
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, "usage": usage_}

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None,
               details: list | None = None) -> dict:
        if self.kind == "chat":
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return choice if details is None else {**choice, "proxytune": details}

    def chunk(self, choices: list[dict], with_usage: bool, usage_: dict | None = None) -> str:
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        payload = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                   "system_fingerprint": None, "choices": choices}
        if with_usage:
            payload["usage"] = usage_
        return sse(payload)

    def chunk_choice(self, index: int, text: str | None, finish_reason: str | None = None,
                     logprobs: dict | None = None, role: bool = False, details: list | None = None) -> dict:
        if self.kind == "chat":
            delta = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", **delta}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return choice if details is None else {**choice, "proxytune": details}


def public_finish_reason(reason: str | None) -> str | None:
    return "stop" if reason == "cancelled" else reason


def token_details(detail, text_of: TokenStrings) -> dict:
    """The "proxytune" extension of one generated token (`details`): each role's top tokens with their
    probabilities and the probability each role gave the chosen token ("proxy": the combined distribution)."""
    return {"token": text_of(detail.token_id), "token_id": detail.token_id,
            "chosen": {role: p for role, p in detail.chosen_prob.items()},
            "top": {role: [[text_of(t), p] for t, p in top] for role, top in detail.top.items()}}
