"""A GGUF model run in-process by llama.cpp as a logit source: the CPU fast path.

Same protocol as the transformers source (prefill, advance k tokens, exact rewind, select, join,
fork, sequence_logits), so sampling, stopping, streaming, scoring and speculative decoding run on it
unchanged. Each row of a session is one llama.cpp sequence in the source's context; all sessions of
a source share that context's KV pool (`n_ctx` cells), and a session gives its sequences back when
it is dropped.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Sequence

import torch

from ...errors import ProxyTuneError
from ..protocol import Capabilities
from .model import Context, GGUFModel, available_cores

DEFAULT_CTX = 8192  # KV cells shared by all rows of all sessions of one source


class LlamaCppSource:
    """One role on llama.cpp: a GGUFModel, optionally with a LoRA adapter GGUF switched on.

    `threads` defaults to every core this process may use: the roles run one after another, each
    with all of them (see llama_cpp_model). `n_ctx` is the KV pool of all rows together and also the
    longest one row can grow; `max_rows` is how many rows (sequences) the context can hold at once.

    By default one-token steps use llama.cpp's one-token kernels, exactly as llama.cpp decodes on its
    own (α = 0 reproduces its greedy output). `uniform_batches=True` makes logits independent of how
    tokens are grouped (batched == alone, speculative == plain, score == generate, bit for bit).
    """

    distribution = "full"
    server_calls = None

    def __init__(self, model: GGUFModel | str | Path, name: str = "model", adapter: str | Path | None = None,
                 adapter_scale: float = 1.0, threads: int | None = None, n_ctx: int | None = None,
                 max_rows: int = 64, n_batch: int = 512, uniform_batches: bool = False):
        self.gguf = model if isinstance(model, GGUFModel) else GGUFModel(model)
        self.name = name
        self.adapter = None if adapter is None else Path(adapter)
        if self.adapter is not None:
            self.gguf.adapter(self.adapter)  # fail now, not at the first prompt
        self.adapter_scale = adapter_scale
        self.vocab_size = self.gguf.n_vocab
        self.n_ctx = min(n_ctx or DEFAULT_CTX, self.gguf.n_ctx_train or DEFAULT_CTX)
        self.max_length = self.n_ctx
        self.max_rows, self.n_batch = max_rows, n_batch
        self.uniform_batches = uniform_batches  # see Context: exact batching, at a small cost per step
        self.eos_token_ids = self.gguf.eos_token_ids
        self._threads = threads or available_cores()
        self._context: Context | None = None
        self._free_seqs = list(range(max_rows))

    def __repr__(self) -> str:
        adapter = f" + {self.adapter.name}" if self.adapter else ""
        return f"LlamaCppSource({self.name}: {self.gguf.path.name}{adapter}, {self._threads} threads)"

    @property
    def threads(self) -> int:
        return self._threads

    @threads.setter
    def threads(self, value: int) -> None:
        if value < 1:
            raise ProxyTuneError(f"threads must be >= 1, got {value}")
        self._threads = value
        if self._context is not None:
            self._context.set_threads(value)

    @property
    def context(self) -> Context:
        if self._context is None:  # created on first use: its KV pool is the bulk of the memory
            self._context = Context(self.gguf, self.n_ctx, self.max_rows, self._threads, self.n_batch,
                                    self.adapter, self.adapter_scale, uniform_batches=self.uniform_batches)
        return self._context

    def acquire(self, count: int) -> list[int]:
        if count > len(self._free_seqs):
            raise ProxyTuneError(f"the llama.cpp source {self.name} holds at most {self.max_rows} rows at once "
                                 f"({self.max_rows - len(self._free_seqs)} in use, {count} more asked): "
                                 f"decode fewer rows at once or raise max_rows")
        seqs, self._free_seqs = self._free_seqs[:count], self._free_seqs[count:]
        return seqs

    def release(self, seqs: Sequence[int]) -> None:
        if self._context is not None:
            for seq in seqs:
                self._context.remove(seq)
        self._free_seqs += list(seqs)

    def open(self, prompts: Sequence[Sequence[int]]) -> "LlamaCppSession":
        return LlamaCppSession(self, prompts)

    def sequence_logits(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        for seq in sequences:
            self._check_tokens(seq)
        (scratch,) = self.acquire(1)
        try:
            results = []
            for sequence in sequences:
                results.append(self.context.run([(scratch, 0, list(sequence), True)], self.vocab_size))
                self.context.remove(scratch)
            return results
        finally:
            self.release([scratch])

    def _check_tokens(self, tokens: Sequence[int]) -> None:
        if len(tokens) == 0:
            raise ProxyTuneError("cannot run an empty token sequence: every prompt needs at least one token")
        bad = [t for t in tokens if not 0 <= int(t) < self.gguf.n_vocab]
        if bad:
            raise ProxyTuneError(f"token id {int(bad[0])} is outside the vocabulary of {self.gguf.path.name} "
                                 f"({self.gguf.n_vocab} ids)")
        if len(tokens) > self.n_ctx:
            raise ProxyTuneError(f"a sequence of {len(tokens)} tokens does not fit the llama.cpp context of "
                                 f"{self.n_ctx} tokens of {self.gguf.path.name}")


class LlamaCppSession:
    """Rows as llama.cpp sequences. `lengths[i]` counts the tokens row i holds in the KV pool."""

    capabilities = Capabilities(rollback=True, join=True, fork=True, place=frozenset({"cpu"}))  # no GPU layers

    def __init__(self, source: LlamaCppSource, prompts: Sequence[Sequence[int]]):
        for prompt in prompts:
            source._check_tokens(prompt)
        self.source = source
        self.prompts = [list(p) for p in prompts]
        self.seqs: list[int] = []  # mutated in place: the finalizer gives back whatever it holds then
        self.lengths: list[int] = []
        self._last_width = 0
        self._finalizer = weakref.finalize(self, source.release, self.seqs)
        self._finalizer.atexit = False  # at exit the context may already be gone

    def _take(self, count: int) -> list[int]:
        seqs = self.source.acquire(count)
        self.seqs += seqs
        return seqs

    def prefill(self) -> torch.Tensor:
        if self.seqs:
            raise ValueError("this session is already prefilled")
        self._take(len(self.prompts))
        self.lengths = [len(p) for p in self.prompts]
        rows = [(seq, 0, prompt, False) for seq, prompt in zip(self.seqs, self.prompts)]
        return self.source.context.run(rows, self.source.vocab_size)

    def advance(self, tokens: torch.Tensor, extend: bool = False) -> torch.Tensor:
        tokens = tokens.reshape(tokens.shape[0], -1).long().cpu()
        batch, width = tokens.shape
        if batch != len(self.seqs):
            raise ValueError(f"advance got {batch} rows for a session of {len(self.seqs)}")
        longest = max(self.lengths, default=0) + width
        if longest > self.source.n_ctx:
            raise ProxyTuneError(f"a row would grow to {longest} tokens, beyond the llama.cpp context of "
                                 f"{self.source.n_ctx} tokens of {self.source.gguf.path.name}")
        rows = [(seq, length, row.tolist(), True) for seq, length, row in zip(self.seqs, self.lengths, tokens)]
        logits = self.source.context.run(rows, self.source.vocab_size)
        self.lengths = [length + width for length in self.lengths]
        # extend: a speculative draft grows one token at a time, and rewind must reach back over all of it.
        self._last_width = width + (self._last_width if extend else 0)
        return logits.reshape(batch, width, -1)

    def rewind(self, keep: Sequence[int]) -> None:
        width = self._last_width
        if len(keep) != len(self.seqs) or any(k < 0 or k > width for k in keep):
            raise ValueError(f"rewind keeps 0..{width} of the last tokens per row, got {list(keep)}")
        for row, kept in enumerate(keep):
            if kept < width:
                self.lengths[row] -= width - kept
                self.source.context.remove(self.seqs[row], self.lengths[row])
        self._last_width = 0

    def select(self, rows: Sequence[int]) -> None:
        rows = list(rows)
        kept_rows = set(rows)
        dropped = [seq for i, seq in enumerate(self.seqs) if i not in kept_rows]
        kept = [self.seqs[r] for r in rows]
        self.seqs[:] = kept
        self.source.release(dropped)
        self.lengths = [self.lengths[r] for r in rows]
        self.prompts = [self.prompts[r] for r in rows]

    def join(self, other: "LlamaCppSession") -> None:
        """Take over the rows of `other` (prefilled, same source): their sequences move, nothing is copied."""
        if other.source is not self.source:
            raise ValueError("only sessions of the same source can be joined")
        if not self.seqs and self.prompts or not other.seqs and other.prompts:
            raise ValueError("prefill both sessions before joining them")
        self.seqs += other.seqs
        other.seqs.clear()
        self.lengths += other.lengths
        self.prompts += other.prompts
        self._last_width = 0  # a rewind cannot reach back across a join

    def fork(self, rows: Sequence[int] | None = None) -> "LlamaCppSession":
        """An independent copy that can advance on its own (llama.cpp shares the cells until they differ);
        `rows`: of these rows only, in this order (a row may repeat)."""
        rows = list(range(len(self.seqs))) if rows is None else list(rows)
        twin = LlamaCppSession(self.source, [self.prompts[r] for r in rows])
        for row, copy in zip(rows, twin._take(len(rows))):
            self.source.context.copy(self.seqs[row], copy)
        twin.lengths = [self.lengths[r] for r in rows]
        twin._last_width = self._last_width
        return twin
