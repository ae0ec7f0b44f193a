"""The bytes an HF token string stands for, by vocabulary kind: one rule for every place that needs it (the
llama.cpp vocabulary check, the byte-level view)."""
from __future__ import annotations

import functools
import re

SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character; this inverts that map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, characters)}


def hf_token_bytes(token: str, kind: str, special: bool) -> bytes | None:
    """The bytes of one HF token string: kind "gpt2" (byte-level BPE) or "llama" (SentencePiece: "▁" for a
    space, <0xNN> byte fallback); a special token as its text; None when the kind has no fixed rule."""
    if special:
        return token.encode()
    if kind == "gpt2":
        decoder = byte_decoder()
        if all(c in decoder for c in token):
            return bytes(decoder[c] for c in token)
        return token.encode()  # an added token kept as plain text
    if kind == "llama":
        match = SPM_BYTE.match(token)
        return bytes([int(match.group(1), 16)]) if match else token.replace("▁", " ").encode()
    return None
