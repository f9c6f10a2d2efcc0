"""Token-level augmentation ops: text handling, determinism, rates (statistically), protection, synonyms."""

from __future__ import annotations

import random
import re
import statistics

import pytest

from decodetune.errors import UserError
from decodetune.train.augment.ops import apply_token_op, delete_words, insert_words, replace_synonyms, swap_words
from decodetune.train.augment.synonyms import SynonymTable
from decodetune.train.augment.text import NUMBER_RE, WordText, edit_count, match_case, numbers_in

SENTENCE = "What is 12 plus 7? The answer, of course, is 19."

# 50 distinct content words (no stop words), so that every word is eligible for every op
WORDS = [f"w{chr(97 + i % 26)}{chr(97 + i // 26)}x" for i in range(50)]
LONG = " ".join(WORDS) + "."


def full_table(words: list[str]) -> SynonymTable:
    return SynonymTable({w: [w + "syn"] for w in words})


@pytest.mark.parametrize("text", [
    SENTENCE, "", "   ", "Hello", "  lead and trail  ", "don't stop-me now: 3.14, 1,000 and x/y!",
    "Ünïcödé wörds, naïve café — ok?", "line one\nline two\n\n(three)", "¿Qué?",
])
def test_parse_render_round_trip(text):
    doc = WordText.parse(text)
    assert doc.render() == text
    assert len(doc.gaps) == len(doc.words) + 1


def test_words_keep_case_digits_and_inner_punctuation():
    doc = WordText.parse("Don't say 3.14 or 1,000; well-known X.")
    assert doc.words == ["Don't", "say", "3.14", "or", "1,000", "well-known", "X"]
    assert doc.gaps == ["", " ", " ", " ", " ", "; ", " ", "."]


@pytest.mark.parametrize(("text", "index", "expected"), [
    ("the big dog", 1, "the dog"),
    ("the big dog", 0, "big dog"),
    ("the big dog.", 2, "the big."),
    ("a, b, c", 1, "a, c"),
    ("Hello, world!", 1, "Hello,!"),
    ("Hello, world", 0, ", world"),
    ("see (x) now", 1, "see () now"),
    ("one two", 1, "one"),
])
def test_delete_merges_gaps_and_keeps_punctuation(text, index, expected):
    doc = WordText.parse(text)
    doc.delete(index)
    assert doc.render() == expected


@pytest.mark.parametrize(("text", "slot", "expected"), [
    ("What is it?", 0, "NEW What is it?"),
    ("What is it?", 1, "What NEW is it?"),
    ("What is it?", 3, "What is it NEW?"),
    ("Hello, world", 1, "Hello, NEW world"),
    ("", 0, "NEW"),
    ("...", 0, "...NEW"),
])
def test_insert_positions(text, slot, expected):
    doc = WordText.parse(text)
    doc.insert(slot, "NEW")
    assert doc.render() == expected


def test_match_case():
    assert match_case("Quick", "fast") == "Fast"
    assert match_case("QUICK", "fast") == "FAST"
    assert match_case("quick", "fast") == "fast"
    assert match_case("quick", "Paris") == "Paris"
    assert match_case("I", "me") == "Me"


def test_numbers_in():
    assert numbers_in("Take -3, add 1,000 and 2.5 to x2 \u22124") == ["-3", "1,000", "2.5", "-4"]


def test_edit_count_expectation_is_exact():
    rng = random.Random(0)
    counts = [edit_count(0.13, 50, rng) for _ in range(20000)]
    assert set(counts) == {6, 7}
    assert statistics.mean(counts) == pytest.approx(6.5, abs=0.02)
    assert edit_count(0.0, 50, rng) == 0
    assert edit_count(0.01, 3, rng) == 1  # EDA: a positive rate always edits something


@pytest.mark.parametrize("op", ["swap", "delete", "insert", "synonym"])
def test_same_seed_same_output_and_seeds_differ(op):
    table = full_table(WORDS)
    outs = {}
    for seed in range(5):
        a = apply_token_op(op, LONG, 0.2, random.Random(seed), table)
        b = apply_token_op(op, LONG, 0.2, random.Random(seed), table)
        assert a == b
        outs[seed] = a
    assert len(set(outs.values())) == 5
    assert all(o != LONG for o in outs.values())


@pytest.mark.parametrize("op", ["swap", "delete", "insert", "synonym"])
def test_rate_zero_changes_nothing(op):
    assert apply_token_op(op, SENTENCE, 0.0, random.Random(1), full_table(WORDS)) == SENTENCE


def test_swap_rate_is_honoured():
    """rate 0.13 on 50 distinct words: 6.5 swaps on average, each moving two words."""
    doc = WordText.parse(LONG)
    moved = []
    for s in range(2000):
        out = swap_words(doc, 0.13, random.Random(s))
        assert sorted(out.words) == sorted(doc.words) and out.gaps == doc.gaps
        moved.append(sum(a != b for a, b in zip(out.words, doc.words, strict=True)))
    assert set(moved) == {12, 14}
    assert statistics.mean(moved) == pytest.approx(13.0, abs=0.15)


