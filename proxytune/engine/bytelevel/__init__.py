"""Proxy-tuning across vocabularies: every role read one byte at a time, combined per byte.

    log p̃(b | text) = log p_base(b | text) + Σᵢ αᵢ (log p_expertᵢ(b | text) − log p_antiᵢ(b | text))

over the 256 bytes and the end of text. Each role's `ByteSource` turns its token-level model into the
exact next-byte distribution of its text (`source.py`), so the one decoding loop, sampling, stopping,
batching, streaming and scoring run unchanged over a vocabulary of 257 (`tokenizer.py`).
"""
from .source import BYTE_VOCAB, END_OF_TEXT, ByteSource, ByteStats
from .tokenizer import ByteTokenizer
from .vocab import ByteVocab, token_bytes

__all__ = ["BYTE_VOCAB", "END_OF_TEXT", "ByteSource", "ByteStats", "ByteTokenizer", "ByteVocab", "token_bytes"]
