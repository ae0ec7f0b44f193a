"""What a request asks of the combined logits before a token is chosen: OpenAI's penalties and logit_bias,
and an output format (a JSON schema, a regex, a grammar) that the text must follow.

All of it acts on the *combined* logits z = z_base + Σ α (z_expert − z_anti_expert), per row, in this order:
logit_bias is added; the repetition penalty (transformers' processor: a positive logit divided by it, a
negative one multiplied) over the prompt's and the generated tokens; z[t] −= frequency · count(t) +
presence · [count(t) > 0] over the generated tokens (OpenAI's definition); then every token the grammar
does not allow next becomes −inf. Temperature, top-k/p and min-p come after, as in transformers. The
log-probabilities reported (`Event.logprob`, details, `score`) stay those of the unshaped combined
distribution, what the proxy-tuned model itself thinks (vLLM's "raw" logprobs).

Grammars are llguidance's (MIT, a Rust library with a CPU-only wheel and no dependencies; it is what
vLLM, SGLang and llama.cpp use): a JSON schema, a regex or a Lark grammar is compiled once per request,
and a matcher per row computes the allowed-token bitmask at each step (micro- to milliseconds for a
150k vocabulary). Drafted decodings (speculative, chunked) shape every verified position with the
drafts before it fed to the matcher and penalties, then roll the matcher back, so their outputs stay
those of plain decoding; speculative drafts are shaped too, which keeps them acceptable.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from ..errors import FormatLimit, ProxyTuneError
from .grammar_limits import MAX_SCHEMA_DEPTH, check_lark, check_schema, check_size, on_big_stack

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "lark")
# Whitespace allowed between JSON tokens: up to two spaces, or a line break and up to 32 spaces or tabs of
# indentation. llguidance's default (any run of whitespace) lets a model loop on blanks until max_tokens (the
# tiny test models did at once); this one still takes compact and pretty-printed JSON. A schema with its own
# "x-guidance" options (e.g. {"whitespace_flexible": false}) gets llguidance's defaults under them instead.
JSON_OPTIONS = {"whitespace_pattern": r"[ \t]{0,2}(\r?\n[ \t]{0,32})?"}


def vocabulary(table: Sequence[bytes], eos_ids: Sequence[int], encode: Callable[[str], list[int]]):
    """The decoding's vocabulary as llguidance sees it: the bytes of every token id (b"" for special tokens,
    which a grammar never allows), the end-of-text ids (allowed once the grammar may end) and the tokenizer."""
    import llguidance

    class Tokens:  # what llguidance.TokenizerWrapper reads
        eos_token_id = min(eos_ids)
        bos_token_id = None
        tokens = list(table)
        special_token_ids = [i for i, piece in enumerate(table) if not piece]

        def __call__(self, text):
            return encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Tokens()), n_vocab=len(table),
                                  eos_token=sorted(eos_ids))


@dataclass(frozen=True)
class Grammar:
    """An output format compiled for one vocabulary: every row that uses it gets a matcher of its own, a copy
    of `template` (built with the grammar, off the engine thread: building one costs up to a second)."""
    kind: str  # one of GRAMMAR_KINDS
    text: str  # llguidance's grammar
    tokens: object  # llguidance.LLTokenizer of the decoding's vocabulary
    template: object = None  # llguidance.LLMatcher at the start of the text

    def matcher(self):
        import llguidance

        if self.template is not None:
            return self.template.deep_copy()
        return llguidance.LLMatcher(self.tokens, self.text, log_level=0)


def compile_grammar(kind: str, value, tokens=None) -> Grammar:
    """A grammar from a JSON schema (a dict or its JSON text), any JSON object (`json_object`), a regex or a
    Lark grammar; an invalid one, one past the compiler's limits (grammar_limits.py) or one that allows no text
    at all is refused with the reason. tokens=None: only checked (before a vocabulary is loaded); the Grammar
    cannot make matchers."""
    if kind not in GRAMMAR_KINDS:
        raise ProxyTuneError(f"response_format: unknown output format {kind!r}; use one of {', '.join(GRAMMAR_KINDS)}")
    if kind == "json_schema":
        try:
            schema = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as error:
            raise ProxyTuneError(f"response_format: the JSON schema is not JSON: {error}") from None
        except RecursionError:
            raise ProxyTuneError(f"response_format: the JSON schema nests more than {MAX_SCHEMA_DEPTH} levels deep "
                                 f"(MAX_SCHEMA_DEPTH)") from None
        if not isinstance(schema, (dict, bool)):
            raise ProxyTuneError(f"response_format: a JSON schema is an object, got {type(schema).__name__}")
        check_size("JSON schema", json.dumps(schema))
        check_schema(schema)
        value = schema
    elif kind != "json_object":
        if not isinstance(value, str) or not value:
            raise ProxyTuneError(f"response_format: a {kind} output format needs its text, got {value!r}")
        check_size("Lark grammar" if kind == "lark" else kind, value)
        if kind == "lark":
            check_lark(value)
    return on_big_stack(lambda: _compile(kind, value, tokens))


def mask_bits(matcher) -> np.ndarray:
    """The tokens a matcher allows next, one 0/1 per token id (llguidance packs them 8 to a byte)."""
    return np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")


def _compile(kind: str, value, tokens) -> Grammar:
    """llguidance's part, on a thread with a deep stack (grammar_limits.on_big_stack)."""
    import llguidance

    try:
        if kind == "json_schema":
            own = isinstance(value, dict) and "x-guidance" in value  # the schema says how it wants whitespace
            text = llguidance.LLMatcher.grammar_from_json_schema(value, defaults=None if own else JSON_OPTIONS)
        elif kind == "json_object":
            text = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        elif kind == "regex":
            text = llguidance.LLMatcher.grammar_from_regex(value)
        else:
            text = llguidance.LLMatcher.grammar_from_lark(value)
    except Exception as error:  # ValueError mostly; whatever the compiler refuses is the format's fault
        raise ProxyTuneError(f"response_format: invalid {kind}: {str(error).strip()[:500]}") from None
    return _bound(kind, text, tokens)


