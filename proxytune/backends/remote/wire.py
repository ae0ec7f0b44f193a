"""What a remote source sends for a sequence of token ids, and whether the server reads back the same ids.

Text is what most servers accept, so each call sends the decoded token sequence (without a leading BOS
when the server adds its own). If re-tokenising that text would not give back exactly the chosen ids,
the server would condition on a different sequence than the one decoded: that *drift* is detected
with the local tokenizer (checked against the server's at start-up, see startup.py) and warned about or
raised (`drift=`); `send_ids=1` sends the ids themselves to servers that accept them (vLLM, OpenAI).
"""
from __future__ import annotations

import logging
from typing import Sequence

from .http import RemoteSourceError
from .spec import RemoteOptions
from .stats import COUNTING, RemoteStats

log = logging.getLogger("proxytune.remote")


class Wire:
    """The prompt of each call, for one source (`name`: its role, in messages)."""

    def __init__(self, tokenizer, options: RemoteOptions, name: str, stats: RemoteStats):
        self.tokenizer, self.options, self.name, self.stats = tokenizer, options, name, stats
        bos = tokenizer.bos_token_id
        # A tokenizer that adds BOS itself serves a model whose server adds it too: send the text without it.
        self.strip_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.drift_warned = False

    def prompt(self, ids: Sequence[int]):
        """What to send for these ids: the ids themselves (send_ids=1), or their text, checked for drift."""
        return self.encode(ids)[0]

    def encode(self, ids: Sequence[int], read: bool = False) -> tuple:
        """(what to send for these ids, the tokens the server reads from it). The reading is the local
        tokenizer's (checked equal to the server's at start-up), computed for the drift check or when asked
        (`read`); None with send_ids (the server reads the ids themselves) or when not computed."""
        if self.options.send_ids:
            return list(ids), None
        sent = self.sent(ids)
        text = self.text(sent)
        again = self.read(text) if read or self.options.drift != "off" else None
        if self.options.drift != "off" and again != sent:
            self.drift(sent, again)
        return text, again

    def sent(self, ids: Sequence[int]) -> list[int]:
        """The ids whose text is sent: without a leading BOS when the server adds its own."""
        ids = list(ids)
        return ids[1:] if self.strip_bos and ids[:1] == [self.tokenizer.bos_token_id] else ids

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def read(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def continues(self, ids: Sequence[int], drafts: list[int], conditioned: list[int] | None) -> bool:
        """Whether the server's next distribution (after ids + drafts) is what a one-token call would get:
        with send_ids always; with text, when the text of ids + drafts re-tokenises to the tokens the server
        conditioned on (its tokenization of the sent text, then the drafts)."""
        if conditioned is None:
            return True
        return self.read(self.text(self.sent(list(ids) + drafts))) == conditioned + drafts

    def drift(self, ids: list[int], again: list[int]) -> None:
        at = next((i for i, (a, b) in enumerate(zip(ids, again)) if a != b), min(len(ids), len(again)))
        message = (f"re-tokenisation drift at the {self.name} model ({self.options.base_url}): the chosen tokens "
                   f"{ids[at:at + 4]} re-tokenise as {again[at:at + 4]} (position {at}), so the server conditions "
                   f"on a different token sequence than the one decoded")
        self.stats.add(drift=1)
        with COUNTING:
            first = not self.drift_warned
            self.drift_warned = True
        if self.options.drift == "error":
            raise RemoteSourceError(message + "; drift=warn continues anyway, send_ids=1 avoids it on vLLM/OpenAI")
        if first:
            log.warning("%s (further drifts are only counted)", message)
