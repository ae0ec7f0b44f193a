"""Fine-tuning data: JSONL rows -> token ids with the loss on completion tokens only.

A row is {"prompt": str, "completion": str} (the completion is appended as is, then EOS) or
{"messages": [...]} (a chat whose last message is the assistant's reply: everything before it is
rendered with the model's chat template as the prompt). The prompt is tokenized on its own, exactly as
it will be when the tuned model later continues it, so training and decoding see the same tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ProxyTuneError
from ..jsonlines import json_lines
from ..engine.prompts import validate_messages

IGNORE = -100  # label value that cross-entropy skips


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens

    @property
    def completion_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def read_jsonl(path: Path) -> list[dict]:
    rows = [check_row(row, f"{path}:{number}") for number, row in json_lines(path, "data file")]
    if not rows:
        raise ProxyTuneError(f"{path} holds no examples (expected JSON lines with prompt/completion or messages)")
    return rows


def check_row(row, where: str) -> dict:
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        if not row["completion"]:
            raise ProxyTuneError(f"{where}: empty completion: nothing to learn")
        return row
    if isinstance(row, dict) and "messages" in row:
        try:
            messages = validate_messages(row["messages"])
        except ProxyTuneError as error:
            raise ProxyTuneError(f"{where}: {error}") from None
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise ProxyTuneError(f"{where}: the last message must be the assistant's reply, after at least one other")
        return row
    raise ProxyTuneError(f"{where}: expected an object with string 'prompt' and 'completion', or 'messages'")


def prompt_and_completion(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    if "messages" in row:
        context, reply = row["messages"][:-1], row["messages"][-1]["content"]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            from ..engine.prompts import plain_text

            prompt = tokenizer(plain_text(context))["input_ids"]
        return prompt, tokenizer(reply, add_special_tokens=False)["input_ids"]
    return tokenizer(row["prompt"])["input_ids"], tokenizer(row["completion"], add_special_tokens=False)["input_ids"]


def tokenize(rows: list[dict], tokenizer, max_length: int) -> list[Example]:
    """Completion tokens then EOS; sequences longer than max_length lose their end (the prompt is kept)."""
    eos = tokenizer.eos_token_id
    examples = []
    for row in rows:
        prompt, completion = prompt_and_completion(row, tokenizer)
        completion = completion + ([eos] if eos is not None else [])
        ids = (prompt + completion)[:max_length]
        labels = ([IGNORE] * len(prompt) + completion)[:max_length]
        if any(label != IGNORE for label in labels[1:]):  # the first position is never predicted
            examples.append(Example(ids, labels))
    if not examples:
        raise ProxyTuneError(f"no example has a completion token within --max-length {max_length}")
    return examples


def split_heldout(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded random `fraction` of the rows (at least one when there are two or more)."""
    if not 0 <= fraction < 1:
        raise ProxyTuneError(f"held-out fraction must be in [0, 1), got {fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    count = max(1, round(fraction * len(rows))) if fraction > 0 and len(rows) >= 2 else 0
    heldout = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in heldout], [r for i, r in enumerate(rows) if i in heldout]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and of the loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[Example]]:
    """A seeded shuffle per epoch, so a resumed run replays exactly the batches it had not yet seen."""
    order = list(range(len(examples)))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return [[examples[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]
