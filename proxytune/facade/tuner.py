"""ProxyTuner: the public face of the engine (generate, stream, score, chat).

It holds the trio (each role's source and tokenizer) and the defaults of a request (α per pair), and turns
a prompt and its `Settings` into a `Request` (requests.py); loading is loading.py's, the decoding and its
rules the engine's. Keyword arguments (temperature=..., alpha=...) are the Python API's edge: they become
one `Settings` (Settings.of) at once.
"""
from __future__ import annotations

from typing import Iterator, Sequence

from ..backends.protocol import LogitSource
from ..engine import scoring
from ..engine.decoding import Decoding, Event, GenerationOutput, Request
from ..engine.modes import batch_mode, start_decoding
from ..engine.prompts import ALL_ROLES
from ..engine.roles import Roles, pairs_of
from ..engine.scoring import Score, ScoreItem
from ..engine.settings import Settings, check_alpha, check_mode
from ..engine.shaping import Shaping
from ..engine.bytelevel import BYTE_VOCAB, END_OF_TEXT, ByteTokenizer
from ..engine.vocab import shared_vocab_size, token_table, vocabularies_agree
from .bytes import byte_role_logits, byte_sources
from .loading import load_config, load_pretrained
from .requests import Formats, prompt_ids, settle
from ..errors import ProxyTuneError, SourceFailure
from ..models.loading import as_source


