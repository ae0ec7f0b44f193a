"""Any token-level logit source seen one byte at a time: its exact next-byte distribution.

A model over tokens gives every text x a probability as a prefix of what it writes: the sum, over every
token sequence that *covers* x (its bytes begin with x and all but its last token lie inside x), of the
sequence's probability (Phan et al. 2024; Hayase et al. 2025). The next-byte distribution is then
p(b | x) = P(x b) / P(x), and p(end of text | x) comes from the covers that end exactly at x.

We keep those covers as *hypotheses*: a token path that ends inside x at byte `start`, its weight p(path)
and its next-token distribution (one forward, computed once when the path is made). The tokens that can
follow a hypothesis begin with the remainder x[start:]; `ByteVocab` sums their probabilities per next
byte. When byte b is appended, a hypothesis whose remainder + b is itself a token t makes a child
path + t (aligned at the new end, needing one forward), and it stays pending while longer tokens still
begin with remainder + b. Children of every row are run in one batched forward, each in a copy of its
parent's rows (`copy_rows`: one copy per row in transformers, shared cells in llama.cpp), so shared prefixes
are never recomputed.

Pruning is explicit: a hypothesis whose share of P(x) falls below `prune` (default 1e-5) is dropped and the
rest renormalised; the dropped mass is added up per row (`ByteStats.pruned`), so its error is visible.
Prompts stay token ids in each model's own tokenization (chat templates, special tokens); the byte
level starts where the prompt ends, exactly as token-level decoding conditions on the prompt's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ...backends.protocol import Capabilities, LogitSource, Session, copy_rows
from ...errors import ProxyTuneError
from .vocab import ByteVocab

END_OF_TEXT = 256  # the byte alphabet: 0..255, then the end of text
BYTE_VOCAB = 257


@dataclass
class ByteStats:
    """What the byte view cost: forwards (children run), hypotheses seen per step, mass pruned."""
    bytes: int = 0  # bytes appended, over all rows
    forwards: int = 0  # batched forwards of the underlying model
    paths: int = 0  # token paths run (children), over all rows
    hypotheses: int = 0  # live hypotheses summed over rows and bytes (mean = hypotheses / bytes)
    most_hypotheses: int = 0
    pruned: float = 0.0  # the largest share of P(text) one row lost to pruning so far

    def as_dict(self) -> dict:
        per_byte = (lambda n: round(n / self.bytes, 3) if self.bytes else 0.0)  # noqa: E731
        return {"bytes": self.bytes, "forwards": self.forwards, "paths": self.paths,
                "paths_per_byte": per_byte(self.paths), "mean_hypotheses": per_byte(self.hypotheses),
                "most_hypotheses": self.most_hypotheses, "pruned_mass": self.pruned}


class Generation:
    """One underlying session whose rows are token paths made at the same byte (or the prompts)."""

    def __init__(self, session: Session, rows: int):
        self.session, self.rows = session, rows


@dataclass
class Hypothesis:
    start: int  # where its token path ends, in bytes of the row's text
    weight: float  # p(path), relative: the row's hypotheses sum to 1 over the text so far
    probs: torch.Tensor  # next-token distribution in the vocabulary's sorted places (float64)
    eos: float  # p(end of text) right after the path
    span: tuple[int, int, int]  # ByteVocab.lookup of the remainder text[start:]
    generation: Generation  # where the path's KV state is
    row: int  # its row in generation.session


@dataclass
class RowBytes:
    text: bytearray = field(default_factory=bytearray)
    hypotheses: list[Hypothesis] = field(default_factory=list)
    pruned: float = 0.0  # share of P(text) dropped by pruning, accumulated


class ByteSource:
    """The byte-level view of `inner` (any LogitSource whose sessions fork rows and join): vocabulary of
    257 (bytes, then end of text). Prompts are still the inner model's token ids."""

    vocab_size = BYTE_VOCAB
    eos_token_ids = frozenset({END_OF_TEXT})
    distribution = "full"  # every byte's probability, exactly (the inner model's distribution must be full too)

    def __init__(self, inner: LogitSource, vocab: ByteVocab, name: str | None = None, prune: float = 1e-5,
                 max_hypotheses: int = 64):
        if not (isinstance(prune, (int, float)) and 0 <= prune < 1):
            raise ProxyTuneError(f"prune must be in [0, 1) (a share of the text's probability), got {prune!r}")
        self.inner, self.vocab = inner, vocab
        self.name = name or inner.name
        if inner.distribution != "full":  # a byte's probability sums over every token that begins with it
            raise ProxyTuneError(f"byte-level proxy-tuning needs every role's whole next-token distribution, and the "
                                 f"{self.name} model ({inner.name}) returns only its top-k logprobs: run that role "
                                 f"locally (a transformers model or a GGUF file), or use models that share one "
                                 f"vocabulary")
        self.prune, self.max_hypotheses = float(prune), max_hypotheses
        self.stats = ByteStats()

    @property
    def server_calls(self):
        """The inner model's: reading bytes makes no calls of its own."""
        return self.inner.server_calls

    @property
    def max_length(self) -> int | None:
        # A path holds at most one token per byte after the prompt, so a budget of (context - prompt)
        # bytes can never overflow the inner model's context.
        return self.inner.max_length

    def open(self, prompts: Sequence[Sequence[int]]) -> "ByteSession":
        return ByteSession(self, prompts)

    def sequence_logits(self, sequences):
        raise ProxyTuneError("a byte-level source scores through its sessions (its context is tokens, what it "
                             "scores is bytes): use ProxyTuner.score")


