"""Request bodies of /v1/completions and /v1/chat/completions -> checked parameters -> engine Requests.

The bodies are pydantic models (FastAPI's own validation library): types are strict (no "8" for 8, no
true for 1), numbers finite, and a field the model does not declare is refused with 400 naming it, as
OpenAI refuses it. Every mistake is a 400 whose `param` names the field.

Extension fields (the openai client sends them through `extra_body`), the whole allow-list:
  alpha   a number, or one per expert pair (finite in float32, where the logits are combined)
  alpha_schedule  {"0": 2, "64": 1} or {"0": 2, "####": 1}: α (a number or one per pair) from that output
          position on, or once the output so far contains that text (a key that is a whole number is a position)
  proxy   false: the base model alone (alpha = 0), for A/B comparisons
  top_k   keep the k most likely tokens before sampling (0 = off)
  min_p   drop tokens below min_p x the top token's probability (0 = off)
  repetition_penalty  transformers' / vLLM's, over the prompt's and the generated tokens (1 = off)
  alone   a role name ("base", "expert", ...): that model alone, with its own prompt (the playground's columns)
  details k: with every generated token, each role's top k tokens and the probability each gave the chosen
          one, under the choice's "proxytune" key (streamed per chunk; plain OpenAI clients never ask)
  decoding  "plain", "speculative" (the expert drafts, the base verifies) or "auto": how the request's batch is
          decoded; the tokens are the same (default: the server's --decoding)
OpenAI's presence_penalty, frequency_penalty, logit_bias and response_format (json_object, json_schema, and
proxytune's regex and grammar types) act on the combined logits (engine/shaping.py). OpenAI fields proxytune
does not implement are refused unless their value changes nothing.

Bounds on sizes and on the work one request may ask: limits.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine.context import check_prompt_room, overflow
from ..engine.decoding import Request
from ..engine.sampling import SamplingParams
from ..engine.settings import MODES, SHAPING, Settings, schedule_from_text
from ..engine.shaping import Shaping
from ..errors import ProxyTuneError
from ..facade.requests import settle
from .api_errors import APIError, bad_request
from .limits import MAX_STOP, MAX_STOP_CHARS, MAX_TOP_LOGPROBS, check_sizes, check_tree, check_work

NEUTRAL = {"best_of": (None, 1), "suffix": (None, ""),
           "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
           "parallel_tool_calls": (None,)}  # OpenAI fields proxytune does not implement: values that change nothing


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Body):
    include_usage: bool | None = None


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]
    name: str | None = None


Finite = Annotated[float, Field(allow_inf_nan=False)]


class Common(Body):
    """Fields of both routes."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, unused
    # the extension fields
    alpha: Union[Finite, list[Finite], None] = None
    alpha_schedule: dict[str, Union[Finite, list[Finite]]] | None = None
    proxy: bool | None = None
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
    alone: str | None = None  # a role name: that model alone (its own prompt), beside proxy rows in one batch
    details: int | None = Field(None, ge=1, le=MAX_TOP_LOGPROBS)  # per token: every role's top-k and chosen p
    decoding: Literal[MODES] | None = None  # plain / speculative / auto: how its batch is decoded, same tokens
    # OpenAI's, on the combined logits (engine/shaping.py)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    response_format: dict[str, Any] | None = None
    # OpenAI's, not implemented: refused unless neutral (NEUTRAL)
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None


TokenIds = list[int]


class CompletionBody(Common):
    prompt: Union[str, list[str], TokenIds, list[TokenIds]]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Any = None
    suffix: Any = None


