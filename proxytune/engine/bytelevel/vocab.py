"""The bytes every token stands for, and a sorted table of them that answers "which tokens begin with
these bytes" for the whole vocabulary at once.

Tokens are sorted by their byte strings, so the tokens that begin with a byte string r form one contiguous
range (found by bisection) and, inside it, the tokens that continue r with byte b form a sub-range in
order of b: the mass of every next byte is one `bincount` over that range, never a Python loop over
the vocabulary. Tokens that stand for no bytes (special and control tokens) have no place in text, so
they are left out; an end-of-text token is counted separately, as the end-of-text outcome.
"""
from __future__ import annotations

import bisect
import json
from typing import Sequence

import torch

from ...backends.token_bytes import hf_token_bytes
from ...errors import ProxyTuneError

PROBE = "Hello, world!  12.5 × 3 = 37.5\n\tdef f(x):\n    return x ** 2  # ñandú, 東京, 🙂"


def _decoder_kinds(tokenizer) -> set[str]:
    """The types of the fast tokenizer's decoder steps (ByteLevel, ByteFallback, Replace, Metaspace, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ProxyTuneError(f"byte-level proxy-tuning needs a fast (Rust) tokenizer; {type(tokenizer).__name__} "
                             f"is not one")
    kinds: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if "type" in node:
                kinds.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(backend.to_str()).get("decoder"))
    return kinds


def token_bytes(tokenizer, role: str = "model") -> list[bytes]:
    """The bytes of every token id, in id order; b"" for tokens that stand for no text.

    Byte-level BPE (GPT-2, Qwen, SmolLM2) maps its printable alphabet back to bytes; SentencePiece-style
    vocabularies (Gemma, Llama 2) write a space as "▁" and unrepresentable bytes as "<0xNN>". The table is
    checked against the tokenizer's own decoding of a probe text, so a vocabulary read wrongly is refused
    instead of giving wrong probabilities."""
    kinds = _decoder_kinds(tokenizer)
    kind = "gpt2" if "ByteLevel" in kinds else "llama" if kinds & {"ByteFallback", "Replace", "Metaspace"} else None
    if kind is None:
        raise ProxyTuneError(f"the {role} tokenizer's decoder ({sorted(kinds)}) has no known rule for the bytes of "
                             f"its tokens, so it cannot be read byte by byte")
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    added = tokenizer.added_tokens_decoder
    table: list[bytes] = []
    for token_id, piece in enumerate(pieces):
        if token_id in added:  # special tokens write nothing; other added tokens write their text
            table.append(b"" if added[token_id].special else added[token_id].content.encode())
        else:
            table.append(hf_token_bytes(piece or "", kind, special=False))
    _check(tokenizer, table, role)
    return table


def _check(tokenizer, table: Sequence[bytes], role: str) -> None:
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    ours = b"".join(table[i] for i in ids)
    theirs = tokenizer.decode(ids, skip_special_tokens=True).encode()
    # SentencePiece with a dummy prefix adds a space before the text and strips it when decoding.
    if ours != theirs and ours.removeprefix(b" ") != theirs:
        raise ProxyTuneError(f"could not read the byte strings of the {role} tokenizer's tokens (its decoder is "
                             f"{sorted(_decoder_kinds(tokenizer))}): a probe text decodes to {theirs[:40]!r} but "
                             f"its tokens' bytes give {ours[:40]!r}")


class ByteVocab:
    """A vocabulary's tokens sorted by their bytes: `lookup(prefix)` gives where the tokens beginning
    with `prefix` are, `next_byte_masses` the probability of each next byte given a token distribution."""

    def __init__(self, table: Sequence[bytes], vocab_size: int, eos_ids: Sequence[int] = ()):
        entries = sorted((piece, token_id) for token_id, piece in enumerate(table[:vocab_size]) if piece)
        if not entries:
            raise ProxyTuneError("the vocabulary has no token that stands for text")
        self.keys = [piece for piece, _ in entries]
        self.order = torch.tensor([token_id for _, token_id in entries], dtype=torch.long)  # sorted place -> id
        self.lengths = torch.tensor([len(piece) for piece in self.keys], dtype=torch.long)
        self.longest = int(self.lengths.max())
        padded = bytearray(len(self.keys) * self.longest)
        for place, piece in enumerate(self.keys):
            padded[place * self.longest:place * self.longest + len(piece)] = piece
        self.bytes_at = torch.frombuffer(padded, dtype=torch.uint8).reshape(len(self.keys), self.longest).clone()
        # every token's first byte as an index, ready for bincount: each new token path's distribution is
        # summed over the whole vocabulary by first byte, so this one column is read far more than the others
        self.first_bytes = self.bytes_at[:, 0].long()
        self.eos_ids = torch.tensor(sorted(i for i in eos_ids if i < vocab_size), dtype=torch.long)
        # the columns a distribution is read from: the text tokens in sorted places, then the end-of-text ones
        self.columns = torch.cat([self.order, self.eos_ids])
        self.everything = self.lookup(b"")  # the span of the empty remainder: every token

    def lookup(self, prefix: bytes, within: tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(lo, exact_end, hi): tokens in sorted places [lo, hi) begin with `prefix`; those in
        [lo, exact_end) are exactly `prefix`. `within`: a range known to hold them (the prefix's prefix)."""
        lo, hi = within or (0, len(self.keys))
        lo = bisect.bisect_left(self.keys, prefix, lo, hi)
        exact_end = bisect.bisect_right(self.keys, prefix, lo, hi)
        # every key beginning with prefix sorts before prefix + b"\xff\xff..." (no token is that long)
        hi = bisect.bisect_left(self.keys, prefix + b"\xff" * (self.longest + 1), exact_end, hi)
        return lo, exact_end, hi

    def next_byte_masses(self, probs: torch.Tensor, depth: int, span: tuple[int, int, int]) -> torch.Tensor:
        """[256] float64: for a distribution over tokens (in sorted places), the mass of the tokens that
        begin with the prefix of `span` (length `depth`) and continue it with each byte."""
        _, start, end = span
        if end <= start:
            return probs.new_zeros(256)
        if depth == 0 and span == self.everything:
            return torch.bincount(self.first_bytes, weights=probs, minlength=256)
        return torch.bincount(self.bytes_at[start:end, depth].long(), weights=probs[start:end], minlength=256)

    def distributions(self, logits: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
        """Each row of next-token logits [n, V] as (probabilities in sorted places, float64; p(end of text)),
        normalised over the tokens that write text and the end-of-text ones: tokens that write nothing are
        masked, exactly as a logit mask would remove them from token-level decoding. One gather and one
        normalisation for all the token paths of a step; each row's probabilities are a tensor of its own (a
        view of one block would keep the whole step's block alive as long as any of its paths lives)."""
        block = logits.index_select(1, self.columns).double()  # [n, text tokens + end-of-text tokens]
        block.sub_(torch.logsumexp(block, dim=1, keepdim=True)).exp_()
        text = len(self.order)
        eos = block[:, text:].sum(dim=1).tolist()
        return [(block[i, :text].clone(), eos[i]) for i in range(len(eos))]