def bind_grammar(grammar: Grammar, tokens) -> Grammar:
    """A format checked at the edge (compiled with tokens=None) made ready for this vocabulary: llguidance's
    grammar text is kept, only the vocabulary's check and the template matcher are built."""
    if grammar.template is not None and grammar.tokens is tokens:
        return grammar
    return on_big_stack(lambda: _bound(grammar.kind, grammar.text, tokens))


def _bound(kind: str, text: str, tokens) -> Grammar:
    import llguidance

    problem = llguidance.LLMatcher.validate_grammar(text, tokens)
    if problem:
        raise ProxyTuneError(f"response_format: invalid {kind}: {problem.strip().splitlines()[0]}")
    if tokens is None:
        return Grammar(kind, text, tokens)
    template = llguidance.LLMatcher(tokens, text, log_level=0)
    if template.is_error():
        raise ProxyTuneError(f"response_format: invalid {kind}: {template.get_error().strip().splitlines()[0]}")
    allowed = mask_bits(template).nonzero()[0]
    if set(allowed.tolist()) <= set(tokens.eos_tokens) and not template.is_accepting():  # only "end", yet "" fails
        raise ProxyTuneError(f"response_format: the {kind} allows no text at all (nothing can satisfy it): "
                             f"check its constraints")
    return Grammar(kind, text, tokens, template)


