"""RowStopper decodes a tail window, yet ends rows exactly where decoding the whole output would."""

from __future__ import annotations

import random

import pytest

from decodetune.decoding.stopping import RowStopper, StopStrings


def reference(stops: StopStrings, decode, tokens: list[int], min_new: int) -> tuple[int, int] | None:
    """The rule spelt out: decode everything at every step; (tokens at the end, cut) of the first hit."""
    boundary = 0
    for n in range(1, len(tokens) + 1):
        if n < min_new:
            continue
        text = decode(tokens[:n])
        if n == min_new and min_new > 0:
            boundary = len(text)
            continue
        cut = stops.find(text, boundary)
        if cut is not None:
            return n, cut
    return None


def incremental(stops: StopStrings, decode, tokens: list[int], min_new: int) -> tuple[int, int] | None:
    stopper = RowStopper(stops, decode, min_new)
    for n in range(1, len(tokens) + 1):
        cut = stopper.check(tokens[:n])
        if cut is not None:
            return n, cut
    return None


@pytest.fixture(scope="module")
def decode(tiny_tokenizer):
    return lambda ids: tiny_tokenizer.decode(ids, skip_special_tokens=True)


def test_same_stop_as_full_decoding_on_random_outputs(tiny_tokenizer, decode):
    rng = random.Random(0)
    vocab = len(tiny_tokenizer)
    hits = 0
    for trial in range(300):
        # byte tokens (ids ~3-258) split characters: '\ufffd' pieces that later tokens may complete
        # and special tokens (0-2) decode to nothing: a stop string can span many more tokens than characters
        tokens = [rng.randrange(3) if rng.random() < 0.4 else rng.randrange(vocab)
                  for _ in range(rng.randrange(5, 80))]
        text = decode(tokens)
        if trial % 3 == 0 or len(text) < 4:
            stops = ["\ufffd\ufffd", "zq", " the"][: 1 + trial % 3]
        else:
            a = rng.randrange(len(text) - 2)
            stops = [text[a:a + rng.randrange(1, 16)], "never there"]
        ss = StopStrings(stops)
        min_new = rng.choice([0, 0, 1, 3, 10])
        want = reference(ss, decode, tokens, min_new)
        assert incremental(ss, decode, tokens, min_new) == want, (tokens, stops, min_new)
        hits += want is not None
    assert hits > 100  # most trials really stopped


def test_each_step_decodes_a_bounded_tail(decode):
    lengths: list[int] = []

    def counting(ids):
        lengths.append(len(ids))
        return decode(ids)

    tokens = [280 + i % 30 for i in range(400)]  # merged tokens of one or more characters each
    stopper = RowStopper(StopStrings(["never there"]), counting, 0)
    for n in range(1, len(tokens) + 1):
        assert stopper.check(tokens[:n]) is None
    assert max(lengths) <= 2 * (len("never there") + 4)  # not the whole output
