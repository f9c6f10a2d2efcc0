"""Metric values on hand-computed examples, including empty predictions, Unicode and several references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from decodetune.errors import UserError
from decodetune.metrics import MetricInput, get_metric, list_metrics
from decodetune.metrics.answer import find_number, normalize_answer
from decodetune.metrics.diversity import ends_in_repetition, zipf_coefficient


def score(name, preds, refs=None, **kw):
    inp = MetricInput(predictions=list(preds), references=refs or [], **kw)
    s = get_metric(name)(inp)
    return s.per_row, s.value()


# ------------------------------------------------------------------------------------------- answer
def test_normalize_answer_squad_rules_and_unicode():
    assert normalize_answer("  The  Cat!! ") == "cat"
    assert normalize_answer("ＡＢＣ") == "abc"  # full-width letters fold under NFKC
    assert normalize_answer("«Café», an idea") == "café idea"  # Unicode punctuation dropped, accents kept
    assert normalize_answer("") == ""


def test_exact_match_best_of_references_and_empty_prediction():
    rows, value = score("exact_match", ["The Cat!", "", "ＡＢＣ", "café"],
                        [["dog", "cat"], ["x"], ["abc"], ["cafe"]])
    assert rows.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert value == 0.5


def test_contains_on_word_boundaries():
    rows, _ = score("contains", ["I think the answer is Paris.", "Parisian food", "", "x 42 y"],
                    [["paris"], ["paris"], ["paris"], ["41", "42"]])
    assert rows.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_numeric_match_parses_commas_unicode_minus_decimals():
    assert find_number("about 1,000 apples") == "1000"
    assert find_number("\u22125 degrees") == "-5"
    rows, value = score("numeric_match", ["The answer is 1,000.", "\u22125", "3.50", "", "seven"],
                        [["1000"], ["-5"], ["3.5"], ["0"], ["7"]])
    assert rows.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert value == pytest.approx(0.6)


def test_numeric_match_rejects_non_numeric_reference_naming_metric():
    with pytest.raises(UserError, match="numeric_match.*'abc'.*not a number"):
        score("numeric_match", ["1"], [["abc"]])


def test_token_f1_hand_computed():
    # pred tokens [cat, sat] (article dropped), ref [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    rows, _ = score("token_f1", ["the cat sat", "", "", "x"], [["cat sat down", "zzz"], ["a"], ["b"], ["x y"]])
    assert rows[0] == pytest.approx(0.8)
    assert rows[1] == 1.0  # empty vs "a" (normalises to empty): both empty
    assert rows[2] == 0.0
    assert rows[3] == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_reference_metric_without_references_fails_clearly():
    with pytest.raises(UserError, match="'exact_match' needs references"):
        score("exact_match", ["a"], [[]])


# ------------------------------------------------------------------------------------------ overlap
def test_bleu_hand_computed_with_exp_smoothing():
    # 1..4-gram precisions 3/4, 2/3, 1/2, 0/1 -> exp smoothing makes the last 1/2; BP = 1.
    expected = 100 * (0.75 * (2 / 3) * 0.5 * 0.5) ** 0.25
    rows, value = score("bleu", ["a b c d"], [["a b c e"]])
    assert rows[0] == pytest.approx(expected, abs=1e-6)
    assert value == pytest.approx(expected, abs=1e-6)
    rows, _ = score("bleu", ["a b c d", ""], [["a b c d"], ["x y"]])
    assert rows.tolist() == [pytest.approx(100.0), 0.0]


def test_bleu_and_chrf_aggregates_equal_sacrebleu_corpus_scores():
    import sacrebleu

    preds = ["the cat sat on the mat", "a dog barks loudly", "hello wörld ✓", ""]
    refs = [["the cat is on the mat", "a cat sat on a mat"], ["the dog barked", "dogs bark"],
            ["hello world", "hi world"], ["nothing", "empty"]]
    streams = [[r[k] for r in refs] for k in range(2)]
    rows, value = score("bleu", preds, refs)
    assert value == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert rows[0] == pytest.approx(sacrebleu.sentence_bleu(preds[0], refs[0]).score)
    rows, value = score("chrf", preds, refs)
    assert value == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)
    assert rows[2] == pytest.approx(sacrebleu.sentence_chrf(preds[2], refs[2]).score)


def test_rouge_hand_computed_multi_reference_and_unicode():
    # pred "the cat sat" vs ref "the cat sat on the mat": unigram P = 1, R = 1/2 -> F = 2/3;
    # bigrams: both hyp bigrams in ref (5 bigrams) -> P = 1, R = 2/5 -> F = 4/7; LCS = 3 -> F = 2/3.
    refs = [["the cat sat on the mat", "zebra"], ["日本 語"], ["x"]]
    preds = ["the cat sat", "日本 語", ""]
    r1, _ = score("rouge1", preds, refs)
    r2, _ = score("rouge2", preds, refs)
    rl, _ = score("rouge-L", preds, refs)  # alias spelling
    assert r1.tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    assert r2[0] == pytest.approx(4 / 7)
    assert rl[0] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------- diversity
def test_distinct_n_corpus_and_rows():
    # bigrams: row 1 {ab, ba, ab}, row 2 {ab, bc}; corpus unique {ab, ba, bc} = 3 of 5
    rows, value = score("distinct-2", ["a b a b", "a b c"])
    assert rows.tolist() == pytest.approx([2 / 3, 1.0])
    assert value == pytest.approx(3 / 5)
    _, v1 = score("distinct-1", ["a b a b", "a b c", ""])
    assert v1 == pytest.approx(3 / 7)


def test_rep_n_and_diversity_simctg():
    rows, value = score("rep-2", ["a b a b", "a b c"])
    assert rows.tolist() == pytest.approx([100 / 3, 0.0])
    assert value == pytest.approx(100 * (1 - 4 / 5))
    # "a b a b a b": bigrams 2 of 5 unique, trigrams 2 of 4, 4-grams 2 of 3
    rows, value = score("diversity", ["a b a b a b"])
    assert value == pytest.approx((2 / 5) * (2 / 4) * (2 / 3))
    rows, _ = score("diversity", ["one two"])  # no 3-grams: undefined, not a crash
    assert math.isnan(rows[0])


def test_self_bleu_matches_sacrebleu_sentence_bleu_against_the_rest():
    import sacrebleu

    texts = ["the cat sat on the mat", "the cat sat on a hat", "a dog ran in the park", "the the the", "",
             "naïve café déjà vu"]
    rows, value = score("self_bleu", texts)
    for i, t in enumerate(texts):
        others = texts[:i] + texts[i + 1:]
        ref = sacrebleu.metrics.BLEU(effective_order=True).sentence_score(t, others).score / 100
        assert rows[i] == pytest.approx(ref, abs=1e-9), i
    assert value == pytest.approx(rows.mean())
    rows, _ = score("self_bleu", ["same words here", "same words here"])
    assert rows.tolist() == pytest.approx([1.0, 1.0])
    rows, _ = score("self_bleu", ["alpha beta", "gamma delta"])
    assert rows.tolist() == [0.0, 0.0]


def test_holtzman_repetition_definition():
    assert not ends_in_repetition([1, 2, 3, 4, 5])
    assert ends_in_repetition([9, 1, 2, 1, 2, 1, 2])  # "1 2" three times at the end
    assert not ends_in_repetition([1, 2, 1, 2])  # only twice
    assert not ends_in_repetition([5, 5, 5])  # one-token phrase does not count
    assert ends_in_repetition([7] * 6)  # "7 7" three times
    assert not ends_in_repetition([1, 2, 1, 2, 1, 2, 3])  # loop must be at the end
    assert not ends_in_repetition(list(range(300)) + [1, 2] * 5)  # only the first 200 tokens count
    assert not ends_in_repetition([])
    rows, value = score("repetition", ["x", "y"], token_ids=[[9, 1, 2, 1, 2, 1, 2], [1, 2, 3]])
    assert rows.tolist() == [100.0, 0.0] and value == 50.0
    rows, _ = score("repetition", ["la la la la la la", "no loop here"])  # whitespace tokens fallback
    assert rows.tolist() == [100.0, 0.0]


def test_zipf_coefficient_exact_power_law():
    counts = np.array([120, 60, 40, 30, 24])  # 120 / rank: slope exactly -1
    assert zipf_coefficient(counts) == pytest.approx(1.0)
    text = " ".join(["a"] * 120 + ["b"] * 60 + ["c"] * 40 + ["d"] * 30 + ["e"] * 24)
    rows, value = score("zipf", [text[:300], text[300:]])
    assert value == pytest.approx(1.0)
    assert np.isnan(rows).all()  # corpus-only
    assert math.isnan(zipf_coefficient(np.array([5])))


def test_length_and_tokens_per_s():
    rows, value = score("length", ["a b", "c"], token_ids=[[1, 2, 3], [4]])
    assert rows.tolist() == [3.0, 1.0] and value == 2.0
    rows, value = score("tokens_per_s", ["a", "b"], token_ids=[[1, 2, 3, 4], [1, 2]], gen_seconds=[2.0, 0.5])
    assert rows.tolist() == [2.0, 4.0]
    assert value == pytest.approx(6 / 2.5)  # total tokens / total seconds


def test_gen_ppl_matches_transformers_loss_on_continuation(tiny_pair):
    import torch

    from decodetune.models.handle import LoadedModel

    model, tok = tiny_pair
    lm = LoadedModel(model, tok, name="tiny")
    prompts = [lm.encode("The quick brown"), lm.encode("Paris is")]
    conts = [lm.encode("fox jumps")[1:], lm.encode("the capital of France")[1:]]
    rows, value = score("gen_ppl", ["x", "y"], token_ids=conts, prompt_token_ids=prompts, scorer=lm,
                        model_name="tiny")
    nll_total, n_total = 0.0, 0
    for i in range(2):
        ids = torch.tensor([prompts[i] + conts[i]])
        labels = ids.clone()
        labels[0, :len(prompts[i])] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        assert rows[i] == pytest.approx(math.exp(loss), rel=1e-4)
        nll_total += loss * len(conts[i])
        n_total += len(conts[i])
    assert value == pytest.approx(math.exp(nll_total / n_total), rel=1e-4)


def test_unknown_metric_lists_known_names():
    with pytest.raises(UserError, match="unknown metric 'blue'.*bleu"):
        get_metric("blue")
    assert {m.name for m in list_metrics()} >= {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match",
                                                 "contains", "numeric_match", "token_f1", "distinct-2", "rep-2",
                                                 "diversity", "self_bleu", "repetition", "zipf", "gen_ppl",
                                                 "length", "tokens_per_s"}
    assert get_metric("distinct-3").name == "distinct-3"
    assert get_metric("Rouge-L").name == "rougeL"


def test_user_metric_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_metrics_mod.py").write_text(
        "def starts_upper(predictions, references, items):\n"
        "    return [1.0 if p[:1].isupper() else 0.0 for p in predictions]\n"
        "starts_upper.direction = 'max'\n"
        "def boom(predictions, references, items):\n"
        "    raise ValueError('bad thing happened')\n"
        "def short(predictions, references, items):\n"
        "    return [1.0]\n"
        "def texty(predictions, references, items):\n"
        "    return ['a' for _ in predictions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows, value = score("my_metrics_mod:starts_upper", ["Yes", "no", ""])
    assert rows.tolist() == [1.0, 0.0, 0.0] and value == pytest.approx(1 / 3)
    with pytest.raises(UserError, match=r"metric 'my_metrics_mod:boom' raised ValueError: bad thing happened"):
        score("my_metrics_mod:boom", ["a"])
    with pytest.raises(UserError, match="returned 1 scores for 2 predictions"):
        score("my_metrics_mod:short", ["a", "b"])
    with pytest.raises(UserError, match="non-number"):
        score("my_metrics_mod:texty", ["a"])
    with pytest.raises(UserError, match="no function 'nope'"):
        get_metric("my_metrics_mod:nope")
    with pytest.raises(UserError, match="cannot import module"):
        get_metric("no_such_module_xyz:f")
