"""Which decoding a batch gets: plain, speculative (the expert drafts) or chunked (the base drafts).

The sessions decide, by what they declare: a base whose session can draft its own continuation (a
remote base, where every call is a round trip) is decoded in chunks, whatever else was asked, since
that is the cheap way to verify several tokens at once there; otherwise `speculative` chooses.
"""
from __future__ import annotations

from typing import Sequence

from ..backends.protocol import LogitSource
from .chunked import ChunkedDecoding
from .decoding import Decoding, Request, open_session
from .roles import ExpertPair
from .speculative import SpeculativeDecoding


def start_decoding(base: LogitSource, pairs: Sequence[ExpertPair], requests: Sequence[Request], tokenizer,
                   eos_ids: set[int], speculative: bool = False, draft_length: int | None = None) -> Decoding:
    session = open_session(base, pairs, requests)
    if session.base_drafts and not any(r.alpha_schedule for r in requests):  # chunks verify several positions
        return ChunkedDecoding(base, pairs, requests, tokenizer, eos_ids, draft_length, session=session)
    if speculative:
        return SpeculativeDecoding(base, pairs, requests, tokenizer, eos_ids, draft_length, session=session)
    return Decoding(base, pairs, requests, tokenizer, eos_ids, session=session)
