"""What a remote source's calls cost: HTTP requests, tokens per call, bytes, wall time, what was dropped.

Counted from the threads of a source's pool (one per row in flight), so every addition holds one lock.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

COUNTING = threading.Lock()  # additions are a few integer updates: one lock for every source is enough


@dataclass
class RemoteStats:
    calls: int = 0  # HTTP requests answered (retries included)
    retries: int = 0
    distributions: int = 0  # next-token distributions delivered to the decoder
    tokens: int = 0  # tokens generated from them: each decided position counts once (drafts not kept do not)
    drafted: int = 0  # tokens the server drafted in chunks (kept or not)
    candidates: int = 0
    dropped: int = 0
    empty_as_eos: int = 0
    drift: int = 0  # calls whose text would re-tokenise differently
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0  # wall time from the start of the first decoding call to the end of the last

    def add(self, distributions: int = 0, tokens: int = 0, drafted: int = 0, candidates: int = 0,
            dropped: int = 0, empty_as_eos: int = 0, drift: int = 0) -> None:
        """Add what one call (or one session step) counted; the calls, bytes and time come from the client."""
        with COUNTING:
            self.distributions += distributions
            self.tokens += tokens
            self.drafted += drafted
            self.candidates += candidates
            self.dropped += dropped
            self.empty_as_eos += empty_as_eos
            self.drift += drift

    @property
    def calls_per_token(self) -> float:
        """HTTP calls per generated token (0 when nothing was generated, e.g. scoring only)."""
        return self.calls / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_call(self) -> float:
        return self.tokens / self.calls if self.calls else 0.0

    def summary(self, role: str) -> str:
        per = max(1, self.tokens or self.distributions)
        unit = "generated token" if self.tokens else "distribution"
        return (f"{role}: {self.calls} calls for {self.tokens} generated tokens ({self.calls_per_token:.2f} calls "
                f"and {1000 * self.seconds / per:.0f} ms wall per token, {self.tokens_per_call:.1f} tokens per call, "
                f"{self.drafted} drafted), {self.bytes_sent / per:.0f} B sent and {self.bytes_received / per:.0f} B "
                f"received per {unit}, {self.retries} retries, {self.candidates / max(1, self.distributions):.1f} "
                f"candidates per distribution, {self.dropped} top-k entries dropped, {self.drift} re-tokenisation drifts")
