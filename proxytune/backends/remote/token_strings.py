"""From an API's top-k *token strings* to logit rows over local token ids.

OpenAI-compatible servers return top-k logprobs keyed by token text, not ids. vLLM can key them
"token_id:N" (exact). llama.cpp's server keys them by the token's bytes decoded with
errors="ignore" and with special tokens rendered as "", so byte fragments and special tokens all
collapse into the key "" and overwrite each other. The local tokenizer must be the remote model's
own (checked at start-up), and this table inverts its id -> text map deliberately:

* a text that belongs to one id maps to that id;
* a text shared by several ids maps to the one the tokenizer itself produces for that text
  (the canonical tokenization), else the lowest id;
* "" (special tokens and byte fragments on llama.cpp) maps to the end-of-sequence id when
  `empty_is_eos` and it is among the first `eos_rank` entries (where, in ordinary text, a "" is
  the model wanting to stop); otherwise "" is dropped;
* anything else is dropped and counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TOKEN_ID_PREFIX = "token_id:"  # vLLM --return-tokens-as-token-ids / return_tokens_as_token_ids


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """The text a server shows for each id. Decoding [anchor, id] and cutting the anchor's text keeps
    the leading space that SentencePiece-style tokenizers strip from a lone token."""
    anchor = next(i for i in range(vocab_size) if i not in set(tokenizer.all_special_ids))
    anchor_text = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    pairs = tokenizer.batch_decode([[anchor, i] for i in range(vocab_size)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    texts = [pair[len(anchor_text):] if pair.startswith(anchor_text) else tokenizer.decode([i]) for i, pair in
             enumerate(pairs)]
    # errors="ignore" on a partial UTF-8 sequence drops the undecodable bytes (shown here as U+FFFD).
    return [t.replace("\ufffd", "") for t in texts]


@dataclass
class TokenStrings:
    """Inverse of the tokenizer's id -> text map, built once per tokenizer."""
    texts: list[str]  # id -> text as a server shows it
    ids_by_text: dict[str, int]
    special_texts: dict[str, int]
    eos_id: int | None
    shared: frozenset[str] = frozenset()  # texts several ids show (and ""): a key that cannot name one token

    @classmethod
    def build(cls, tokenizer, vocab_size: int) -> "TokenStrings":
        texts = token_texts(tokenizer, vocab_size)
        groups: dict[str, list[int]] = {}
        for token_id, text in enumerate(texts):
            groups.setdefault(text, []).append(token_id)
        ids_by_text = {}
        for text, ids in groups.items():
            if len(ids) > 1:
                canonical = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
                ids_by_text[text] = canonical[0] if len(canonical) == 1 and canonical[0] in ids else min(ids)
            else:
                ids_by_text[text] = ids[0]
        special = {tokenizer.convert_ids_to_tokens(i): i for i in tokenizer.all_special_ids if i < vocab_size}
        shared = frozenset(text for text, ids in groups.items() if len(ids) > 1) | {""}
        return cls(texts, ids_by_text, special, tokenizer.eos_token_id, shared)

    def to_id(self, key: str, empty_is_eos: bool) -> int | None:
        if key.startswith(TOKEN_ID_PREFIX):
            return int(key[len(TOKEN_ID_PREFIX):])
        if key == "":
            return self.eos_id if empty_is_eos else None
        if key in self.special_texts:  # servers that render special tokens (vLLM, OpenAI)
            return self.special_texts[key]
        return self.ids_by_text.get(key)

    def exact_id(self, key: str) -> int | None:
        """The id of the one token this key can stand for (a "token_id:N" key, or a text only one id
        shows), else None: what the server really produced under this key is then unknown."""
        if key.startswith(TOKEN_ID_PREFIX):
            return int(key[len(TOKEN_ID_PREFIX):])
        if key in self.shared or key in self.special_texts:
            return None
        return self.ids_by_text.get(key)


@dataclass
class RowStats:
    candidates: int = 0  # top-k entries turned into logits
    dropped: int = 0  # entries no local id could be given to
    empty_as_eos: int = 0  # "" entries read as end of sequence


def empty_key_value(top: dict[str, float]) -> float:
    """The logprob to give the "" entry of a llama.cpp top-k dict.

    llama-cpp-python builds the dict from the top-k in descending order, so a key keeps the position
    of its *best* token while its value is overwritten by its *worst*: with EOS and, say,
    <|endoftext|> both in the top-k, "" sits at EOS's rank but carries <|endoftext|>'s logprob. The
    position is the reliable part: EOS's logprob lies between its neighbours' values, so the value
    is pinned just above the next entry (and never above the previous one). Ranks, and so greedy
    choices, are then the server's own; the value is exact when nothing collided.
    """
    keys = list(top)
    position = keys.index("")
    reported = float(top[""])
    lower = float(top[keys[position + 1]]) if position + 1 < len(keys) else reported
    upper = float(top[keys[position - 1]]) if position > 0 else float("inf")
    return min(upper, max(reported, lower + 1e-3))


def logit_row(top: dict[str, float], strings: TokenStrings, vocab_size: int, empty_is_eos: bool,
              stats: RowStats, eos_rank: int = 3) -> torch.Tensor:
    """[V] logits: the returned logprobs on their ids, −inf elsewhere.

    −inf outside the returned set follows the paper (Liu et al. 2024, §5: with GPT-3.5 only the top-5
    are known, so the proxy distribution is restricted to them): z_base is unknown there, and any
    finite guess would let the small models' α(z_e − z_a) promote a token the large model never
    proposed. Logprobs serve as logits: softmax is shift-invariant, so within one row they are the
    base logits up to a constant.
    """
    row = torch.full((vocab_size,), float("-inf"))
    top = dict(top)
    if "" in top and empty_is_eos:
        if list(top).index("") < eos_rank:
            top[""] = empty_key_value(top)
        else:  # deep in the list "" is more likely a byte fragment; as EOS, α·shift could promote it wrongly
            del top[""]
            stats.dropped += 1
    for key, logprob in top.items():
        token_id = strings.to_id(key, empty_is_eos)
        if token_id is None or not 0 <= token_id < vocab_size or logprob is None or math.isnan(logprob):
            stats.dropped += 1
            continue
        if key == "" and empty_is_eos:
            stats.empty_as_eos += 1
        row[token_id] = max(float(row[token_id]), float(logprob))  # two keys for one id: keep the larger
        stats.candidates += 1
    return row
