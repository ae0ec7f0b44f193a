"""Logit sources wrapped to test what the engine does with what a source declares or how it fails."""
from __future__ import annotations

from proxytune.backends.protocol import Capabilities
from proxytune.errors import RowFailure, SourceFailure


class Solo:
    """A third-party source whose sessions declare nothing beyond plain stepping (no rollback, no join)."""

    max_length = None

    def __init__(self, inner, name: str = "solo"):
        self.inner, self.name, self.vocab_size = inner, name, inner.vocab_size
        self.eos_token_ids, self.distribution = inner.eos_token_ids, inner.distribution
        self.server_calls = inner.server_calls

    def open(self, prompts):
        session = self.inner.open(prompts)

        class Plain:
            capabilities = Capabilities()
            prefill, advance, rewind, select = session.prefill, session.advance, session.rewind, session.select
        return Plain()

    def sequence_logits(self, sequences):
        return self.inner.sequence_logits(sequences)


class Flaky:
    """A source that fails (SourceFailure) on its `fail_at`-th advance call, then works again."""

    max_length = None

    def __init__(self, inner, fail_at: int = 4, name: str = "flaky"):
        self.inner, self.name, self.vocab_size = inner, name, inner.vocab_size
        self.eos_token_ids, self.distribution = inner.eos_token_ids, inner.distribution
        self.server_calls = inner.server_calls
        self.fail_at, self.calls = fail_at, 0

    def open(self, prompts):
        session, source = self.inner.open(prompts), self

        class Session:
            capabilities = Capabilities(rollback=True, join=True, fork=False)
            inner = session
            prefill, rewind, select = session.prefill, session.rewind, session.select

            def join(self, other):
                session.join(other.inner)

            def advance(self, tokens, extend=False):
                source.calls += 1
                if source.calls == source.fail_at:
                    raise SourceFailure("the base server went away")
                return session.advance(tokens, extend=extend)
        return Session()

    def sequence_logits(self, sequences):
        return self.inner.sequence_logits(sequences)


class Poisoned:
    """A source whose rows with `poison` among their prompt tokens go wrong, the others staying exact:

    how="nan"     their logits are NaN (from the `after`-th call on: prefill is call 0)
    how="refuse"  the session refuses them (RowFailure naming them, its state untouched), from call `after`
    how="raise"   a prefill holding one of them raises RuntimeError (the batch cannot say which row)
    """

    max_length = None

    def __init__(self, inner, poison: int, how: str = "nan", after: int = 0, name: str = "poisoned"):
        self.inner, self.name, self.vocab_size = inner, name, inner.vocab_size
        self.eos_token_ids, self.distribution = inner.eos_token_ids, inner.distribution
        self.server_calls = inner.server_calls
        self.poison, self.how, self.after = poison, how, after

    def open(self, prompts):
        session, source = self.inner.open(prompts), self

        class Session:
            capabilities = Capabilities(rollback=True, join=True, fork=False)

            def __init__(self):
                self.inner, self.flags, self.calls = session, [source.poison in p for p in prompts], 0

            def _apply(self, call, *args, **kwargs):
                bad = [row for row, flag in enumerate(self.flags) if flag]
                if bad and source.how == "raise" and call == self.inner.prefill:
                    raise RuntimeError("this prompt breaks the model")
                if bad and source.how == "refuse" and self.calls >= source.after:
                    raise RowFailure("the server refused this row: prompt too long", bad)
                out = call(*args, **kwargs)
                if bad and source.how == "nan" and self.calls >= source.after:
                    out = out.clone()
                    out[bad] = float("nan")
                self.calls += 1
                return out

            def prefill(self):
                return self._apply(self.inner.prefill)

            def advance(self, tokens, extend=False):
                return self._apply(self.inner.advance, tokens, extend=extend)

            def rewind(self, keep):
                self.inner.rewind(keep)

            def select(self, rows):
                self.inner.select(rows)
                self.flags = [self.flags[r] for r in rows]

            def join(self, other):
                self.inner.join(other.inner)
                self.flags += other.flags
        return Session()

    def sequence_logits(self, sequences):
        return self.inner.sequence_logits(sequences)


class Scripted:
    """A source that wants a script: its logits are the inner model's plus `push` on script[i] when it
    predicts generated token i (past the script, the inner model's own). Rolls back like the inner one."""

    max_length = None

    def __init__(self, inner, script: list[int], push: float = 40.0, name: str = "scripted"):
        self.inner, self.name, self.vocab_size = inner, name, inner.vocab_size
        self.eos_token_ids, self.distribution = inner.eos_token_ids, inner.distribution
        self.server_calls = inner.server_calls
        self.script, self.push = script, push

    def open(self, prompts):
        session, source = self.inner.open(prompts), self

        class Session:
            capabilities = Capabilities(rollback=True, join=False, fork=False)

            def __init__(self):
                self.counts, self.span = [0] * len(prompts), 0  # tokens appended per row; the open span's width

            def _pushed(self, out, first):
                out = out.clone()
                for row, count in enumerate(self.counts):
                    for j in range(out.shape[1]):
                        if first + count + j < len(source.script):
                            out[row, j, source.script[first + count + j]] += source.push
                return out

            def prefill(self):
                return self._pushed(session.prefill()[:, None], 0)[:, 0]

            def advance(self, tokens, extend=False):
                out = self._pushed(session.advance(tokens, extend=extend), 1)
                self.counts = [c + tokens.shape[1] for c in self.counts]
                self.span = tokens.shape[1] + (self.span if extend else 0)
                return out

            def rewind(self, keep):
                session.rewind(keep)
                self.counts = [c - self.span + k for c, k in zip(self.counts, keep)]
                self.span = 0

            def select(self, rows):
                session.select(rows)
                self.counts = [self.counts[r] for r in rows]
        return Session()

    def sequence_logits(self, sequences):
        return self.inner.sequence_logits(sequences)
