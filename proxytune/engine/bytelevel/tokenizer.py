"""The tokenizer of byte-level decoding: ids 0..255 are bytes, 256 is the end of text.

The engine's text layer decodes generated ids with it like any tokenizer: an unfinished UTF-8 character
decodes to "\\ufffd", which the streaming detokenizer holds back, so a multi-byte character is never
shown half-way.
"""
from __future__ import annotations

from typing import Sequence

from .source import END_OF_TEXT


class ByteTokenizer:
    eos_token_id = END_OF_TEXT
    eos_token = "<end of text>"
    bos_token_id = None
    bos_token = pad_token = None

    def __len__(self) -> int:
        return END_OF_TEXT + 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(text.encode())}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = bytes(i for i in ids if i < END_OF_TEXT).decode("utf-8", errors="replace")
        if not skip_special_tokens and END_OF_TEXT in ids:
            text += self.eos_token
        return text

    def convert_ids_to_tokens(self, ids):
        """A byte as the character it is when it is printable ASCII, else <0xNN>."""
        if isinstance(ids, int):
            return self.convert_ids_to_tokens([ids])[0]
        return [self.eos_token if i == END_OF_TEXT else chr(i) if 32 <= i < 127 else f"<0x{i:02X}>" for i in ids]
