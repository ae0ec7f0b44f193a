"""A transformers causal LM as a logit source: its own DynamicCache, attention mask and positions.

Rows are left-padded. Tokens dropped by `rewind` stay in the cache but are masked out, and
position ids are the running count of unmasked tokens, so every row sees exactly its own
sequence; when all rows drop a common tail, the cache is cropped instead.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..errors import ProxyTuneError
from .protocol import Capabilities


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # HF convention for left padding: positions count real tokens; padded slots get a dummy 1.
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill_(mask == 0, 1)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if any(len(s) == 0 for s in sequences):
        raise ProxyTuneError("cannot run an empty token sequence: every prompt needs at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def _lora_only(model) -> bool:
    try:
        from peft import PeftType
        return all(config.peft_type == PeftType.LORA for config in model.peft_config.values())
    except (ImportError, AttributeError):
        return False


def _foldable(module, args):
    """Forward pre-hook for the output layer. With logits_to_keep, transformers hands it a strided slice
    (rows × 1 × hidden of rows × T × hidden); torch cannot fold that into one matrix product, expands the
    weight per row for a batched product (a 35 GB allocation for 128 rows of a 151 936-token vocabulary);
    when that failed on CPU, every later step of the process ran ~10× slower. A contiguous copy of one
    position per row costs nothing next to that."""
    hidden = args[0]
    if hidden.dim() >= 3 and any(hidden.stride(i) != hidden.stride(i + 1) * hidden.shape[i + 1]
                                 for i in range(hidden.dim() - 2)):
        return (hidden.clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def end_of_text_ids(model, tokenizer=None) -> frozenset[int]:
    """A causal LM's end-of-text ids: its generation config's (one id or a list: Llama 3 ends a turn with
    <|eot_id|> and text with <|end_of_text|>) and, when given, its tokenizer's."""
    config = model.generation_config  # a GenerationMixin's; None when the checkpoint names none
    value = None if config is None else config.eos_token_id
    ids = [value] if isinstance(value, int) else list(value or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


class TransformersSource:
    """Wraps a loaded `PreTrainedModel` (or a peft model).

    `adapter_disabled=True` runs a peft model with its adapters switched off: the anti-expert
    then shares the expert's base weights instead of holding a second copy. `tokenizer` (optional) adds
    its end-of-text id to the model's own.
    """

    distribution = "full"
    server_calls = None

    def __init__(self, model, vocab_size: int | None = None, name: str = "model",
                 adapter_disabled: bool = False, max_batch_tokens: int = 8192, tokenizer=None):
        self.model = model.eval()
        self.name = name
        self.eos_token_ids = end_of_text_ids(model, tokenizer)
        output_layer = model.get_output_embeddings()
        self.vocab_size = vocab_size or output_layer.weight.shape[0]
        if not getattr(output_layer, "_proxytune_foldable", False):  # sources sharing a model hook it once
            output_layer.register_forward_pre_hook(_foldable)
            output_layer._proxytune_foldable = True
        config = model.config
        # every device holding its weights (several with a device map): where its forwards run
        self.place = frozenset(str(p.device) for p in model.parameters())
        self.max_length = getattr(config, "max_position_embeddings", None)
        self.adapter_disabled = adapter_disabled
        self.max_batch_tokens = max_batch_tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, **inputs) -> torch.Tensor:
        context = contextlib.nullcontext()
        if self.adapter_disabled and _lora_only(self.model):
            # peft's disable_adapter() rescans the whole model on every call (0.1-0.3 s per step here);
            # a mixed-adapter batch of "__base__" rows runs the same weights without the adapter, for free.
            inputs["adapter_names"] = ["__base__"] * inputs["input_ids"].shape[0]
        elif self.adapter_disabled:
            context = self.model.disable_adapter()
        with torch.inference_mode(), context:
            out = self.model(**{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()})
        return out.logits[..., : self.vocab_size].float()

    def open(self, prompts: Sequence[Sequence[int]]) -> "TransformersSession":
        return TransformersSession(self, prompts)

    def sequence_logits(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        results: list[torch.Tensor] = []
        start = 0
        while start < len(sequences):
            # Group rows so that one forward never materialises more than max_batch_tokens logit rows.
            end = start + 1
            while end < len(sequences) and (end - start + 1) * max(map(len, sequences[start:end + 1])) <= self.max_batch_tokens:
                end += 1
            group = sequences[start:end]
            ids, mask = left_pad(group, pad_id=0)
            logits = self.forward(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
            for row, seq in enumerate(group):
                results.append(logits[row, ids.shape[1] - len(seq):].cpu())
            start = end
        return results


class TransformersSession:
    capabilities = Capabilities(rollback=True, join=True, fork=True, gather=True)

    def __init__(self, source: TransformersSource, prompts: Sequence[Sequence[int]]):
        self.source = source
        self.capabilities = replace(TransformersSession.capabilities, place=source.place)
        self.prompts = [list(p) for p in prompts]
        self.cache = DynamicCache()
        self.mask: torch.Tensor | None = None
        self._last_width = 0

    def prefill(self) -> torch.Tensor:
        ids, self.mask = left_pad(self.prompts, pad_id=0)
        logits = self.source.forward(input_ids=ids, attention_mask=self.mask, position_ids=_positions(self.mask),
                                     cache=self.cache, use_cache=True, logits_to_keep=1)
        return logits[:, -1]

    def advance(self, tokens: torch.Tensor, extend: bool = False) -> torch.Tensor:
        tokens = tokens.reshape(tokens.shape[0], -1).long().cpu()
        width = tokens.shape[1]
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        positions = _positions(self.mask)[:, -width:]
        # extend: a speculative draft grows one token at a time, and rewind must reach back over all of it.
        self._last_width = width + (self._last_width if extend else 0)
        return self.source.forward(input_ids=tokens, attention_mask=self.mask, position_ids=positions,
                                   cache=self.cache, use_cache=True, logits_to_keep=width)

    def rewind(self, keep: Sequence[int]) -> None:
        width = self._last_width
        if any(k < 0 or k > width for k in keep):
            raise ValueError(f"rewind keeps 0..{width} of the last tokens, got {list(keep)}")
        for row, kept in enumerate(keep):
            self.mask[row, self.mask.shape[1] - width + kept:] = 0
        droppable = width - max(keep, default=width)
        if droppable:
            self.cache.crop(-droppable)  # a negative count removes tokens (the only form transformers >= 5.24 takes)
            self.mask = self.mask[:, :-droppable]
        self._last_width = 0

    def select(self, rows: Sequence[int]) -> None:
        index = torch.tensor(list(rows), dtype=torch.long)
        for layer in self.cache.layers:  # each layer on its own device (a model split by a device map)
            if layer.is_initialized:
                layer.batch_select_indices(index.to(layer.keys.device))
        self.mask = self.mask[index]
        self.prompts = [self.prompts[r] for r in rows]
        self._drop_leading_padding()

    # --- dynamic batching (the server): rows join a running batch between steps ---------------------

    def join(self, other: "TransformersSession") -> None:
        """Append the rows of `other` (prefilled, same source) after this batch's rows.

        The narrower side is left-padded with zero keys/values under a 0 mask, so every row still
        attends to exactly its own tokens at its own positions: joining never changes a row's logits.
        """
        if other.source is not self.source:
            raise ValueError("only sessions of the same source can be joined")
        if self.mask is None or other.mask is None:
            raise ValueError("prefill both sessions before joining them")
        joined = self.gather([(self, range(len(self.prompts))), (other, range(len(other.prompts)))])
        self.cache, self.mask, self.prompts = joined.cache, joined.mask, joined.prompts
        self._last_width = 0  # a rewind cannot reach back across a join

    def fork(self, rows: Sequence[int] | None = None) -> "TransformersSession":
        """An independent copy (cache included) that can then advance on its own; `rows`: of these rows
        only, in this order (a row may repeat), copying nothing of the others."""
        if rows is None:
            twin = TransformersSession(self.source, self.prompts)
            twin.cache = copy.deepcopy(self.cache)
            twin.mask = None if self.mask is None else self.mask.clone()
            twin._last_width = self._last_width
            return twin
        if self.mask is None:
            raise ValueError("prefill the session before copying its rows")
        return self.gather([(self, rows)])

    def gather(self, parts: Sequence[tuple["TransformersSession", Sequence[int]]]) -> "TransformersSession":
        """The rows of several sessions of this source in one new session: each row's keys and values are
        copied once into the new cache, right-aligned (left padding: zeros under a 0 mask, so every row still
        attends to exactly its own tokens at its own positions). `fork(rows)` and `join` are gathers too."""
        sessions = [session for session, _ in parts]
        if any(s.source is not self.source or s.mask is None for s, _ in parts):
            raise ValueError("gather takes prefilled sessions of this session's source")
        width = max(s.mask.shape[1] for s in sessions)
        total = sum(len(rows) for _, rows in parts)
        twin = TransformersSession(self.source, [s.prompts[r] for s, rows in parts for r in rows])
        for depth, mine in enumerate(self.cache.layers):
            layers = [s.cache.layers[depth] for s in sessions]
            odd = next((type(lay).__name__ for lay in layers if type(lay) is not DynamicLayer), None)
            if odd is not None:
                raise ValueError(f"cannot copy rows of {odd} caches (sliding or static layers)")
            gathered = DynamicLayer()
            gathered.lazy_initialization(mine.keys, mine.values)
            gathered.keys = _gather(parts, [lay.keys for lay in layers], total, width)
            gathered.values = _gather(parts, [lay.values for lay in layers], total, width)
            twin.cache.layers.append(gathered)
        twin.mask = _gather(parts, [s.mask for s in sessions], total, width, dim=-1)
        twin._drop_leading_padding()
        return twin

    def _drop_leading_padding(self) -> None:
        # Columns no row attends to (left by rows that left or by a long row that joined) only cost
        # compute; positions come from the mask, so cutting them changes nothing.
        if self.mask is None or self.mask.shape[0] == 0:
            return
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        layers = self.cache.layers
        if start == 0 or not all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers):
            return
        for layer in layers:
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
        self.mask = self.mask[:, start:]


def _gather(parts, tensors: list[torch.Tensor], total: int, width: int, dim: int = -2) -> torch.Tensor:
    """Rows of each part's tensor (rows first, sequence along `dim`, counted from the end) stacked, right-aligned in `width`
    positions; only the padding is zeroed. A part as wide as the result is copied by one index_select."""
    ref = tensors[0]
    shape = list(ref.shape)
    shape[0], shape[dim] = total, width
    out = ref.new_empty(shape)
    at = 0
    for (_, rows), tensor in zip(parts, tensors):
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long, device=tensor.device)
        target = out.narrow(0, at, len(rows))  # rows first: a contiguous block of `out`
        missing = width - tensor.shape[dim]
        if missing == 0:
            torch.index_select(tensor, 0, index, out=target)
        else:  # row by row into the right-aligned place: an index_select would copy them twice
            target.narrow(dim, 0, missing).zero_()
            for j, row in enumerate(rows):
                target[j].narrow(dim, missing, tensor.shape[dim]).copy_(tensor[row])
        at += len(rows)
    return out
