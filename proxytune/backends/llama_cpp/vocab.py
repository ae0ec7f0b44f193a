"""The text side of a llama.cpp role: an HF tokenizer read from the same GGUF, checked id by id.

The decoder turns text into ids and ids into text with an HF tokenizer (chat templates, stop strings,
streaming), while llama.cpp only ever sees ids. That is sound only if both read every id as the same
bytes, so this compares llama.cpp's `token_to_piece` with the bytes the HF tokenizer gives each id.
Across roles the usual check applies (vocab.shared_vocab_size: token strings by id), so a GGUF role
and a transformers role are checked exactly as two transformers roles are.
"""
from __future__ import annotations

from ...errors import ProxyTuneError
from ..token_bytes import hf_token_bytes
from .model import GGUFModel

def check_tokenizer_matches(model: GGUFModel, tokenizer) -> None:
    """Every id the HF tokenizer knows must be the same bytes in llama.cpp, else a ProxyTuneError."""
    kind = model.metadata("tokenizer.ggml.model") or ""
    count = min(len(tokenizer), model.n_vocab)
    tokens = tokenizer.convert_ids_to_tokens(list(range(count)))
    special = {int(i) for i in tokenizer.added_tokens_decoder}
    differing = []
    for token_id, token in enumerate(tokens):
        expected = hf_token_bytes(token or "", kind, token_id in special)
        if expected is None:
            break  # no byte rule for this vocabulary type: the tuner's id-by-id string check still applies
        if model.token_bytes(token_id) != expected and not model.is_unused(token_id):
            differing.append(token_id)
    if differing:
        examples = "; ".join(f"id {i}: llama.cpp {model.token_bytes(i)!r} vs transformers {tokens[i]!r}"
                             for i in differing[:3])
        raise ProxyTuneError(f"llama.cpp and transformers read {len(differing)} of {count} token ids of "
                             f"{model.path} differently ({examples}); this GGUF's vocabulary cannot be used")