def _number(value, name: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ProxyTuneError(f"{name} must be a number in {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Shaping:
    repetition_penalty: float = 1.0  # > 0; 1 = off (transformers' and vLLM's meaning)
    frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    grammar: Grammar | None = None

    def __post_init__(self):
        _number(self.repetition_penalty, "repetition_penalty", 0.0, 100.0, low_open=True)
        _number(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        _number(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ProxyTuneError(f"logit_bias keys are token ids (integers >= 0), got {token!r}")
            _number(bias, f"logit_bias[{token}]", -100.0, 100.0)

    @classmethod
    def of(cls, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
           logit_bias=None, response_format=None) -> "Shaping":
        """From OpenAI's fields (see `but`)."""
        return cls().but(repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                         presence_penalty=presence_penalty, logit_bias=logit_bias, response_format=response_format)

    def but(self, **fields) -> "Shaping":
        """With some of OpenAI's fields changed: the penalties, logit_bias {token id (or its digits as text):
        bias}, response_format (OpenAI's json_object / json_schema, or {"type": "regex", "regex": ...} /
        {"type": "grammar", "grammar": <Lark>}), compiled and checked here, before any vocabulary is known
        (`bind_grammar` readies it for one)."""
        if "logit_bias" in fields:
            fields["logit_bias"] = bias_pairs(fields["logit_bias"])
        if "response_format" in fields:
            fmt = output_format(fields.pop("response_format"))
            fields["grammar"] = checked_grammar(fmt[0], json.dumps(fmt[1], sort_keys=True)) if fmt else None
        return dataclasses.replace(self, **fields)

    @property
    def on_tokens(self) -> bool:
        """Whether it names or counts token ids (everything but a grammar)."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or bool(self.logit_bias))

    @property
    def active(self) -> bool:
        return self.on_tokens or self.grammar is not None


NO_SHAPING = Shaping()


def bias_pairs(logit_bias) -> tuple[tuple[int, float], ...]:
    if logit_bias is None:
        return ()
    if not isinstance(logit_bias, dict):
        raise ProxyTuneError(f"logit_bias must map token ids to biases, got {type(logit_bias).__name__}")
    return tuple((int(key) if isinstance(key, str) and key.isdigit() else key, value)
                 for key, value in logit_bias.items())


@functools.lru_cache(maxsize=64)
def checked_grammar(kind: str, value_json: str) -> Grammar:
    """A format compiled without a vocabulary, once per format (a batch file's rows often share one)."""
    return compile_grammar(kind, json.loads(value_json))


class RowShaper:
    """One row's shaping state: its grammar matcher (advanced by every chosen token) and what it penalises."""

    def __init__(self, shaping: Shaping, prompt: Sequence[int]):
        self.shaping = shaping
        self.prompt = list(prompt)
        self.matcher = shaping.grammar.matcher() if shaping.grammar is not None else None
        self._repetition = (RepetitionPenaltyLogitsProcessor(shaping.repetition_penalty)
                            if shaping.repetition_penalty != 1.0 else None)

    def shape(self, z: torch.Tensor, generated: Sequence[int], allowed: torch.Tensor | None = None) -> torch.Tensor:
        """The shaped logits [V] after the generated tokens (a new tensor; z is left as it is). `allowed`: the
        grammar's mask there, when the caller has computed it already."""
        s, z = self.shaping, z.float().clone()
        if s.logit_bias:
            ids, bias = zip(*s.logit_bias)
            z[torch.tensor(ids, device=z.device)] += torch.tensor(bias, device=z.device)
        if self._repetition is not None and (self.prompt or generated):
            seen = torch.tensor([self.prompt + list(generated)], dtype=torch.long, device=z.device)
            z = self._repetition(seen, z[None])[0]
        if (s.frequency_penalty or s.presence_penalty) and generated:
            counts = torch.bincount(torch.tensor(list(generated), device=z.device), minlength=z.shape[-1])
            counts = counts[:z.shape[-1]].to(z.dtype)
            z -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(z.dtype)
        if self.matcher is not None:
            allowed = self._allowed(z.shape[-1]) if allowed is None else allowed
            z[~allowed.to(z.device)] = float("-inf")
        return z

    def shape_after(self, z: torch.Tensor, generated: Sequence[int], drafts: Sequence[int]) -> torch.Tensor | None:
        """The shaped logits of the position after `drafts` (tokens not chosen yet, e.g. a speculative draft):
        the matcher is advanced through them and rolled back. None when that position cannot be reached:
        the grammar refuses a draft, or a draft ended the text (nothing may follow it)."""
        drafts = [int(t) for t in drafts]
        if self.matcher is None or not drafts:
            return self.shape(z, list(generated) + drafts)
        if self.matcher.validate_tokens(drafts) < len(drafts):
            return None
        self.matcher.consume_tokens(drafts)
        try:
            allowed = self._allowed(z.shape[-1])
            return self.shape(z, list(generated) + drafts, allowed) if allowed.any() else None
        finally:
            self.matcher.rollback(len(drafts))

    def shape_positions(self, z: torch.Tensor, generated: Sequence[int], drafts: Sequence[int]) -> torch.Tensor:
        """[n, V] -> [n, V]: position j shaped after drafts[:j] (a drafted round's verified positions). A
        position that cannot be reached keeps z: verification never uses it, and it stays finite there."""
        rows = []
        for j in range(z.shape[0]):
            shaped = self.shape_after(z[j], generated, drafts[:j])
            rows.append(z[j].float() if shaped is None else shaped)
        return torch.stack(rows)

    def accept(self, token: int) -> None:
        """The row chose `token`: the grammar moves past it (the end of text, too)."""
        if self.matcher is not None:
            if not self.matcher.consume_token(int(token)):  # only allowed tokens are chosen: the parser gave out
                raise FormatLimit(f"the output format is too complex for the grammar parser here (llguidance: "
                                  f"{self.matcher.get_error().splitlines()[0]}); simplify it (fewer alternatives "
                                  f"or optional properties)")

    def _allowed(self, size: int) -> torch.Tensor:
        bits = mask_bits(self.matcher)
        allowed = torch.zeros(size, dtype=torch.bool)
        n = min(size, len(bits))
        allowed[:n] = torch.from_numpy(bits[:n].astype(bool))
        return allowed


def output_format(value) -> tuple[str, object] | None:
    """OpenAI's `response_format` as (grammar kind, its value); None for plain text. Beside OpenAI's "text",
    "json_object" and "json_schema" ({"json_schema": {"name": ..., "schema": {...}}}), proxytune takes
    {"type": "regex", "regex": "..."} and {"type": "grammar", "grammar": "<Lark grammar>"}."""
    shapes = ('{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}, {"type": "json_object"}, '
              '{"type": "regex", "regex": "..."}, {"type": "grammar", "grammar": "..."} or {"type": "text"}')
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ProxyTuneError(f"response_format must be an object with a type: {shapes}; got {value!r}"[:400])
    kind, fields = value["type"], {"text": set(), "json_object": set(), "json_schema": {"json_schema"},
                                   "regex": {"regex"}, "grammar": {"grammar"}}
    if kind not in fields:
        raise ProxyTuneError(f"response_format type {kind!r} is not one of {', '.join(fields)}")
    extra = set(value) - {"type"} - fields[kind]
    if extra or not fields[kind] <= set(value):
        raise ProxyTuneError(f"response_format of type {kind!r} takes exactly the fields "
                             f"{sorted({'type'} | fields[kind])}, got {sorted(value)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_object", None)
    if kind == "json_schema":
        spec = value["json_schema"]
        if not isinstance(spec, dict) or "schema" not in spec or set(spec) - {"name", "schema", "strict", "description"}:
            raise ProxyTuneError('response_format json_schema must be {"name": ..., "schema": {...}} (strict and '
                                 'description allowed)')
        return ("json_schema", spec["schema"])
    return ("regex", value["regex"]) if kind == "regex" else ("lark", value["grammar"])