def eos_ids_of(source: LogitSource, tokenizer) -> set[int]:
    """The ids that end a role's text: its source's own (declared) and its role's tokenizer's."""
    return set(source.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


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
        for (expert_role, anti_role), (e, a, _) in zip(self.schema.pairs, experts):
            models[expert_role], models[anti_role] = e, a
        # a request's α when it names none; each request carries its own (Settings.alpha)
        self.default_alphas = tuple(check_alpha(pair_alpha) for _, _, pair_alpha in experts)
        tokenizers = dict(tokenizers or {})
        for role in self.roles:
            tokenizers.setdefault(role, tokenizer)
            if tokenizers[role] is None:
                raise ProxyTuneError(f"no tokenizer for the {role} model: pass tokenizer=...")
        self.tokenizers = tokenizers
        self.tokenizer = tokenizers["base"]
        self.sources = self._wrap(models, tokenizers)
        tables: dict[int, list[str]] = {}
        by_role = {}
        for role in self.roles:  # one table per distinct tokenizer object
            by_role[role] = tables.setdefault(id(tokenizers[role]), token_table(tokenizers[role]))
        # the most characters one token can stand for: a text longer than context x this cannot fit
        self.longest_token = {role: max(map(len, filter(None, table)), default=1) for role, table in by_role.items()}
        eos = {role: eos_ids_of(self.sources[role], tokenizers[role]) for role in self.roles}
        self.byte_level = (not vocabularies_agree(by_role)) if byte_level is None else bool(byte_level)
        if self.byte_level:  # every role read byte by byte, combined per byte (engine/bytelevel)
            self.sources = byte_sources(self.sources, tokenizers, eos, prune)
            self.tokenizer, self.vocab_size, self.eos_token_ids = ByteTokenizer(), BYTE_VOCAB, {END_OF_TEXT}
        else:
            self.vocab_size = shared_vocab_size(by_role, {r: s.vocab_size for r, s in self.sources.items()})
            for source in self.sources.values():
                source.vocab_size = self.vocab_size
            self.eos_token_ids = set().union(*eos.values())
        self.pairs = pairs_of(self.schema, self.sources)
        self.formats = Formats(self)  # output formats bound to the decoding's vocabulary

    @staticmethod
    def _wrap(models: dict, tokenizers: dict) -> dict[str, LogitSource]:
        """Role -> logit source: a source as it is, a loaded transformers model wrapped (once per model)."""
        wrapped: dict[int, LogitSource] = {}
        sources = {}
        for role, model in models.items():
            if id(model) not in wrapped:
                wrapped[id(model)] = model if isinstance(model, LogitSource) else \
                    as_source(model, name=role, tokenizer=tokenizers[role])
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
        return load_pretrained(cls, base, expert, anti_expert, alpha, device, dtype, experts, backend, threads, n_ctx,
                               byte_level, prune, placement, trust_remote_code)

    @classmethod
    def from_config(cls, config, device=None, dtype=None, placement: dict | None = None, **options) -> "ProxyTuner":
        """Load a trio config (a TOML file, models/trio_config.py, or a read TrioConfig): its roles, placements,
        α per pair, chat templates and options. `placement` (per role) and `options` (backend, threads, n_ctx,
        byte_level, prune, trust_remote_code) given here override the file's; device/dtype are every role's
        defaults under the file's per-role keys."""
        return load_config(cls, config, device=device, dtype=dtype, placement=placement, **options)

    def remote_sources(self) -> dict:
        """Role -> source for the roles a server computes, as the sources declare (`server_calls`); each source
        once, by its first role."""
        found: dict = {}
        for role, source in self.sources.items():
            if source.server_calls is not None and source not in found.values():
                found[role] = source
        return found

    @property
    def alphas(self) -> list[float]:
        """The default α of each pair: a request's when it names none."""
        return list(self.default_alphas)

    def encode(self, prompt: str, role: str = "base") -> list[int]:
        if not isinstance(prompt, str):
            raise ProxyTuneError(f"prompts must be strings, got {type(prompt).__name__}")
        return self.tokenizers[role](prompt)["input_ids"]

    def request(self, prompt: str | None = None, messages=None, chat_roles: Sequence[str] = ALL_ROLES,
                settings: Settings | None = None, label: str = "prompt", **options) -> Request:
        """One decoding request: a raw prompt for every role, or a conversation formatted per role, decoded
        as `settings` say (made once at the edge), or as the keyword arguments of `Settings.of` say
        (max_new_tokens, temperature, top_p, top_k, min_p, stop, seed, alpha, alpha_schedule, return_details,
        penalties, logit_bias, response_format, alone, mode). alone="base" / "expert" / any role: the row
        follows that role's own distribution (its own prompt), in the same batch as proxy rows."""
        settings = settings_of(settings, options)
        return Request(prompt_ids(self, prompt, messages, chat_roles, label), settle(self, settings))

    def shaping(self, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                logit_bias=None, response_format=None) -> Shaping:
        """What a request does to the combined logits before a token is chosen (engine/shaping.py), checked
        for these models: logit_bias {token id: bias}, OpenAI's penalties, and response_format (OpenAI's
        json_object / json_schema, or {"type": "regex", "regex": ...} / {"type": "grammar", "grammar": <Lark>})."""
        shaping = Shaping.of(repetition_penalty, frequency_penalty, presence_penalty, logit_bias, response_format)
        return settle(self, Settings(alpha=self.default_alphas, shaping=shaping)).shaping

    @property
    def grammar_tokens(self):
        """The decoding's vocabulary as llguidance sees it (requests.Formats.tokens)."""
        return self.formats.tokens

    # --- decoding ----------------------------------------------------------------------------------

    def decoding(self, requests: Sequence[Request], mode: str | None = None, speculative: bool = False) -> Decoding:
        """A batch decoding of prepared requests; iterate `.steps()`, then read `.outputs()`. `mode` (plain,
        speculative, auto: engine/settings.MODES; default: the one the requests' settings ask for) changes
        how many forwards it takes, never the tokens; speculative=True is mode="speculative". A remote base
        always drafts its own continuation instead, several tokens per call (its spec's chunk=0 turns this off)."""
        mode = "speculative" if speculative else check_mode(mode) if mode is not None else batch_mode(requests)
        if self.byte_level and mode == "speculative":
            raise ProxyTuneError("speculative decoding drafts tokens of one shared vocabulary; these roles' vocabularies "
                                 "differ, so they are decoded byte by byte: decode without speculative")
        mode = "plain" if self.byte_level else mode
        return start_decoding(self.sources["base"], self.pairs, requests, self.tokenizer, self.eos_token_ids, mode)

    def run(self, requests: Sequence[Request], batch_size: int = 16, mode: str | None = None,
            speculative: bool = False) -> list[GenerationOutput]:
        """Every request's output, in order, `batch_size` rows at a time; rows that ask for different modes are
        decoded in different batches."""
        outputs: dict[int, GenerationOutput] = {}
        for group in by_mode(requests, "speculative" if speculative else mode):
            for start in range(0, len(group), batch_size):
                part = group[start:start + batch_size]
                decoding = self.decoding([request for _, request in part], mode=mode, speculative=speculative)
                for _ in decoding.steps():
                    pass
                outputs.update(zip((index for index, _ in part), decoding.outputs()))
        return [outputs[index] for index in range(len(requests))]

    def generate(self, prompts, settings: Settings | None = None, batch_size: int = 16, **options
                 ) -> list[GenerationOutput]:
        """Generate for each prompt (row i is seeded with seed + i). Returns the generated part only.
        `options`: the keyword arguments of `Settings.of` (or give `settings`)."""
        settings = settings_of(settings, options)
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ProxyTuneError("give at least one prompt (a string or a non-empty list of strings)")
        seeded = [settings if settings.seed is None else settings.but(seed=settings.seed + i)
                  for i in range(len(prompts))]
        requests = [self.request(prompt, settings=row, label=f"prompt {i}")
                    for i, (prompt, row) in enumerate(zip(prompts, seeded))]
        return self.run(requests, batch_size)

    def stream(self, prompt: str, settings: Settings | None = None, **options) -> Iterator[str]:
        """Text of one prompt as it is decided (stop strings and partial characters held back)."""
        yield from self.stream_request(self.request(prompt, settings=settings_of(settings, options)))

    def stream_request(self, request: Request) -> Iterator[str]:
        for event in self.stream_events(request):
            if event.delta:
                yield event.delta

    def stream_events(self, request: Request) -> Iterator[Event]:
        """The row's events as its tokens are decided; raises SourceFailure after the text so far."""
        for events in self.decoding([request]).steps():
            for event in events:
                yield event
                if event.error:  # the text so far is out; now say why it ends here
                    raise SourceFailure(event.error)

    def chat(self, messages, chat_roles: Sequence[str] = ALL_ROLES, settings: Settings | None = None,
             **options) -> GenerationOutput:
        """Reply to one conversation. Each role in `chat_roles` sees its own chat template, the others
        plain text; chat_roles=("expert",) is the paper's setting."""
        return self.run([self.request(messages=messages, chat_roles=chat_roles, settings=settings, **options)])[0]

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
        alphas = list(Settings(alpha=alpha).resolved(self.default_alphas, self.roles).alpha)
        logits = self.role_logits(items) if self.byte_level else None
        return scoring.score(self.schema, self.sources, items, [alphas] * len(items), top=top, logits=logits)

    def role_logits(self, items: Sequence[ScoreItem], only: Sequence[str] | None = None) -> list[dict]:
        """Each role's logits at every scored position (for base alone / expert alone / several α at once);
        `only` limits them to some roles (the others' models are not run)."""
        if self.byte_level:
            return byte_role_logits(self.schema, self.sources, items, only)
        return scoring.role_logits(self.schema, self.sources, items, only)


def settings_of(settings: Settings | None, options: dict) -> Settings:
    """A request's settings: made at the edge already, or from the Python API's keyword arguments."""
    if settings is None:
        return Settings.of(**options)
    if options:
        raise ProxyTuneError(f"give settings or keyword options ({', '.join(options)}), not both")
    return settings


def by_mode(requests: Sequence[Request], mode: str | None) -> list[list[tuple[int, Request]]]:
    """(index, request) grouped by the mode each batch is decoded in: `mode` for all, else each request's own."""
    groups: dict[str, list] = {}
    for index, request in enumerate(requests):
        groups.setdefault(mode or request.settings.mode, []).append((index, request))
    return list(groups.values())
