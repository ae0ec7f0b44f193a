"""Logit sources wrapped to test what the engine does with what a source declares or how it fails."""
from __future__ import annotations

from proxytune.backends.protocol import Capabilities
from proxytune.errors import SourceFailure


class Solo:
    """A third-party source whose sessions declare nothing beyond plain stepping (no rollback, no join)."""

    max_length = None

    def __init__(self, inner, name: str = "solo"):
        self.inner, self.name, self.vocab_size = inner, name, inner.vocab_size

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