class ChatBody(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


BODIES = {"completion": CompletionBody, "chat": ChatBody}


@dataclass
class Params:
    """A checked body: what the response needs, and the one `Settings` its rows are decoded with."""
    kind: str  # "chat" | "completion"
    model: str
    prompts: list  # completion: one str or list[int] per prompt; chat: [messages]
    n: int
    max_tokens: int
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    echo: bool
    settings: Settings = Settings()  # α None: the server's default; the seed is choice 0's (choice i: seed + i)
    max_tokens_given: bool = False  # asked for explicitly: refused when prompt + max_tokens overflow the context
    details: int = 0
    user: str | None = None  # OpenAI's end-user id: fair admission between users (scheduler.py)


@dataclass
class PromptRows:
    """One prompt of a request and its n choices, as engine requests."""
    prompt_ids: list[int]  # the base model's prompt tokens
    text: str  # the prompt as text (echo)
    requests: list[Request]


def first_problem(error: ValidationError) -> APIError:
    """OpenAI's way: one message, the field as `param`."""
    problem = error.errors(include_url=False)[0]
    loc = [str(part) for part in problem["loc"] if not str(part).startswith(("str", "list[", "float", "int",
                                                                              "function-", "union["))]
    param = loc[0] if loc else None
    if problem["type"] == "extra_forbidden":
        where = "" if len(loc) == 1 else f" in {'.'.join(loc[:-1])}"
        return bad_request(f"Unrecognized request argument supplied: {loc[-1]}{where} (proxytune's own fields: "
                           f"alpha, alpha_schedule, proxy, top_k, min_p, repetition_penalty, alone, details, decoding)", param)
    if problem["type"] == "missing":
        return bad_request(f"{'.'.join(loc)} is required", param)
    shown = repr(problem.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return bad_request(f"{'.'.join(loc)}: {problem['msg']}, got {shown}", param)


def _alpha(body: Common, n_pairs: int):
    """The request's α (Settings checks the values); proxy: false is the base model alone."""
    if body.proxy is False:
        return [0.0] * n_pairs  # z = z_base exactly
    if isinstance(body.alpha, list) and len(body.alpha) != n_pairs:
        raise bad_request(f"alpha has {len(body.alpha)} values for {n_pairs} expert pairs", "alpha")
    return body.alpha


def _prompts(body: CompletionBody) -> list:
    prompt = body.prompt
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not prompts or any(not p for p in prompts):
        raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of such lists "
                          "(none of them empty)", "prompt")
    return prompts


def _messages(body: ChatBody) -> list[dict]:
    return [{"role": "system" if m.role == "developer" else m.role,
             "content": m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)}
            for m in body.messages]


def _stop(body: Common) -> tuple[str, ...]:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stop) > MAX_STOP:
        raise bad_request(f"give at most {MAX_STOP} stop strings, got {len(stop)}", "stop")
    long = [s for s in stop if len(s) > MAX_STOP_CHARS]
    if long:
        raise bad_request(f"stop strings may hold at most {MAX_STOP_CHARS} characters; one has {len(long[0])}", "stop")
    return tuple(s for s in stop if s)


def parse(raw: dict, kind: str, served_names: Sequence[str], n_pairs: int, max_rows: int,
          context: int | None, default_max_tokens: int, mode: str = "plain") -> Params:
    """Check every field of a completions (kind="completion") or chat (kind="chat") body; `mode`: the
    server's decoding mode, for requests that do not name one."""
    check_sizes(raw, max_rows, context)  # what a hostile body costs to walk: len() calls, before anything walks it
    check_tree(raw)
    try:
        body = BODIES[kind].model_validate(raw)
    except ValidationError as error:
        raise first_problem(error) from None
    if body.model is not None and body.model not in served_names:
        raise bad_request(f"unknown model {body.model!r}; this server serves {', '.join(served_names)}", "model",
                          "model_not_found")
    for name, neutral in NEUTRAL.items():
        if name in type(body).model_fields and getattr(body, name) not in neutral:
            raise bad_request(f"{name} is not supported by proxytune serve", name)
    prompts = [_messages(body)] if kind == "chat" else _prompts(body)
    echo = kind == "completion" and bool(body.echo)
    token_limit = context or 1_000_000
    asked = body.max_completion_tokens if kind == "chat" else None
    name = "max_completion_tokens" if asked is not None else "max_tokens"
    asked = asked if asked is not None else body.max_tokens
    max_tokens = default_max_tokens if asked is None else asked
    if max_tokens > token_limit or (max_tokens < 1 and not echo):
        raise bad_request(f"{name} must be between {0 if echo else 1} and {token_limit}, got {max_tokens}", name)
    n = body.n or 1
    if n * len(prompts) > max_rows:
        raise bad_request(f"{len(prompts)} prompts x n={n} is more than the {max_rows} rows this server decodes "
                          f"at once", "n")
    if kind == "chat":
        logprobs, top_logprobs = bool(body.logprobs), body.top_logprobs or 0
        if top_logprobs and not logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    else:
        logprobs, top_logprobs = body.logprobs is not None, body.logprobs or 0
    stream = bool(body.stream)
    if body.stream_options is not None and not stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if stream and echo and logprobs:
        raise bad_request("echo with logprobs is not available while streaming; use stream: false", "echo")
    if body.alone is not None and any(v is not None for v in (body.proxy, body.alpha, body.alpha_schedule)):
        raise bad_request("alone decodes one model by itself: leave out alpha, alpha_schedule and proxy", "alone")
    if body.proxy is False and body.alpha_schedule is not None:
        raise bad_request("proxy: false is the base model alone (alpha = 0); leave out alpha_schedule",
                          "alpha_schedule")
    if body.decoding == "speculative" and body.alpha_schedule is not None:
        raise bad_request("speculative decoding verifies several positions with one α, and alpha_schedule changes α "
                          "by position: ask for decoding \"plain\" or \"auto\"", "decoding")
    params = Params(kind, body.model or served_names[0], prompts, n, max_tokens, stream, include_usage, logprobs,
                    top_logprobs, echo, max_tokens_given=asked is not None, details=body.details or 0, user=body.user)
    check_work(params, n * len(prompts), body.response_format)  # before the format is compiled
    params.settings = _settings(body, params, n_pairs, mode)
    return params


