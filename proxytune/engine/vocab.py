"""Vocabulary safety: proxy-tuning adds logits column by column, so column i must be the same token
in every model. Padded embedding rows beyond the tokenizer's vocabulary are cut."""
from __future__ import annotations

from ..errors import ProxyTuneError


def token_table(tokenizer) -> list[str]:
    """The token string of every id, in id order."""
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def _agrees(table: list[str], reference: list[str]) -> bool:
    """Whether two id -> token tables agree over their shared range."""
    return table is reference or table[:len(reference)] == reference[:len(table)]


def vocabularies_agree(tables: dict[str, list[str]]) -> bool:
    """Whether every role's id -> token table agrees with the first role's over their shared range."""
    reference = next(iter(tables.values()))
    return all(_agrees(table, reference) for table in tables.values())


def shared_vocab_size(tables: dict[str, list[str]], logit_widths: dict[str, int]) -> int:
    """Check that every role's id -> token table agrees with the base's over their shared range and
    return the number of logit columns all roles share."""
    reference_role, reference = next(iter(tables.items()))
    for role, table in tables.items():
        if _agrees(table, reference):
            continue
        n = min(len(table), len(reference))
        differing = [i for i in range(n) if table[i] != reference[i]]
        if differing:
            examples = "; ".join(f"id {i}: {reference_role} {reference[i]!r} vs {role} {table[i]!r}" for i in differing[:3])
            raise ProxyTuneError(
                f"the {role} model's vocabulary differs from the {reference_role} model's at {len(differing)} of "
                f"{n} shared ids ({examples}). Proxy-tuning adds logits token by token, so all models must share "
                f"one tokenizer: use models of the same family, or decode byte by byte (byte_level=True, --byte-level).")
    size = min(min(len(t) for t in tables.values()), min(logit_widths.values()))
    if size <= 0:
        raise ProxyTuneError("the models share no vocabulary")
    return size
