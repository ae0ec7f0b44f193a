"""Requests for these models: each role's prompt ids, and a request's settings made concrete for the trio.

`Settings` are made at the edges and checked there (engine/settings.py); what only the loaded models can
settle happens here, once per request: the tuner's default α where the request names none, α per pair,
`alone` among the roles, logit_bias ids within the vocabulary, the output format bound to the decoding's
vocabulary (compiled once per format), and whether the prompt fits every role's context.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from ..engine.bytelevel import END_OF_TEXT, token_bytes
from ..engine.context import check_prompt_room
from ..engine.prompts import chat_prompt_ids, chat_role_kinds, validate_messages
from ..engine.settings import Settings
from ..engine.shaping import Grammar, bind_grammar, vocabulary
from ..errors import ProxyTuneError
from .bytes import check_prompt_bytes

MAX_GRAMMARS = 64  # bound formats kept (a server compiles a request's format once for all its rows)


class Formats:
    """Output formats bound to the decoding's vocabulary, kept by llguidance grammar text."""

    def __init__(self, tuner):
        self.tuner = tuner
        self.bound: dict[tuple[str, str], Grammar] = {}
        self._tokens = None

    def bind(self, grammar: Grammar) -> Grammar:
        key = (grammar.kind, grammar.text)
        if key not in self.bound:
            if len(self.bound) >= MAX_GRAMMARS:
                self.bound.clear()
            self.bound[key] = bind_grammar(grammar, self.tokens)
        return self.bound[key]

    @property
    def tokens(self):
        """The decoding's vocabulary for grammars: bytes per token id (the 256 bytes and the end of text when
        decoding byte by byte), built once (about a second for 150k tokens)."""
        if self._tokens is None:
            tuner = self.tuner
            if tuner.byte_level:
                table = [bytes([b]) for b in range(END_OF_TEXT)] + [b""]
            else:
                table = token_bytes(tuner.tokenizer, "base")[:tuner.vocab_size]
                table += [b""] * (tuner.vocab_size - len(table))
            encode = lambda text: tuner.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
            self._tokens = vocabulary(table, sorted(tuner.eos_token_ids), encode)
        return self._tokens


def settle(tuner, settings: Settings) -> Settings:
    """The settings as a `Request` holds them for this trio (see the module's docstring)."""
    resolved = settings.resolved(tuner.alphas, tuner.roles)
    shaping = resolved.shaping
    for token, _ in shaping.logit_bias:
        if token >= tuner.vocab_size:
            raise ProxyTuneError(f"logit_bias names token {token}, but the vocabulary has {tuner.vocab_size}")
    if tuner.byte_level and shaping.on_tokens:
        raise ProxyTuneError("repetition/frequency/presence penalties and logit_bias count and name token ids, and "
                             "these roles are combined byte by byte (their vocabularies differ): leave them out "
                             "(response_format works at the byte level)")
    if shaping.grammar is not None:
        resolved = resolved.but(shaping=dataclasses.replace(shaping, grammar=tuner.formats.bind(shaping.grammar)))
    return resolved


def prompt_ids(tuner, prompt: str | None, messages, chat_roles: Sequence[str], label: str) -> dict[str, list[int]]:
    """Each role's prompt: a raw prompt for every role, or a conversation formatted per role (encoded once per
    distinct tokenizer and template use, not once per role)."""
    if messages is not None:
        messages = validate_messages(messages)
        chat_roles = chat_role_kinds(chat_roles)
        check_length(tuner, sum(len(m["content"]) for m in messages), label)
        encode = lambda role: chat_prompt_ids(tuner.tokenizers[role], messages,  # noqa: E731
                                              tuner.schema.kind(role) in chat_roles)
        key = lambda role: (id(tuner.tokenizers[role]), tuner.schema.kind(role) in chat_roles)  # noqa: E731
    else:
        if not isinstance(prompt, str):
            raise ProxyTuneError(f"prompts must be strings, got {type(prompt).__name__}")
        check_length(tuner, len(prompt), label)
        encode = lambda role: tuner.encode(prompt, role)  # noqa: E731
        key = lambda role: id(tuner.tokenizers[role])  # noqa: E731
    encoded: dict = {}
    prompts = {}
    for role in tuner.roles:
        if key(role) not in encoded:
            encoded[key(role)] = encode(role)
        prompts[role] = list(encoded[key(role)])
    if any(not ids for ids in prompts.values()):
        raise ProxyTuneError(f"{label} is empty: give at least one token of text")
    check_prompt_room(prompts, tuner.sources, label)
    if tuner.byte_level:
        for role, ids in prompts.items():
            check_prompt_bytes(tuner.tokenizers[role], ids, prompt if messages is None else str(messages), role, label)
    return prompts


def check_length(tuner, characters: int, label: str) -> None:
    """Refuse, before tokenizing it, a text that no tokenization could fit in a role's context (twice
    context x the longest token in characters: never a text that fits)."""
    for role, source in tuner.sources.items():
        if source.max_length and characters > 2 * source.max_length * tuner.longest_token[role]:
            raise ProxyTuneError(f"{label} has {characters} characters, far more than the {role} model's context "
                                 f"of {source.max_length} tokens can hold; shorten it")
