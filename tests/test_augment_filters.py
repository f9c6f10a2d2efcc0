"""Augmentation filters: duplicates, n-gram overlap, Self-BLEU, lengths, answer preservation."""

from __future__ import annotations

import math

import pytest

from decodetune.errors import UserError
from decodetune.train.augment.filters import Filters, compile_preserve, ngram_jaccard, preserves, self_bleu


def test_ngram_jaccard_hand_computed():
    # trigrams {abc, bcd, cde} vs {abc, bcd, cdf}: 2 shared of 4 distinct
    assert ngram_jaccard("a b c d e", "A b c d f", 3) == pytest.approx(0.5)
    assert ngram_jaccard("a b", "a b", 3) == 1.0  # n shrinks to the text length
    assert ngram_jaccard("a b c", "x y z", 2) == 0.0
    assert ngram_jaccard("", "x", 2) == 0.0


def test_self_bleu_hand_computed():
    # precisions 4/5, 3/4, 2/3, 1/2, equal lengths (no brevity penalty): BLEU = (0.2) ** (1/4)
    assert self_bleu("a b c d e", ["a b c d f"]) == pytest.approx(0.2 ** 0.25, abs=1e-9)
    # brevity penalty: hypothesis of 4 tokens against a reference of 5 -> exp(1 - 5/4), precisions all 1
    assert self_bleu("a b c d", ["a b c d e"]) == pytest.approx(math.exp(1 - 5 / 4), abs=1e-9)
    assert self_bleu("p q r", ["x y z"]) == 0.0


def test_exact_duplicates_and_empty_are_always_dropped():
    f = Filters()
    assert f.check("", "orig", []) == "empty"
    assert f.check("  orig ", "orig", []) == "duplicate"
    assert f.check("a  b", "orig", ["a b"]) == "duplicate"
    assert f.check("something else", "orig", []) is None


def test_overlap_threshold():
    f = Filters(max_overlap=0.5, overlap_n=3)
    assert f.check("a b c d f", "a b c d e", []) is None  # 0.5 is not above 0.5
    assert Filters(max_overlap=0.49).check("a b c d f", "a b c d e", []) == "overlap"
    # compared with kept siblings too
    assert Filters(max_overlap=0.4).check("x b c d e", "p q r s t", ["x b c d f"]) == "overlap"


def test_self_bleu_threshold():
    assert Filters(max_self_bleu=0.7).check("a b c d e", "a b c d f", []) is None
    assert Filters(max_self_bleu=0.6).check("a b c d e", "a b c d f", []) == "self_bleu"


def test_length_bounds():
    orig = "one two three four"
    assert Filters(min_words=3).check("one two", orig, []) == "length"
    assert Filters(max_words=3).check("one two three four five", orig, []) == "length"
    assert Filters(min_len_ratio=0.75).check("one two", orig, []) == "length"
    assert Filters(min_len_ratio=0.5, max_len_ratio=1.25).check("one two four", orig, []) is None
    assert Filters(max_len_ratio=1.25).check("a b c d e f", orig, []) == "length"


def test_preserve_numbers_in_order():
    numbers = compile_preserve("numbers")
    assert preserves(numbers, "What is 30 minus 4?", "Compute 30 minus 4.")
    assert not preserves(numbers, "What is 30 minus 4?", "What is 4 minus 30?")
    assert not preserves(numbers, "What is 30 minus 4?", "What is 30 minus?")
    assert not preserves(numbers, "What is 30 minus 4?", "What is 30 minus 4 minus 1?")
    assert preserves(numbers, "Add -3 and 2.5", "Add \u22123 and 2.5 together")
    f = Filters(preserve=numbers)
    assert f.check("What is 4 minus 30?", "What is 30 minus 4?", []) == "preserve"
    words = compile_preserve(r"\b(?:plus|minus)\b")
    assert not preserves(words, "12 plus 7", "12 and 7")
    assert preserves(words, "12 Plus 7", "12 plus 7")


def test_bad_filter_settings_are_user_errors():
    with pytest.raises(UserError, match="--max-overlap"):
        Filters(max_overlap=1.5)
    with pytest.raises(UserError, match="--max-self-bleu"):
        Filters(max_self_bleu=-0.1)
    with pytest.raises(UserError, match="--min-words"):
        Filters(min_words=5, max_words=2)
    with pytest.raises(UserError, match="--preserve"):
        compile_preserve("(unclosed")