class ByteSession:
    capabilities = Capabilities(join=True, fork=True, must_write=True)

    def __init__(self, source: ByteSource, prompts: Sequence[Sequence[int]]):
        self.source = source
        self.prompts = [list(p) for p in prompts]
        self.rows: list[RowBytes] = []

    # --- the protocol ------------------------------------------------------------------------------

    def prefill(self) -> torch.Tensor:
        # opened here, not before: a LoRA pair's halves opened together would pair up, and a half of a joint
        # session cannot be copied for the byte view's branches
        session = self.source.inner.open(self.prompts)
        self.capabilities = replace(ByteSession.capabilities, place=session.capabilities.place)  # known from now on
        if not (session.capabilities.fork and session.capabilities.join):
            raise ProxyTuneError(f"the {self.source.name} model ({type(session).__name__}) cannot be read byte by byte: "
                                 f"its sessions must copy rows (fork) and join them")
        logits = session.prefill()
        generation = Generation(session, len(self.prompts))
        vocab = self.source.vocab
        self.rows = []
        for row, (probs, eos) in enumerate(vocab.distributions(logits)):
            root = Hypothesis(0, 1.0, probs, eos, vocab.everything, generation, row)
            self.rows.append(RowBytes(hypotheses=[root]))
        return self._byte_logits()

    def advance(self, tokens: torch.Tensor, extend: bool = False) -> torch.Tensor:
        tokens = tokens.reshape(tokens.shape[0], -1).long().cpu()
        if tokens.shape[0] != len(self.rows):
            raise ValueError(f"advance got {tokens.shape[0]} rows for a session of {len(self.rows)}")
        out = [torch.zeros(len(self.rows), 0, BYTE_VOCAB)]
        for column in tokens.T.tolist():
            self._append(column)
            out.append(self._byte_logits()[:, None])
        return torch.cat(out, dim=1)

    def rewind(self, keep: Sequence[int]) -> None:
        raise ProxyTuneError("a byte-level session cannot roll back")

    def select(self, rows: Sequence[int]) -> None:
        self.rows = [self.rows[r] for r in rows]
        self.prompts = [self.prompts[r] for r in rows]
        self._compact()

    def _compact(self) -> None:
        """Drop the rows of each underlying session that no hypothesis needs any more, once they are half of
        it (their KV memory, and llama.cpp's sequences, are then given back)."""
        needed: dict[int, tuple[Generation, list[Hypothesis]]] = {}
        for row in self.rows:
            for h in row.hypotheses:
                needed.setdefault(id(h.generation), (h.generation, []))[1].append(h)
        for generation, hypotheses in needed.values():
            used = sorted({h.row for h in hypotheses})
            if 2 * len(used) > generation.rows:
                continue
            generation.session.select(used)
            generation.rows = len(used)
            place = {old: new for new, old in enumerate(used)}
            for h in hypotheses:
                h.row = place[h.row]

    def join(self, other: "ByteSession") -> None:
        if other.source is not self.source:
            raise ValueError("only sessions of the same source can be joined")
        self.rows += other.rows
        self.prompts += other.prompts

    def fork(self) -> "ByteSession":
        twin = ByteSession(self.source, self.prompts)
        twin.capabilities = self.capabilities
        copies: dict[int, Generation] = {}
        for row in self.rows:
            hypotheses = []
            for h in row.hypotheses:
                if id(h.generation) not in copies:
                    copies[id(h.generation)] = Generation(h.generation.session.fork(), h.generation.rows)
                hypotheses.append(Hypothesis(h.start, h.weight, h.probs, h.eos, h.span, copies[id(h.generation)],
                                             h.row))
            twin.rows.append(RowBytes(bytearray(row.text), hypotheses, row.pruned))
        return twin

    # --- bytes -------------------------------------------------------------------------------------

    def _byte_logits(self) -> torch.Tensor:
        """[B, 257]: log p(b | text) of every row (−inf for what no cover allows)."""
        vocab = self.source.vocab
        out = torch.zeros(len(self.rows), BYTE_VOCAB, dtype=torch.float64)
        for i, row in enumerate(self.rows):
            for h in row.hypotheses:
                depth = len(row.text) - h.start
                out[i, :256] += h.weight * vocab.next_byte_masses(h.probs, depth, h.span)
                if depth == 0:
                    out[i, END_OF_TEXT] += h.weight * h.eos
        total = out.sum(-1, keepdim=True)
        return torch.log(out / total.clamp_min(1e-300)).float()

    def _append(self, column: Sequence[int]) -> None:
        """Append one byte to every row: children for the tokens that now end, pending hypotheses narrowed."""
        vocab, stats = self.source.vocab, self.source.stats
        children: list[tuple[int, Hypothesis, int, float]] = []  # (row, parent, token id, weight)
        for i, (row, byte) in enumerate(zip(self.rows, column)):
            if not 0 <= byte < 256:
                raise ProxyTuneError(f"a byte-level session takes bytes 0..255, got {byte}")
            pending, made = [], []
            for h in row.hypotheses:
                remainder = bytes(row.text[h.start:]) + bytes([byte])
                lo, exact_end, hi = vocab.lookup(remainder, (h.span[0], h.span[2]))
                for place in range(lo, exact_end):
                    made.append((h, int(vocab.order[place]), h.weight * float(h.probs[place])))
                if hi > exact_end:
                    h.span = (lo, exact_end, hi)
                    pending.append((h, h.weight * float(h.probs[exact_end:hi].sum())))
            row.text.append(byte)
            pending, made = self._prune(row, pending, made)
            row.hypotheses = [h for h, _ in pending]
            children += [(i, parent, token, weight) for parent, token, weight in made]
            stats.hypotheses += len(pending) + len(made)
            stats.most_hypotheses = max(stats.most_hypotheses, len(pending) + len(made))
        stats.bytes += len(self.rows)
        if children:
            self._run(children)
        self._compact()

    def _prune(self, row: RowBytes, pending: list, made: list) -> tuple[list, list]:
        """Renormalise the row's hypotheses over the new text; drop those below the pruning share (and
        beyond `max_hypotheses`), adding their share to the row's pruned mass."""
        total = sum(w for _, w in pending) + sum(w for *_, w in made)
        if total <= 0:
            text = bytes(row.text).decode("utf-8", errors="backslashreplace")
            raise ProxyTuneError(f"the {self.source.name} model's vocabulary cannot write {text[-40:]!r} (no token "
                                 f"covers its last byte 0x{row.text[-1]:02x} there, and it has no byte fallback)")
        shares = sorted([w for _, w in pending] + [w for *_, w in made], reverse=True)
        cap = shares[self.source.max_hypotheses] if len(shares) > self.source.max_hypotheses else 0.0
        keeps = lambda w: w > cap and w >= self.source.prune * total  # noqa: E731
        kept_pending = [(h, w) for h, w in pending if keeps(w)]
        kept_made = [(h, t, w) for h, t, w in made if keeps(w)]
        kept = sum(w for _, w in kept_pending) + sum(w for *_, w in kept_made)
        row.pruned += (total - kept) / total
        self.source.stats.pruned = max(self.source.stats.pruned, row.pruned)
        for h, _ in kept_pending:
            h.weight /= kept
        return kept_pending, [(h, t, w / kept) for h, t, w in kept_made]

    def _run(self, children: list[tuple[int, Hypothesis, int, float]]) -> None:
        """One forward for every new token path: each in a copy of its parent's rows, all joined."""
        by_generation: dict[int, list[int]] = {}
        for n, (_, parent, _, _) in enumerate(children):
            by_generation.setdefault(id(parent.generation), []).append(n)
        order = [n for group in by_generation.values() for n in group]
        session = copy_rows([(children[group[0]][1].generation.session, [children[n][1].row for n in group])
                             for group in by_generation.values()])
        tokens = torch.tensor([[children[n][2]] for n in order], dtype=torch.long)
        logits = session.advance(tokens)[:, -1]
        generation = Generation(session, len(order))
        vocab = self.source.vocab
        self.source.stats.forwards += 1
        self.source.stats.paths += len(order)
        for place, (n, (probs, eos)) in enumerate(zip(order, vocab.distributions(logits))):
            i, _, _, weight = children[n]
            row = self.rows[i]
            row.hypotheses.append(Hypothesis(len(row.text), weight, probs, eos, vocab.everything, generation, place))

