"""How one request is decoded: one `Settings` object, made once at an edge and carried whole to the engine.

Every edge builds it from what it parses — the CLI's flags, the server's request body, a batch file's row,
lm-eval's arguments, the transformers integration, a trio config's α — and nothing after the edge unpacks
it into loose arguments again (as mlx-lm carries its generation arguments and vLLM its SamplingParams).
Its rules live here, beside `Request`: α (finite in float32, where logits are combined), α schedules,
the output budget, stop strings, the decoding mode; sampling bounds in sampling.py, shaping in shaping.py.

What depends on the models is settled by the tuner when it makes a `Request` (`resolved`): the default α
of each pair when the request names none, α per pair, a grammar bound to the vocabulary.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from ..errors import ProxyTuneError
from .sampling import SamplingParams
from .shaping import NO_SHAPING, Shaping

FLOAT32_MAX = 3.4028234663852886e38  # logits are combined in float32: a larger α becomes inf there
# plain: one token per step; speculative: the expert drafts, the base verifies several tokens per forward
# (same output); auto: speculative where it is exact and possible (a shared vocabulary, no α schedule,
# sessions that roll back), plain otherwise. A base that drafts its own continuation (a remote base) is
# decoded in chunks in every mode (its spec's chunk=0 turns that off).
MODES = ("plain", "speculative", "auto")
SAMPLING = ("temperature", "top_p", "top_k", "min_p")  # the keyword arguments that make SamplingParams
SHAPING = ("repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias", "response_format")


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ProxyTuneError(f"alpha must be a finite number, got {alpha!r}")
    if abs(alpha) > FLOAT32_MAX:
        raise ProxyTuneError(f"alpha {alpha!r} overflows float32, the dtype logits are combined in; use |alpha| <= 3.4e38 "
                             f"(values far above 10 already let the experts override the base completely)")
    return float(alpha)


def check_alphas(alpha) -> float | tuple[float, ...]:
    """α as a request gives it: one number for every pair, or one per pair (a non-empty list)."""
    if isinstance(alpha, (list, tuple)):
        if not alpha:
            raise ProxyTuneError("alpha must be a finite number or a list of them (one per expert pair), got []")
        return tuple(check_alpha(a) for a in alpha)
    return check_alpha(alpha)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ProxyTuneError(f"decoding must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


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


def check_schedule(schedule) -> tuple:
    """alpha_schedule={position: α or [α per pair], ...}: from that output position on (0 = the first new
    token), the pairs use these α; before the first position given, the request's alpha. A key may also be
    text, e.g. {0: 2.0, "####": 1.0}: once the output so far contains it, its α (after any position's)."""
    if schedule is None or isinstance(schedule, tuple):
        return schedule or ()
    if not isinstance(schedule, dict):
        raise ProxyTuneError(f"alpha_schedule maps output positions (or text markers) to α, e.g. "
                             f"{{0: 2.0, 32: 1.0}} or {{0: 2.0, '####': 1.0}}; got {schedule!r}")
    return order_schedule(schedule, check_alphas)


def check_stop(stop) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
        raise ProxyTuneError(f"stop must be a string or a list of strings, got {stop!r}")
    return tuple(stop or ())


def per_pair(alpha: float | tuple[float, ...], n_pairs: int) -> tuple[float, ...]:
    if not isinstance(alpha, tuple):
        return (alpha,) * n_pairs
    if len(alpha) != n_pairs:
        raise ProxyTuneError(f"alpha has {len(alpha)} values for {n_pairs} expert pairs")
    return alpha


@dataclass(frozen=True)
class Settings:
    """Everything about one request but its prompt. Checked when made; `Settings.of` takes the loose
    keyword arguments of the Python API (temperature=..., return_details=..., repetition_penalty=...)."""
    max_new_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    alpha: float | tuple[float, ...] | None = None  # one for every pair, or one per pair; None: the tuner's default
    # (from output position, α) sorted, then (text marker, α): α changes at a position, or once the output so
    # far contains the marker (after every position's change); α as in `alpha`
    alpha_schedule: tuple[tuple[int | str, float | tuple[float, ...]], ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    details: int = 0  # top-k per role to record at each step (0 = none)
    shaping: Shaping = NO_SHAPING  # penalties, logit_bias, an output format: on the combined logits (shaping.py)
    alone: str | None = None  # a role name: this row follows that role's own distribution (base/expert alone)
    mode: str = "plain"  # how its batch is decoded (MODES); the output is the same in every mode

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ProxyTuneError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.alpha is not None:
            object.__setattr__(self, "alpha", check_alphas(self.alpha))
        object.__setattr__(self, "alpha_schedule", check_schedule(self.alpha_schedule))
        object.__setattr__(self, "stop", check_stop(self.stop))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ProxyTuneError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.details, bool) or not isinstance(self.details, int) or self.details < 0:
            raise ProxyTuneError(f"details must be an integer >= 0 (top tokens per role and step), got {self.details!r}")
        if self.alone is not None and not isinstance(self.alone, str):
            raise ProxyTuneError(f"alone names a role, got {self.alone!r}")
        check_mode(self.mode)

    @classmethod
    def of(cls, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           min_p: float = 0.0, stop=None, seed: int | None = None, alpha=None, return_details=False,
           repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
           logit_bias=None, response_format=None, shaping: Shaping | None = None, alone: str | None = None,
           alpha_schedule=None, mode: str = "plain", speculative: bool = False) -> "Settings":
        """From the Python API's keyword arguments (see `with_options`)."""
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       min_p=min_p, stop=stop, seed=seed, alpha=alpha, return_details=return_details,
                       alone=alone, alpha_schedule=alpha_schedule, mode=mode, speculative=speculative)
        if shaping is not None:
            return cls().with_options(shaping=shaping, **options)
        return cls().with_options(repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                                  presence_penalty=presence_penalty, logit_bias=logit_bias,
                                  response_format=response_format, **options)

    def with_options(self, **options) -> "Settings":
        """These settings with some keyword arguments of the Python API changed (a batch file's row over the
        command's flags): temperature, top_p, top_k, min_p (the sampling); repetition_penalty,
        frequency_penalty, presence_penalty, logit_bias, response_format (the shaping, or a whole `shaping`);
        return_details (True: 5, or k); speculative=True (mode="speculative"); and the fields themselves."""
        sampling = {key: options.pop(key) for key in SAMPLING if key in options}
        shaping = {key: options.pop(key) for key in SHAPING if key in options}
        if sampling:
            options["sampling"] = dataclasses.replace(self.sampling, **sampling)
        if shaping:
            options["shaping"] = options.get("shaping", self.shaping).but(**shaping)
        if "return_details" in options:
            details = options.pop("return_details")
            options["details"] = 5 if details is True else int(details or 0)
        if options.pop("speculative", False):
            options["mode"] = "speculative"
        if options.get("alpha_schedule") is None and "alpha_schedule" in options:
            options["alpha_schedule"] = ()
        return dataclasses.replace(self, **options)

    def but(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def resolved(self, default_alphas: Sequence[float], roles: Sequence[str]) -> "Settings":
        """With α per pair (the tuner's default where the request names none) and the role of `alone` known."""
        if self.alone is not None and self.alone not in roles:
            raise ProxyTuneError(f"alone names a role ({', '.join(roles)}), got {self.alone!r}")
        n_pairs = len(default_alphas)
        alpha = tuple(default_alphas) if self.alpha is None else per_pair(self.alpha, n_pairs)
        schedule = []
        for key, value in self.alpha_schedule:
            try:
                schedule.append((key, per_pair(value, n_pairs)))
            except ProxyTuneError as error:
                raise ProxyTuneError(f"alpha_schedule[{key!r}]: {error}") from None
        return self.but(alpha=alpha, alpha_schedule=tuple(schedule))

    def alphas_at(self, position: int, text: str = "") -> list[float]:
        """The α of each pair for the token at this output position (0 = the first new token), after `text`
        (resolved settings only)."""
        alphas = list(self.alpha)
        for start, values in self.alpha_schedule:
            if (start in text) if isinstance(start, str) else start <= position:
                alphas = list(values)
        return alphas
