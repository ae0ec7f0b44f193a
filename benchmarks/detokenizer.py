"""The engine's own time per token on a 2,000-token generation: incremental text vs decoding everything each token.

A scripted logit source costs nothing (each step's logits point at the next token of a fixed text), so the
time measured is the engine's: choosing, bookkeeping, stop-string search and text. The baseline tracker
re-decodes the whole output at every token, as proxytune did before engine/text.py; the two run in
alternating rounds and the ratio is taken within each round.

    python benchmarks/detokenizer.py                # SmolLM2's tokenizer (49,152 tokens) if installed, else tiny
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from proxytune import ProxyTuner  # noqa: E402
from proxytune.backends.protocol import Capabilities  # noqa: E402
from proxytune.engine import decoding as decoding_module  # noqa: E402
from proxytune.engine.text import TextTracker  # noqa: E402

TEXT = ("Isabella spent 25 x 5 = 125 minutes solving the jigsaw puzzles. She spent 15 x 11 = 165 minutes on the "
        "brain teasers — naïve café, Zürich, 東京 🙂. In total she spent 125 + 165 = 290 minutes playing. ")


class WholeDecodeTracker(TextTracker):
    """The baseline: the whole output decoded again at every token, stop strings searched near the end."""

    def add(self, token_id: int) -> None:
        self.detokenizer.token_ids.append(token_id)
        text = self.detokenizer.tokenizer.decode(self.detokenizer.token_ids, skip_special_tokens=True)
        if self.stopped:
            return
        while text.endswith("\ufffd"):
            text = text[:-1]
        start = max(0, len(self.text) - self.longest_stop + 1)
        self.text = text
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def delta(self, final: bool = False) -> str:
        if final:
            self.text = self.detokenizer.tokenizer.decode(self.detokenizer.token_ids, skip_special_tokens=True)
        end = len(self.text) if final else self._safe_end()
        piece = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


class Scripted:
    """A logit source that always predicts the next token of `script` (free: the engine's cost alone)."""

    def __init__(self, script: list[int], vocab_size: int):
        self.script, self.vocab_size, self.name, self.max_length = script, vocab_size, "scripted", None
        self.eos_token_ids, self.distribution, self.server_calls = frozenset(), "full", None

    def open(self, prompts):
        source = self

        class Session:
            capabilities = Capabilities(rollback=True, join=True, fork=True)

            def __init__(self):
                self.position = 0

            def logits(self, width):
                rows = torch.full((1, width, source.vocab_size), -10.0)
                for j in range(width):
                    rows[0, j, source.script[(self.position + j) % len(source.script)]] = 10.0
                self.position += width
                return rows

            def prefill(self):
                return self.logits(1)[:, 0]

            def advance(self, tokens, extend=False):
                return self.logits(tokens.shape[1])

            def rewind(self, keep):
                pass

            def select(self, rows):
                pass
        return Session()

    def sequence_logits(self, sequences):
        raise NotImplementedError


def tokenizer():
    try:
        from proxytune.models.tokenizers import load_tokenizer
        return load_tokenizer("smollm2-135m-instruct"), "SmolLM2 (49,152 tokens)"
    except Exception:
        from tiny import tiny_tokenizer
        return tiny_tokenizer(), "tiny (320 tokens)"


def per_token(tuner, tracker, tokens: int, stop: list[str]) -> float:
    decoding_module.TextTracker = tracker
    try:
        start = time.perf_counter()
        out = tuner.generate("Question:", max_new_tokens=tokens, stop=stop)[0]
        seconds = time.perf_counter() - start
    finally:
        decoding_module.TextTracker = TextTracker
    assert len(out.token_ids) == tokens, len(out.token_ids)
    return seconds / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok, label = tokenizer()
    script = [t for t in tok(TEXT, add_special_tokens=False)["input_ids"] if t not in tok.all_special_ids]
    source = Scripted(script, len(tok))
    tuner = ProxyTuner(source, source, source, tokenizer=tok)
    stop = ["\n\nQuestion:", "####"]
    print(f"tokenizer: {label}; {args.tokens} tokens per generation, stop strings {stop}")
    ratios = []
    for round_ in range(args.rounds):
        order = [("incremental", TextTracker), ("whole decode", WholeDecodeTracker)][:: 1 if round_ % 2 else -1]
        times = {name: per_token(tuner, tracker, args.tokens, stop) for name, tracker in order}
        ratios.append(times["whole decode"] / times["incremental"])
        print(f"round {round_ + 1}: engine time per token: incremental {1e3 * times['incremental']:.3f} ms, "
              f"whole decode {1e3 * times['whole decode']:.3f} ms ({ratios[-1]:.2f}x)")
    print(f"RESULT whole_decode_over_incremental={statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
