"""One call to a remote model's /v1/completions or /v1/chat/completions, as the decoding makes it.

Greedy calls (temperature 0, special tokens held back by hold_eos) give the next-token top-k; drafting
calls let the server continue on its own; every decoding call's time is added to the span the stats
report. llama.cpp applies a repeat penalty and more to its own continuation unless told not to: drafting
calls switch those off (`sampler_fields`) until a server refuses the fields.
"""
from __future__ import annotations

import logging
import time

from .http import OpenAIClient, RemoteRefusal, RemoteSourceError
from .spec import RemoteOptions
from .stats import COUNTING

log = logging.getLogger("proxytune.remote")

LLAMA_CPP_SAMPLERS_OFF = {"repeat_penalty": 1.0, "min_p": 0.0, "typical_p": 1.0}  # its defaults: 1.1, 0.05, 1.0


class Completions:
    """The calls of one source (`name`: its role) to `model` on the server behind `client`."""

    def __init__(self, client: OpenAIClient, options: RemoteOptions, name: str, model: str | None,
                 logit_bias: dict[str, int]):
        self.client, self.options, self.name, self.model = client, options, name, model
        self.logit_bias = logit_bias
        self.sampler_fields = options.sampler_fields  # turned off when the server refuses them
        self.span: list[float] = []  # [start of the first decoding call, end of the last]

    @property
    def seconds(self) -> float:
        return self.span[1] - self.span[0] if self.span else 0.0

    def complete(self, prompt, echo: bool = False, logprobs: int | None = None, max_tokens: int = 1,
                 sampling: tuple[float, int] | None = None) -> dict:
        """One /v1/completions call. Greedy (temperature 0, the special tokens held back by hold_eos) unless
        `sampling` = (temperature, seed): then the server samples from its top_k with nothing else in the way
        (no logit_bias; with sampler_fields, llama.cpp's other samplers switched off)."""
        payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "echo": echo,
                   "logprobs": self.options.top_k if logprobs is None else logprobs, "stream": False}
        if self.model:
            payload["model"] = self.model
        if sampling is not None:
            temperature, seed = sampling
            payload.update(temperature=float(temperature), top_k=self.options.top_k, top_p=1.0, seed=seed)
        elif self.logit_bias:
            payload["logit_bias"] = self.logit_bias
        drafting = max_tokens > 1 or sampling is not None  # the server's own continuation matters
        if drafting and self.sampler_fields:
            payload.update(LLAMA_CPP_SAMPLERS_OFF)
        if self.options.token_ids:
            payload["return_tokens_as_token_ids"] = True
        answer = self.timed(self.post_drafting if drafting else self.client.post, "completions", payload)
        try:
            choice = answer["choices"][0]
            if not isinstance(choice.get("logprobs"), dict):
                raise KeyError("logprobs")
        except (KeyError, IndexError, TypeError):
            raise RemoteSourceError(f"{self.name} model at {self.client.url('completions')} answered without "
                                    f"logprobs ({str(answer)[:200]}); does the server support logprobs?") from None
        return choice

    def chat_top(self, messages: list[dict]) -> dict[str, float]:
        """The top-k of the first reply token to a conversation (text -> logprob), through
        /v1/chat/completions. One call."""
        payload = {"messages": messages, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                   "top_logprobs": self.options.top_k, "stream": False}
        if self.model:
            payload["model"] = self.model
        if self.logit_bias:
            payload["logit_bias"] = self.logit_bias
        answer = self.timed(self.client.post, "chat/completions", payload)
        try:
            entry = answer["choices"][0]["logprobs"]["content"][0]
            top: dict[str, float] = {}
            for item in entry["top_logprobs"]:  # best first; a text shown twice keeps its first (best) value
                top.setdefault(item["token"], item["logprob"])
        except (KeyError, IndexError, TypeError):
            raise RemoteSourceError(f"{self.name} model at {self.client.url('chat/completions')} answered without "
                                    f"top_logprobs ({str(answer)[:200]}); does it support logprobs?") from None
        return top

    def timed(self, post, path: str, payload: dict) -> dict:
        """A decoding call, its time added to the span `stats.seconds` measures."""
        start = time.perf_counter()
        try:
            return post(path, payload)
        finally:
            with COUNTING:
                self.span = [self.span[0] if self.span else start, time.perf_counter()]

    def post_drafting(self, path: str, payload: dict) -> dict:
        """A drafting call; a server that refuses the llama.cpp sampler fields gets the call again without them
        (and never again with them)."""
        try:
            return self.client.post(path, payload)
        except RemoteRefusal:
            if not self.sampler_fields:
                raise
            answer = self.client.post(path, {k: v for k, v in payload.items() if k not in LLAMA_CPP_SAMPLERS_OFF})
            self.sampler_fields = False
            log.info("the %s model's server refused llama.cpp's sampler fields; sending none from now on", self.name)
            return answer
