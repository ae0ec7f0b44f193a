"""Per-role prompt formatting.

`generate()` gives every role the raw prompt. `chat()` renders a conversation for each role in
`chat_roles` with that role's own chat template, and for the other roles as plain text; the paper's
setting (expert chat-formatted, base and anti-expert raw) is `chat_roles=("expert",)`.

Plain text, also used for a tokenizer without a chat template: a lone user message is its content;
otherwise "System: …\\n\\nUser: …\\n\\nAssistant: …\\n\\n" turns ending with "Assistant:".
"""
from __future__ import annotations

from typing import Sequence

from ..errors import ProxyTuneError

ALL_ROLES = ("base", "expert", "anti_expert")  # role kinds: chat_roles=("expert",) is the paper's setting


def chat_role_kinds(value) -> tuple[str, ...]:
    """Role kinds from a comma-separated string or a sequence, written either way (anti_expert as the API
    spells it, anti-expert as the CLI's --anti-expert does); anything else is refused naming the kinds."""
    names = value.split(",") if isinstance(value, str) else value
    if isinstance(names, (bytes, dict)) or not isinstance(names, (list, tuple, set, frozenset)) \
            or not all(isinstance(n, str) for n in names):
        raise ProxyTuneError(f"chat_roles must name role kinds ({', '.join(ALL_ROLES)}), got {value!r}")
    kinds = tuple(dict.fromkeys(n.strip().replace("-", "_") for n in names if n.strip()))
    unknown = sorted(set(kinds) - set(ALL_ROLES))
    if unknown:
        raise ProxyTuneError(f"chat_roles may name {', '.join(ALL_ROLES)} (or anti-expert), got {', '.join(unknown)}")
    return kinds


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ProxyTuneError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise ProxyTuneError(f"message {i} must be a dict with a 'role' (system, user, assistant) and a "
                                 f"string 'content', got {message!r}")
    return list(messages)


def plain_text(messages: Sequence[dict]) -> str:
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(turns + ["Assistant:"])


def chat_prompt_ids(tokenizer, messages: Sequence[dict], use_template: bool) -> list[int]:
    if use_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(plain_text(messages))["input_ids"]
