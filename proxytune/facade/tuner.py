"""ProxyTuner: the public face of the engine (generate, stream, score, chat)."""
from __future__ import annotations

import copy
import json
import math
import sys
from typing import Iterator, Sequence

from ..backends.protocol import LogitSource
from ..engine import scoring
from ..engine.context import check_prompt_room
from ..engine.decoding import Decoding, Event, GenerationOutput, Request
from ..engine.prompts import ALL_ROLES, chat_prompt_ids, chat_role_kinds, validate_messages
from ..engine.roles import Roles, pairs_of
from ..engine.sampling import SamplingParams
from ..engine.shaping import Grammar, Shaping, compile_grammar, output_format, vocabulary
from ..engine.scoring import Score, ScoreItem
from ..engine.bytelevel import BYTE_VOCAB, END_OF_TEXT, ByteTokenizer, token_bytes
from ..engine.vocab import shared_vocab_size, token_table, vocabularies_agree
from .bytes import byte_role_logits, byte_sources, check_prompt_bytes
from ..errors import ProxyTuneError, SourceFailure
from ..models.loading import as_source
from ..models.placement import Placement


FLOAT32_MAX = 3.4028234663852886e38  # logits are combined in float32: a larger α becomes inf there


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ProxyTuneError(f"alpha must be a finite number, got {alpha!r}")
    if abs(alpha) > FLOAT32_MAX:
        raise ProxyTuneError(f"alpha {alpha!r} overflows float32, the dtype logits are combined in; use |alpha| <= 3.4e38 "
                             f"(values far above 10 already let the experts override the base completely)")
    return float(alpha)


def reads_as_position(key) -> bool:
    """A schedule key written as text that is a whole number ("32", " -1"): JSON and the command line write
    positions so; in Python a position is an int."""
    return isinstance(key, str) and key.strip().lstrip("-").isdigit()


def order_schedule(schedule: dict, value) -> tuple:
    """An α schedule {position or text marker: α} as the engine reads it: positions (ints >= 0) sorted, then
    markers in the order given (a marker's change comes after every position's), each α through `value`.
    Every complaint starts with "alpha_schedule", so a caller can name the field it came from."""
    if not schedule:
        raise ProxyTuneError("alpha_schedule maps output positions (or text markers) to α, e.g. {0: 2.0, 32: 1.0} "
                             "or {0: 2.0, '####': 1.0}; got an empty one")
    positions, markers = [], []
    for key, alpha in schedule.items():
        if reads_as_position(key):
            raise ProxyTuneError(f"alpha_schedule key {key!r} is text; a position is a number: {int(key)}")
        if not (isinstance(key, str) and key) and (isinstance(key, bool) or not isinstance(key, int) or key < 0):
            raise ProxyTuneError(f"alpha_schedule keys are token positions >= 0 or non-empty text markers, "
                                 f"got {key!r}")
        try:
            entry = (key, value(alpha))
        except ProxyTuneError as error:
            raise ProxyTuneError(f"alpha_schedule[{key!r}]: {error}") from None
        (markers if isinstance(key, str) else positions).append(entry)
    return tuple(sorted(positions)) + tuple(markers)


def schedule_from_text(schedule: dict) -> dict:
    """JSON and the command line write every key as text: one that is a whole number is an output position,
    any other a text marker ({"0": 2, "####": 1} -> {0: 2, "####": 1})."""
    return {int(key) if reads_as_position(key) else key: alpha for key, alpha in schedule.items()}


