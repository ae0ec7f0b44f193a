"""Token-level traces of proxy-tuned generations: at each generated token, what every role thought.

A trace is plain data (saved as traces.jsonl): for each token its text piece and character span in the
output, the probability every role (base, expert, anti_expert, proxy) gave the chosen token, and each
role's top tokens. The analyses and the HTML page read only traces.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ...engine.decoding import GenerationOutput
from ...engine.scoring import proxy_logits
from ...engine.text import IncrementalDetokenizer


def pieces(tokenizer, token_ids: Sequence[int]) -> list[tuple[str, int, int]]:
    """(text piece, start, end) of each token in the decoded output, from the engine's incremental
    detokenizer: characters that span several byte-level tokens go to the token that completes them."""
    detokenizer, spans, length = IncrementalDetokenizer(tokenizer), [], 0
    for token_id in token_ids:
        piece = detokenizer.add(int(token_id))
        spans.append((piece, length, length + len(piece)))
        length += len(piece)
    rest = detokenizer.flush()  # an unfinished character at the very end still shows, as decode() shows it
    if rest and spans:
        piece, start, end = spans[-1]
        spans[-1] = (piece + rest, start, end + len(rest))
    return spans


def trace_of(tokenizer, prompt: str, output: GenerationOutput, label: str = "") -> dict:
    steps = output.details or []
    tokens = []
    for (piece, start, end), token_id, detail in zip(pieces(tokenizer, output.token_ids), output.token_ids, steps):
        tokens.append({
            "id": token_id, "piece": piece, "start": start, "end": end,
            "chosen": {role: round(p, 6) for role, p in detail.chosen_prob.items()},
            "top": {role: [[tokenizer.decode([i]), round(p, 6)] for i, p in top] for role, top in detail.top.items()},
            "top_id": {role: top[0][0] for role, top in detail.top.items()},
        })
    return {"label": label, "prompt": prompt, "text": output.text, "tokens": tokens}


def collect(tuner, prompts: Sequence[str], labels: Sequence[str] | None = None, max_new_tokens: int = 256,
            stop: Sequence[str] = (), top_k: int = 5, alpha=None, batch_size: int = 8) -> list[dict]:
    """Greedy proxy-tuned generations with every role's view of every token."""
    outputs = tuner.generate(list(prompts), max_new_tokens=max_new_tokens, stop=list(stop) or None, alpha=alpha,
                             return_details=top_k, batch_size=batch_size)
    labels = list(labels) if labels is not None else [f"prompt {i}" for i in range(len(prompts))]
    return [trace_of(tuner.tokenizer, p, o, label) for p, o, label in zip(prompts, outputs, labels)]


def rescored_trace(tuner, prompt: str, token_ids: Sequence[int], alpha: float, top_k: int = 5, label: str = "") -> dict:
    """The trace of an already generated output (e.g. an eval's proxy answer), from one full-sequence
    forward per model instead of a token-by-token decoding: position t's logits are exactly what the
    decoder saw when it chose token t (teacher forcing on its own greedy path)."""
    item = tuner.token_item(tuner.encode(prompt), token_ids)
    per_role = tuner.role_logits([item])[0]
    logits = {role: per_role[role] for role in ("base", "expert", "anti_expert")}
    logits["proxy"] = proxy_logits(tuner.schema, per_role, [alpha])
    probs = {role: torch.softmax(z.float(), dim=-1) for role, z in logits.items()}
    tokens = []
    for t, ((piece, start, end), token_id) in enumerate(zip(pieces(tuner.tokenizer, token_ids), token_ids)):
        top, top_ids, chosen = {}, {}, {}
        for role, p in probs.items():
            values, ids = p[t].topk(top_k)
            top[role] = [[tuner.tokenizer.decode([int(i)]), round(float(v), 6)] for i, v in zip(ids, values)]
            top_ids[role] = int(ids[0])
            chosen[role] = round(float(p[t, token_id]), 6)
        tokens.append({"id": int(token_id), "piece": piece, "start": start, "end": end, "chosen": chosen,
                       "top": top, "top_id": top_ids})
    return {"label": label, "prompt": prompt, "text": tuner.tokenizer.decode(list(token_ids), skip_special_tokens=True),
            "tokens": tokens}