def test_delete_rate_is_honoured():
    words = [f"t{i}q" for i in range(200)]
    doc = WordText.parse(" ".join(words))
    fractions = []
    for s in range(300):
        out = delete_words(doc, 0.2, random.Random(s))
        kept = out.words
        # what is left is the original words, in order, verbatim
        it = iter(words)
        assert all(any(w == x for x in it) for w in kept)
        fractions.append(1 - len(kept) / len(words))
    # each word independently with p=0.2: sd of the mean over 60000 words is 0.0016
    assert statistics.mean(fractions) == pytest.approx(0.2, abs=0.008)


def test_delete_never_empties_and_always_edits():
    doc = WordText.parse("alpha beta")
    for s in range(200):
        assert len(delete_words(doc, 1.0, random.Random(s)).words) == 1
        assert len(delete_words(doc, 0.001, random.Random(s)).words) == 1


def test_synonym_rate_is_honoured_and_replacements_come_from_the_table():
    table = full_table(WORDS)
    doc = WordText.parse(LONG)
    replaced = []
    for s in range(2000):
        out = replace_synonyms(doc, 0.13, random.Random(s), table)
        changed = [(a, b) for a, b in zip(doc.words, out.words, strict=True) if a != b]
        assert all(b == a + "syn" for a, b in changed)
        replaced.append(len(changed))
    assert set(replaced) == {6, 7}
    assert statistics.mean(replaced) == pytest.approx(6.5, abs=0.05)


def test_insert_rate_is_honoured_and_words_are_synonyms_of_the_text():
    table = full_table(WORDS)
    doc = WordText.parse(LONG)
    added = []
    for s in range(2000):
        out = insert_words(doc, 0.13, random.Random(s), table)
        extra = list(out.words)
        for w in doc.words:
            extra.remove(w)
        assert all(e.endswith("syn") and e[:-3] in WORDS for e in extra)
        assert out.render().endswith(".")
        added.append(len(extra))
    assert statistics.mean(added) == pytest.approx(6.5, abs=0.05)


def test_synonyms_skip_stop_words_and_keep_case():
    table = SynonymTable({"the": ["a"], "quick": ["fast", "rapid"], "is": ["be"]})
    for s in range(50):
        out = apply_token_op("synonym", "The QUICK dog is Quick.", 1.0, random.Random(s), table)
        words = WordText.parse(out).words
        assert words[0] == "The" and words[3] == "is"  # stop words untouched
        assert words[1] in ("FAST", "RAPID") and words[4] in ("Fast", "Rapid")
        assert out.endswith(".")


def test_protected_numbers_never_move_or_vanish():
    text = "Compute 30 minus 4 then add 8 and 15 to the total of 2 boxes."
    table = full_table(["Compute", "minus", "then", "add", "total", "boxes"])
    for op in ("swap", "delete", "insert", "synonym"):
        for s in range(100):
            out = apply_token_op(op, text, 0.5, random.Random(s), table, protect=NUMBER_RE)
            assert numbers_in(out) == ["30", "4", "8", "15", "2"], (op, out)


def test_ops_keep_punctuation_digits_and_case():
    table = full_table(["What", "plus", "answer", "course"])
    for s in range(100):
        for op in ("swap", "insert", "synonym"):
            out = apply_token_op(op, SENTENCE, 0.3, random.Random(s), table)
            assert re.sub(r"[\w\s]", "", out) == re.sub(r"[\w\s]", "", SENTENCE)  # same punctuation, in order
        swapped = apply_token_op("swap", SENTENCE, 0.3, random.Random(s))
        assert sorted(WordText.parse(swapped).words) == sorted(WordText.parse(SENTENCE).words)


def test_table_loading_tsv_and_json(tmp_path):
    tsv = tmp_path / "syn.tsv"
    tsv.write_text("# comment\nQuick\tfast\trapid\n\nbig\tlarge\nquick\tswift\n", encoding="utf-8")
    table = SynonymTable.load(tsv)
    assert table.synonyms("QUICK") == ["fast", "rapid", "swift"] and table.synonyms("big") == ["large"]
    js = tmp_path / "syn.json"
    js.write_text('{"big": ["large", "big", "huge"], "small": "tiny"}', encoding="utf-8")
    table = SynonymTable.load(js)
    assert table.synonyms("big") == ["large", "huge"] and table.synonyms("small") == ["tiny"]


def test_table_loading_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("quick\tfast\nlonely\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.tsv:2: expected"):
        SynonymTable.load(bad)
    badjson = tmp_path / "bad.json"
    badjson.write_text('{"a": [1]}', encoding="utf-8")
    with pytest.raises(UserError, match="entry 'a'"):
        SynonymTable.load(badjson)
    with pytest.raises(UserError, match="file not found"):
        SynonymTable.load(tmp_path / "missing.tsv")
