"""Which decoding a batch gets: plain, speculative (the expert drafts) or chunked (the base drafts).

The mode is one value (settings.MODES: plain, speculative, auto), and the sessions decide the rest by
what they declare: a base whose session can draft its own continuation (a remote base, where every call
is a round trip) is decoded in chunks, whatever mode was asked, since that is the cheap way to verify
several tokens at once there. "auto" drafts with the expert where that is exact and possible (no α
schedule, every session rolls back) and decodes plainly otherwise; "speculative" insists, and says why
when it cannot. Every mode gives the same tokens.
"""
from __future__ import annotations

from typing import Sequence

from ..backends.protocol import LogitSource
from ..errors import ProxyTuneError
from .chunked import ChunkedDecoding
from .decoding import Decoding, Request, open_session
from .roles import ExpertPair
from .settings import check_mode
from .speculative import SpeculativeDecoding


def batch_mode(requests: Sequence[Request]) -> str:
    """The mode the requests of one batch ask for (they must agree: a batch is decoded one way)."""
    modes = {r.settings.mode for r in requests}
    if len(modes) > 1:
        raise ProxyTuneError(f"one batch is decoded one way; these requests ask for {', '.join(sorted(modes))}: "
                             f"decode them in separate batches")
    return modes.pop() if modes else "plain"


def start_decoding(base: LogitSource, pairs: Sequence[ExpertPair], requests: Sequence[Request], tokenizer,
                   eos_ids: set[int], mode: str = "plain", draft_length: int | None = None) -> Decoding:
    check_mode(mode)
    session = open_session(base, pairs, requests)
    scheduled = any(r.settings.alpha_schedule for r in requests)
    if session.base_drafts and not scheduled:  # chunks verify several positions
        return ChunkedDecoding(base, pairs, requests, tokenizer, eos_ids, draft_length, session=session)
    drafts = mode == "speculative" or (mode == "auto" and not scheduled and not session.lacking("rollback"))
    if drafts:
        return SpeculativeDecoding(base, pairs, requests, tokenizer, eos_ids, draft_length, session=session)
    return Decoding(base, pairs, requests, tokenizer, eos_ids, session=session)