def eos_ids_of(model_or_source, tokenizer) -> set[int]:
    ids: set[int] = set()
    config = getattr(model_or_source, "generation_config", None) or getattr(
        getattr(model_or_source, "model", None), "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None),
                  getattr(model_or_source, "eos_token_ids", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


class ProxyTuner:
    """z = z_base + Σ αᵢ (z_expertᵢ − z_anti_expertᵢ), sampled from softmax(z).

    Models may be loaded transformers models or any `LogitSource`. `tokenizer` is shared by every
    role unless `tokenizers` gives one per role (they must agree on token ids; chat templates may differ).
    """

    def __init__(self, base, expert=None, anti_expert=None, tokenizer=None, alpha: float = 1.0,
                 experts: Sequence[tuple] | None = None, tokenizers: dict | None = None,
                 byte_level: bool | None = None, prune: float = 1e-5):
        if experts is None:
            if expert is None or anti_expert is None:
                raise ProxyTuneError("give expert and anti_expert, or experts=[(expert, anti_expert, alpha), ...]")
            experts = [(expert, anti_expert, alpha)]
        elif expert is not None or anti_expert is not None:
            raise ProxyTuneError("give either expert/anti_expert or experts=[...], not both")
        if not experts:
            raise ProxyTuneError("experts must name at least one (expert, anti_expert, alpha) triple")
        self.schema = Roles(len(experts))
        self.roles = self.schema.names
        models = {"base": base}
        for (expert_role, anti_role), (e, a, pair_alpha) in zip(self.schema.pairs, experts):
            models[expert_role], models[anti_role] = e, a
            check_alpha(pair_alpha)
        tokenizers = dict(tokenizers or {})
        for role in self.roles:
            tokenizers.setdefault(role, tokenizer)
            if tokenizers[role] is None:
                raise ProxyTuneError(f"no tokenizer for the {role} model: pass tokenizer=...")
        self.tokenizers = tokenizers
        self.tokenizer = tokenizers["base"]
        self.sources = self._wrap(models)
        tables: dict[int, list[str]] = {}
        by_role = {}
        for role in self.roles:  # one table per distinct tokenizer object
            by_role[role] = tables.setdefault(id(tokenizers[role]), token_table(tokenizers[role]))
        # the most characters one token can stand for: a text longer than context x this cannot fit
        self._longest_token = {role: max(map(len, filter(None, table)), default=1) for role, table in by_role.items()}
        eos = {role: eos_ids_of(models[role], tokenizers[role]) for role in self.roles}
        self.byte_level = (not vocabularies_agree(by_role)) if byte_level is None else bool(byte_level)
        if self.byte_level:  # every role read byte by byte, combined per byte (engine/bytelevel)
            self.sources = byte_sources(self.sources, tokenizers, eos, prune, self.remote_sources())
            self.tokenizer, self.vocab_size, self.eos_token_ids = ByteTokenizer(), BYTE_VOCAB, {END_OF_TEXT}
        else:
            self.vocab_size = shared_vocab_size(by_role, {r: s.vocab_size for r, s in self.sources.items()})
            for source in self.sources.values():
                source.vocab_size = self.vocab_size
            self.eos_token_ids = set().union(*eos.values())
        self.pairs = pairs_of(self.schema, self.sources, [a for _, _, a in experts])
        self._grammars: dict[tuple, Grammar] = {}  # compiled output formats (response_format)
        self._grammar_tokens = None  # the vocabulary as llguidance sees it, built on first use

    @staticmethod
    def _wrap(models: dict) -> dict[str, LogitSource]:
        wrapped: dict[int, LogitSource] = {}
        sources = {}
        for role, model in models.items():
            if id(model) not in wrapped:
                wrapped[id(model)] = model if isinstance(model, LogitSource) else as_source(model, name=role)
            sources[role] = wrapped[id(model)]
        return sources

    @classmethod
    def from_pretrained(cls, base: str, expert: str | None = None, anti_expert: str | None = None,
                        alpha: float = 1.0, device=None, dtype=None,
                        experts: Sequence[tuple] | None = None, backend: str | None = None,
                        threads: int | None = None, n_ctx: int | None = None, byte_level: bool | None = None,
                        prune: float = 1e-5, placement: dict | None = None,
                        trust_remote_code: bool = False) -> "ProxyTuner":
        """Load by spec: a model directory, a .gguf file, a peft adapter directory, a registered name, or a
        Hugging Face Hub id (org/name, from the local cache). A registered trio name (e.g. "demo") alone
        gives all three roles. `gguf:SPEC` runs a role in llama.cpp; backend="llama.cpp" runs every role
        there (threads, n_ctx: its settings). device/dtype apply to every role (dtype default: each
        checkpoint's own); placement={"base": {"device_map": "auto"}, "expert": {"device": "cuda:1"}, ...}
        places roles one by one (models/placement.py). Roles whose vocabularies differ are combined byte by
        byte (byte_level=None: automatic; True forces it, False refuses them; prune: see
        engine/bytelevel/source.py). trust_remote_code: run a checkpoint's own modelling code (off)."""
        from ..models import registry
        from ..models.loading import load_roles
        from ..models.placement import placements_of
        from ..models.trio_config import user_trio

        if expert is None and anti_expert is None and experts is None:
            trio = registry.resolve_trio(base)
            if trio is None and user_trio(base) is not None:  # registered with `proxytune models add`
                return cls.from_config(user_trio(base), device=device, dtype=dtype, backend=backend, threads=threads,
                                       n_ctx=n_ctx, placement=placement)
            if trio is None:
                raise ProxyTuneError(f"{base!r} is not a registered trio; give expert= and anti_expert= too")
            base, expert, anti_expert = trio["base"], trio["expert"], trio["anti_expert"]
        pair_specs = experts if experts is not None else [(expert, anti_expert, alpha)]
        schema = Roles(len(pair_specs))
        specs = {"base": base}
        for (expert_role, anti_role), (e, a, _) in zip(schema.pairs, pair_specs):
            specs[expert_role], specs[anti_role] = e, a
        loaded = load_roles(specs, schema.pairs, device=device, dtype=dtype, backend=backend, threads=threads,
                            n_ctx=n_ctx, placements=placements_of(placement, schema.names),
                            trust_remote_code=trust_remote_code)
        pairs = [(loaded[e][0], loaded[a][0], alpha) for (e, a), (_, _, alpha) in zip(schema.pairs, pair_specs)]
        return cls(loaded["base"][0], experts=pairs, tokenizers={r: loaded[r][1] for r in schema},
                   byte_level=byte_level, prune=prune)

    @classmethod
    def from_config(cls, config, device=None, dtype=None, placement: dict | None = None, **options) -> "ProxyTuner":
        """Load a trio config (a TOML file, models/trio_config.py, or a read TrioConfig): its roles, placements,
        α per pair, chat templates and options. `placement` (per role) and `options` (backend, threads, n_ctx,
        byte_level, prune, trust_remote_code) given here override the file's; device/dtype are every role's
        defaults under the file's per-role keys."""
        from ..models.placement import placement_of
        from ..models.trio_config import TrioConfig, read_config

        config = config if isinstance(config, TrioConfig) else read_config(config)
        placements = {role: placement_of(value, f"the {role} placement").over(config.placements.get(role, Placement()))
                      for role, value in (placement or {}).items()}
        schema = Roles(len(config.alphas))
        experts = [(config.specs[e], config.specs[a], alpha) for (e, a), alpha in zip(schema.pairs, config.alphas)]
        tuner = cls.from_pretrained(config.specs["base"], experts=experts, device=device, dtype=dtype,
                                    placement={**config.placements, **placements},
                                    **{**config.options, **{k: v for k, v in options.items() if v is not None}})
        for role, template in config.chat_templates.items():  # a copy: roles may share one tokenizer object
            tokenizer = copy.deepcopy(tuner.tokenizers[role])
            tokenizer.chat_template = template
            tuner.tokenizers[role] = tokenizer
        return tuner

    def remote_sources(self) -> dict:
        """Role -> source for the roles behind an OpenAI-compatible server (each source once, by its first role)."""
        if "proxytune.backends.remote.source" not in sys.modules:  # no openai: spec was loaded
            return {}
        from ..backends.remote.source import RemoteSource

        found: dict = {}
        for role, source in self.sources.items():
            if isinstance(source, RemoteSource) and source not in found.values():
                found[role] = source
        return found

    # --- building requests -------------------------------------------------------------------------

    @property
    def alphas(self) -> list[float]:
        return [p.alpha for p in self.pairs]

    def _alphas(self, alpha) -> list[float]:
        if alpha is None:
            return self.alphas
        if isinstance(alpha, (list, tuple)):
            if len(alpha) != len(self.pairs):
                raise ProxyTuneError(f"alpha has {len(alpha)} values for {len(self.pairs)} expert pairs")
            return [check_alpha(a) for a in alpha]
        return [check_alpha(alpha)] * len(self.pairs)

    def _check_prompt(self, prompts: dict[str, list[int]], label: str) -> None:
        if any(not ids for ids in prompts.values()):
            raise ProxyTuneError(f"{label} is empty: give at least one token of text")
        check_prompt_room(prompts, self.sources, label)

    def _check_length(self, characters: int, label: str) -> None:
        """Refuse, before tokenizing it, a text that no tokenization could fit in a role's context (twice
        context x the longest token in characters: never a text that fits)."""
        for role, source in self.sources.items():
            if source.max_length and characters > 2 * source.max_length * self._longest_token[role]:
                raise ProxyTuneError(f"{label} has {characters} characters, far more than the {role} model's context "
                                     f"of {source.max_length} tokens can hold; shorten it")

    def encode(self, prompt: str, role: str = "base") -> list[int]:
        if not isinstance(prompt, str):
            raise ProxyTuneError(f"prompts must be strings, got {type(prompt).__name__}")
        return self.tokenizers[role](prompt)["input_ids"]

    def request(self, prompt: str | None = None, messages=None, chat_roles: Sequence[str] = ALL_ROLES,
                max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                min_p: float = 0.0, stop=None, seed: int | None = None, alpha=None, return_details=False,
                label: str = "prompt", repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                presence_penalty: float = 0.0, logit_bias=None, response_format=None,
                shaping: Shaping | None = None, alone: str | None = None, alpha_schedule=None) -> Request:
        """One decoding request: a raw prompt for every role, or a conversation formatted per role.
        Penalties, logit_bias and response_format act on the combined logits (see `shaping()`; or give a
        `shaping` made by it, e.g. once for many requests). alone="base" / "expert" / any role: the row
        follows that role's own distribution (its own prompt), in the same batch as proxy rows."""
        if shaping is None:
            shaping = self.shaping(repetition_penalty, frequency_penalty, presence_penalty, logit_bias,
                                   response_format)
        schedule = self._schedule(alpha_schedule)
        if alone is not None and alone not in self.roles:
            raise ProxyTuneError(f"alone names a role ({', '.join(self.roles)}), got {alone!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ProxyTuneError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if messages is not None:
            messages = validate_messages(messages)
            chat_roles = chat_role_kinds(chat_roles)
            self._check_length(sum(len(m["content"]) for m in messages), label)
            encode = lambda role: chat_prompt_ids(self.tokenizers[role], messages,  # noqa: E731
                                                  self.schema.kind(role) in chat_roles)
            key = lambda role: (id(self.tokenizers[role]), self.schema.kind(role) in chat_roles)  # noqa: E731
        else:
            if not isinstance(prompt, str):
                raise ProxyTuneError(f"prompts must be strings, got {type(prompt).__name__}")
            self._check_length(len(prompt), label)
            encode = lambda role: self.encode(prompt, role)  # noqa: E731
            key = lambda role: id(self.tokenizers[role])  # noqa: E731
        encoded: dict = {}  # once per distinct tokenizer (and template use), not once per role
        prompts = {}
        for role in self.roles:
            if key(role) not in encoded:
                encoded[key(role)] = encode(role)
            prompts[role] = list(encoded[key(role)])
        self._check_prompt(prompts, label)
        if self.byte_level:
            for role, ids in prompts.items():
                check_prompt_bytes(self.tokenizers[role], ids, prompt if messages is None else str(messages), role, label)
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
            raise ProxyTuneError(f"stop must be a string or a list of strings, got {stop!r}")
        details = (5 if return_details is True else int(return_details or 0))
        return Request(prompts, self._alphas(alpha), SamplingParams(temperature, top_p, top_k, min_p),
                       max_new_tokens, tuple(stop or ()), seed, details, shaping, alone, schedule)

    def _schedule(self, schedule) -> tuple:
        """alpha_schedule={position: α or [α per pair], ...}: from that output position on (0 = the first new
        token), the pairs use these α; before the first position given, the request's alpha. A key may also be
        text, e.g. {0: 2.0, "####": 1.0}: once the output so far contains it, its α (after any position's)."""
        if schedule is None:
            return ()
        if not isinstance(schedule, dict):
            raise ProxyTuneError(f"alpha_schedule maps output positions (or text markers) to α, e.g. "
                                 f"{{0: 2.0, 32: 1.0}} or {{0: 2.0, '####': 1.0}}; got {schedule!r}")
        return order_schedule(schedule, lambda alpha: tuple(self._alphas(alpha)))

    def shaping(self, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                logit_bias=None, response_format=None) -> Shaping:
        """What a request does to the combined logits before a token is chosen (engine/shaping.py):
        logit_bias {token id: bias}, OpenAI's penalties, and response_format (OpenAI's json_object /
        json_schema, or {"type": "regex", "regex": ...} / {"type": "grammar", "grammar": <Lark>})."""
        bias = []
        if logit_bias is not None:
            if not isinstance(logit_bias, dict):
                raise ProxyTuneError(f"logit_bias must map token ids to biases, got {type(logit_bias).__name__}")
            for key, value in logit_bias.items():
                token = int(key) if isinstance(key, str) and key.isdigit() else key
                if isinstance(token, int) and not isinstance(token, bool) and token >= self.vocab_size:
                    raise ProxyTuneError(f"logit_bias names token {token}, but the vocabulary has {self.vocab_size}")
                bias.append((token, value))
        fmt = output_format(response_format)
        grammar = self._grammar(*fmt) if fmt else None
        shaping = Shaping(repetition_penalty, frequency_penalty, presence_penalty, tuple(bias), grammar)
        if self.byte_level and shaping.on_tokens:
            raise ProxyTuneError("repetition/frequency/presence penalties and logit_bias count and name token ids, and "
                                 "these roles are combined byte by byte (their vocabularies differ): leave them out "
                                 "(response_format works at the byte level)")
        return shaping

    def _grammar(self, kind: str, value) -> Grammar:
        """Compiled once per format (the server compiles a request's format once for all its rows)."""
        key = (kind, json.dumps(value, sort_keys=True) if not isinstance(value, str) else value)
        if key not in self._grammars:
            if len(self._grammars) >= 64:
                self._grammars.clear()
            self._grammars[key] = compile_grammar(kind, value, self.grammar_tokens)
        return self._grammars[key]

    @property
    def grammar_tokens(self):
        """The decoding's vocabulary for grammars: bytes per token id (the 256 bytes and the end of text when
        decoding byte by byte), built once (about a second for 150k tokens)."""
        if self._grammar_tokens is None:
            if self.byte_level:
                table = [bytes([b]) for b in range(END_OF_TEXT)] + [b""]
            else:
                table = token_bytes(self.tokenizer, "base")[:self.vocab_size]
                table += [b""] * (self.vocab_size - len(table))
            encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
            self._grammar_tokens = vocabulary(table, sorted(self.eos_token_ids), encode)
        return self._grammar_tokens

    # --- decoding ----------------------------------------------------------------------------------

    def decoding(self, requests: Sequence[Request], speculative: bool = False) -> Decoding:
        """A batch decoding of prepared requests; iterate `.steps()`, then read `.outputs()`.
        speculative=True: the expert drafts and the base verifies several tokens per forward (same output).
        A remote base always drafts its own continuation instead, several tokens per call (same output;
        its spec's chunk=0 turns this off)."""
        from ..engine.modes import start_decoding

        if speculative and self.byte_level:
            raise ProxyTuneError("speculative decoding drafts tokens of one shared vocabulary; these roles' vocabularies "
                                 "differ, so they are decoded byte by byte: decode without speculative")
        return start_decoding(self.sources["base"], self.pairs, requests, self.tokenizer, self.eos_token_ids,
                              speculative=speculative)

    def _requests(self, prompts, seed, **kwargs) -> list[Request]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ProxyTuneError("give at least one prompt (a string or a non-empty list of strings)")
        return [self.request(p, seed=None if seed is None else seed + i, label=f"prompt {i}", **kwargs)
                for i, p in enumerate(prompts)]

    def run(self, requests: Sequence[Request], batch_size: int = 16, speculative: bool = False) -> list[GenerationOutput]:
        outputs: list[GenerationOutput] = []
        for start in range(0, len(requests), batch_size):
            decoding = self.decoding(requests[start:start + batch_size], speculative=speculative)
            for _ in decoding.steps():
                pass
            outputs += decoding.outputs()
        return outputs

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, stop=None, seed: int | None = None, alpha=None,
                 return_details=False, batch_size: int = 16, speculative: bool = False, **shaping
                 ) -> list[GenerationOutput]:
        """Generate for each prompt (row i is seeded with seed + i). Returns the generated part only.
        `shaping`: repetition_penalty, frequency_penalty, presence_penalty, logit_bias, response_format
        (see `shaping()`)."""
        requests = self._requests(prompts, seed, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  top_k=top_k, min_p=min_p, stop=stop, alpha=alpha, return_details=return_details,
                                  **shaping)
        return self.run(requests, batch_size, speculative=speculative)

    def stream(self, prompt: str, speculative: bool = False, **kwargs) -> Iterator[str]:
        """Text of one prompt as it is decided (stop strings and partial characters held back)."""
        yield from self.stream_request(self.request(prompt, **kwargs), speculative=speculative)

    def stream_request(self, request: Request, speculative: bool = False) -> Iterator[str]:
        for event in self.stream_events(request, speculative=speculative):
            if event.delta:
                yield event.delta

    def stream_events(self, request: Request, speculative: bool = False) -> Iterator[Event]:
        """The row's events as its tokens are decided; raises SourceFailure after the text so far."""
        for events in self.decoding([request], speculative=speculative).steps():
            for event in events:
                yield event
                if event.error:  # the text so far is out; now say why it ends here
                    raise SourceFailure(event.error)

    def chat(self, messages, chat_roles: Sequence[str] = ALL_ROLES, **kwargs) -> GenerationOutput:
        """Reply to one conversation. Each role in `chat_roles` sees its own chat template, the others
        plain text; chat_roles=("expert",) is the paper's setting."""
        return self.run([self.request(messages=messages, chat_roles=chat_roles, **kwargs)])[0]

    # --- scoring -----------------------------------------------------------------------------------

    def score(self, prompt: str, continuation: str, alpha=None) -> Score:
        """log p̃ of each continuation token after the prompt, from one full-sequence forward per model."""
        return self.score_batch([(prompt, continuation)], alpha=alpha)[0]

    def score_item(self, prompt: str, continuation: str, label: str = "") -> ScoreItem:
        """What `score` runs for one pair: each role's own tokens of prompt + continuation (the prompt as
        `generate` tokenizes it, the continuation on its own, as lm-eval does). Byte-level: the prompt's
        tokens, then the continuation's bytes."""
        sequences, scored = {}, None
        for role in self.roles:
            tokenizer = self.tokenizers[role]
            ids = self.encode(prompt, role) if prompt else []
            cont = [] if not isinstance(continuation, str) else list(continuation.encode()) if self.byte_level \
                else tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not cont:
                raise ProxyTuneError(f"{label or 'the'} continuation is empty: nothing to score")
            if not ids:  # nothing to condition on: start from BOS when the model has one
                if tokenizer.bos_token_id is None:
                    raise ProxyTuneError(f"{label or 'the'} prompt is empty and the {role} tokenizer has no BOS "
                                         f"token to start from")
                ids = [tokenizer.bos_token_id]
            sequences[role], scored = ids + cont, len(cont)
        return ScoreItem(sequences, scored)

    def token_item(self, context: Sequence[int], continuation: Sequence[int]) -> ScoreItem:
        """The same token ids for every role (lm-eval's rolling windows are token-exact)."""
        return ScoreItem({role: list(context) + list(continuation) for role in self.roles}, len(continuation))

    def score_batch(self, pairs: Sequence[tuple[str, str]], alpha=None) -> list[Score]:
        items = [self.score_item(prompt, continuation, f"pair {i}") for i, (prompt, continuation) in enumerate(pairs)]
        return self.score_items(items, alpha=alpha)

    def score_items(self, items: Sequence[ScoreItem], alpha=None, top: int = 0) -> list[Score]:
        alphas = self._alphas(alpha)
        logits = self.role_logits(items) if self.byte_level else None
        return scoring.score(self.schema, self.sources, items, [alphas] * len(items), top=top, logits=logits)

    def role_logits(self, items: Sequence[ScoreItem], only: Sequence[str] | None = None) -> list[dict]:
        """Each role's logits at every scored position (for base alone / expert alone / several α at once);
        `only` limits them to some roles (the others' models are not run)."""
        if self.byte_level:
            return byte_role_logits(self.schema, self.sources, items, only)
        return scoring.role_logits(self.schema, self.sources, items, only)