def _settings(body: Common, params: Params, n_pairs: int, mode: str) -> Settings:
    """The one Settings of the request's rows, each field's complaint naming it."""
    try:
        shaping = Shaping.of(**{name: getattr(body, name) for name in SHAPING if getattr(body, name) is not None})
    except ProxyTuneError as error:
        raise bad_request(str(error), next((name for name in SHAPING if str(error).startswith(name)),
                                           "response_format")) from None
    sampling = SamplingParams(1.0 if body.temperature is None else body.temperature,
                              1.0 if body.top_p is None else body.top_p, body.top_k or 0, body.min_p or 0.0)
    if body.alpha_schedule is not None and body.decoding is None:
        mode = "plain" if mode == "speculative" else mode  # the server's default gives way to a schedule
    try:
        return Settings(max(params.max_tokens, 1), sampling, _alpha(body, n_pairs),
                        schedule_from_text(body.alpha_schedule) if body.alpha_schedule is not None else (),
                        _stop(body), body.seed, max(params.top_logprobs if params.logprobs else 0, params.details),
                        shaping, body.alone, body.decoding or mode)
    except ProxyTuneError as error:
        raise bad_request(str(error), next((name for name in ("alpha_schedule", "alone") if
                                            str(error).startswith(name)), "alpha")) from None


def build(tuner, params: Params, chat_roles: Sequence[str]) -> list[PromptRows]:
    """Engine requests: n rows per prompt; choice i is seeded with seed + i (as ProxyTuner.generate)."""
    settings = params.settings
    rows = []
    for i, prompt in enumerate(params.prompts):
        try:
            if params.kind == "chat":
                first = tuner.request(messages=prompt, chat_roles=chat_roles, settings=settings, label="messages")
            elif isinstance(prompt, str):
                label = f"prompt {i}" if len(params.prompts) > 1 else "prompt"
                first = tuner.request(prompt, settings=settings, label=label)
            else:
                first = token_request(tuner, prompt, settings)
        except ProxyTuneError as error:
            code = "context_length_exceeded" if "context" in str(error) else None
            field = next((name for name in ("alone", "alpha_schedule", "alpha") + SHAPING
                          if str(error).startswith(name)), "messages" if params.kind == "chat" else "prompt")
            raise bad_request(str(error), field, code) from None
        if params.max_tokens_given:
            check_room(tuner, first, params)
        seeds = [None] * params.n if settings.seed is None else [settings.seed + c for c in range(params.n)]
        choices = [Request(first.prompts, first.settings.but(seed=seed)) for seed in seeds]
        ids = first.prompts["base"]
        text = prompt if isinstance(prompt, str) else tuner.tokenizer.decode(ids) if params.kind == "completion" else ""
        rows.append(PromptRows(ids, text, choices))
    return rows


def check_room(tuner, request: Request, params: Params) -> None:
    """As OpenAI does: a max_tokens that the context cannot hold after the prompt is refused, not cut short."""
    over = overflow(request.prompts, tuner.sources, params.max_tokens)
    if over is not None:
        role, prompt, limit = over
        field = "max_completion_tokens" if params.kind == "chat" else "max_tokens"
        raise bad_request(f"the {role} model's context holds {limit} tokens, but you asked for "
                          f"{prompt + params.max_tokens} ({prompt} in the prompt, {params.max_tokens} to "
                          f"generate); lower {field} to at most {max(limit - prompt, 0)} or "
                          f"shorten the prompt", field, "context_length_exceeded")


def token_request(tuner, ids: list[int], settings: Settings) -> Request:
    """A request over a prompt given as token ids (lm-eval's tokenized requests): every role gets them."""
    if any(t < 0 or t >= tuner.vocab_size for t in ids):
        raise ProxyTuneError(f"prompt token ids must be in [0, {tuner.vocab_size})")
    prompts = {role: list(ids) for role in tuner.roles}
    check_prompt_room(prompts, tuner.sources, "prompt")
    return Request(prompts, settle(tuner, settings))

