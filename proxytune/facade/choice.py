"""Multiple choice: the answer is restricted to given option strings, and only those are reweighted.

This is the paper's black-box setting (GPT-3.5 with top-5 logprobs, RealtimeQA A/B/C/D): the base
model's next-token distribution is known only on a few candidates, the small expert and
anti-expert shift those, and the answer is the option with the highest proxy score.

An option's score is Σ_t log p̃(o_t | prompt, o_<t), with p̃ = softmax(z_base + α(z_expert −
z_anti_expert)) at each position: exactly what `ProxyTuner.score` gives, so with local models the
chosen option is the one local scoring prefers. For one-token options it is the proxy logits of
the options renormalised over the options alone. A remote base only knows its top-k candidates at
each position: an option token outside them scores −inf (the paper restricts to the returned set).

Cost with a remote base: one call for the prompt (shared by all options), plus one call per extra
token of each multi-token option (or one echo call per option with echo=1). A chat-only base
(api=chat) answers through /v1/chat/completions with top_logprobs: one call per question, options of
one token each (its first reply token is all a chat endpoint reveals).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..backends.protocol import Capabilities
from ..errors import ProxyTuneError
from ..engine.decoding import open_session
from ..engine.scoring import token_scores
from ..engine.session import ProxySession


@dataclass
class Choice:
    index: int | None  # the chosen option; None when no option is possible (all scores −inf)
    option: str | None
    scores: list[float]  # Σ log p̃ over each option's tokens (−inf: outside a remote base's top-k)
    probs: list[float]  # softmax of the scores over the options

    @property
    def impossible(self) -> list[int]:
        """Options scored −inf: outside a remote base's top-k (or never writable): they cannot win, and the
        probabilities are over the other options only."""
        return [i for i, score in enumerate(self.scores) if score == float("-inf")]

    def as_dict(self) -> dict:
        """Valid JSON: an impossible option's score is null (JSON has no −Infinity), listed in "impossible"."""
        return {"index": self.index, "option": self.option,
                "scores": [None if i in self.impossible else s for i, s in enumerate(self.scores)],
                "probs": self.probs, "impossible": self.impossible}


def check_options(options) -> list[str]:
    if isinstance(options, str) or not isinstance(options, (list, tuple)) or len(options) < 2:
        raise ProxyTuneError("give at least two options (a list of strings)")
    if not all(isinstance(o, str) and o for o in options):
        raise ProxyTuneError(f"every option must be a non-empty string, got {options!r}")
    if len(set(options)) != len(options):
        raise ProxyTuneError(f"options must differ, got {options!r}")
    return list(options)


def option_scores(session: ProxySession, options_ids: Sequence[list[int]]) -> list[float]:
    """Σ log p̃ per option, for a one-row session that has not been prefilled yet."""
    first = session.prefill().combined[0]
    scores = []
    for ids in options_ids:
        if len(ids) > 1:  # teacher-force the option, then go back to the bare prompt for the next one
            rest = session.advance(torch.tensor([ids[:-1]], dtype=torch.long)).combined[0]
            session.rewind([0])
            rows = torch.cat([first[None], rest.to(first.device)])
        else:
            rows = first[None]
        total = token_scores(rows, ids).total
        scores.append(total if not math.isnan(total) else float("-inf"))
    return scores


class KnownRow:
    """A base whose next-token logits after the prompt are already known (a chat-only API's first reply
    token): prefill gives them; it cannot go further, so options must be one token."""

    max_length = None
    distribution = "top_k"  # a chat endpoint's top_logprobs
    server_calls = None  # its one call is counted on the chat base it came from

    def __init__(self, row: torch.Tensor, name: str = "base", eos_token_ids: frozenset[int] = frozenset()):
        self.row, self.name, self.vocab_size = row, name, row.shape[-1]
        self.eos_token_ids = eos_token_ids

    def open(self, prompts):
        row = self.row

        class Session:
            capabilities = Capabilities()

            def prefill(self):
                return row[None]

            def advance(self, tokens, extend=False):
                raise ProxyTuneError("a chat-only base reveals only its first reply token: give one-token options")

        return Session()

    def sequence_logits(self, sequences):
        raise ProxyTuneError("a chat-only base cannot score sequences")


def chat_base(tuner):
    """The base when it is a chat-only remote model (api=chat), else None."""
    base = tuner.remote_sources().get("base")
    return base if base is not None and base.options.api == "chat" else None


def decide(options: list[str], scores: list[float]) -> Choice:
    values = torch.tensor(scores, dtype=torch.float64)
    if torch.isinf(values).all():
        return Choice(None, None, scores, [0.0] * len(scores))
    probs = torch.softmax(values, dim=0).tolist()
    index = int(values.argmax())
    return Choice(index, options[index], scores, probs)


def choose(tuner, options: Sequence[str], prompt: str | None = None, messages=None, alpha=None,
           chat_roles: Sequence[str] | None = None) -> Choice:
    """Pick one of `options` as the continuation of `prompt` (or of a chat conversation).

    Options are tokenized on their own and appended to the prompt's tokens (as `score` does), so
    give them with the separator they need, e.g. " A" after "Answer:".
    """
    options = check_options(options)
    chat_only = chat_base(tuner)
    if chat_only is not None and messages is None:  # a chat endpoint takes the prompt as the user's message
        messages = [{"role": "user", "content": prompt}]
    kwargs = {"messages": messages} if messages is not None else {"prompt": prompt}
    if chat_roles is not None:
        kwargs["chat_roles"] = tuple(chat_roles)
    request = tuner.request(alpha=alpha, max_new_tokens=1, **kwargs)
    options_ids = [tuner.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    for option, ids in zip(options, options_ids):
        if not ids:
            raise ProxyTuneError(f"option {option!r} has no tokens")
    base = tuner.sources["base"]
    if chat_only is not None:
        long = [o for o, ids in zip(options, options_ids) if len(ids) > 1]
        if long:
            raise ProxyTuneError(f"options {long} are several tokens each; a chat-only base reveals only its first "
                                 f"reply token: give one-token options (e.g. 'A', 'B')")
        base = KnownRow(chat_only.chat_next_logits(list(messages)), name="base",
                        eos_token_ids=chat_only.eos_token_ids)
    return decide(options, option_scores(open_session(base, tuner.pairs, [request]), options_ids))
