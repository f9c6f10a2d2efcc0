"""Contextual synonym suggestions from the causal LM itself (tiny random model: no hub, no download)."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from decodetune.train.augment import augment_rows
from decodetune.train.augment.synonyms import LMSuggestions
from decodetune.train.augment.text import STOP_WORDS, WordText

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def lm(tiny_pair):
    return LMSuggestions(tiny_pair, top_k=40, rescore=6)


def _total_logprob(model, ids):
    """Sum of log p(token | tokens before) over all tokens but the first, from the model's own loss."""
    if len(ids) < 2:
        return 0.0
    t = torch.tensor([ids])
    with torch.no_grad():
        return -model(t, labels=t).loss.item() * (len(ids) - 1)


def test_continuation_scores_match_full_sequence_loss(lm, tiny_pair):
    """Cached, batched candidate scores equal log p(prefix + cand + suffix) - log p(prefix), uncached."""
    model, tok = tiny_pair
    for head, suffix in [("The quick brown", " jumps over the lazy dog."), ("", " is the capital"), ("Paris", "")]:
        ids = lm.prefix_ids(head)
        suffix_ids = tok(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        cands = [5, 17, 42, 100]
        cache = lm.new_cache()
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True, **{lm._cache_kwarg: cache})
        got = lm.continuation_logprobs(cache, out.logits[0, -1], cands, suffix_ids)
        base = _total_logprob(model, ids)
        for c, score in zip(cands, got, strict=True):
            ref = _total_logprob(model, [*ids, c, *suffix_ids]) - base
            assert score == pytest.approx(ref, rel=1e-4, abs=1e-3)


def test_candidates_are_the_top_whole_word_tokens_after_the_prefix(lm, tiny_pair):
    model, tok = tiny_pair
    prefix, suffix = "The quick ", " fox jumps."
    cands = lm.suggest(prefix, suffix, exclude="brown")
    assert cands and len(cands) <= 6
    words = [w for w, _ in cands]
    assert "brown" not in [w.lower() for w in words]
    assert all(re.fullmatch(r"[A-Za-z]{2,}", w) and w.lower() not in STOP_WORDS for w in words)
    scores = [s for _, s in cands]
    assert scores == sorted(scores, reverse=True)
    # independent reference for the candidate set: the " word" tokens after the prefix, by logit (top 40 of them)
    ids = tok("The quick", add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    ranked = []
    word_tokens = [tid for tid in torch.argsort(logits, descending=True).tolist()
                   if tid not in tok.all_special_ids and tok.decode([tid]).startswith(" ")
                   and re.fullmatch(r"[A-Za-z]{2,}", tok.decode([tid])[1:])][:40]
    for tid in word_tokens:
        word = tok.decode([tid])[1:]
        if word.lower() != "brown" and word.lower() not in STOP_WORDS and word not in ranked:
            ranked.append(word)
    assert set(words) == set(ranked[:6])


def test_replacement_is_seeded_keeps_case_and_draws_from_the_softmax_of_scores(lm):
    doc = WordText.parse("The Quick brown fox jumps over the lazy dog.")
    picks = [lm.replacement(doc, 1, random.Random(s)) for s in range(20)]
    assert picks == [lm.replacement(doc, 1, random.Random(s)) for s in range(20)]
    assert all(p and p[0].isupper() and p[1:].islower() for p in picks)
    assert lm.replacement(doc, 0, random.Random(0)) is None  # no left context: not replaced
    # frequencies of the drawn words follow softmax(sequence log-probabilities)
    cands = lm.suggest(doc.before(2), doc.after(2), exclude="brown")
    top = max(s for _, s in cands)
    z = sum(math.exp(s - top) for _, s in cands)
    draws = [lm.replacement(doc, 2, random.Random(s)) for s in range(3000)]
    for word, score in cands:
        p = math.exp(score - top) / z
        freq = draws.count(word) / len(draws)
        assert abs(freq - p) <= 4 * math.sqrt(p * (1 - p) / len(draws)) + 1e-3, (word, freq, p)


def test_augment_rows_with_lm_synonyms_and_insertion(tiny_pair):
    rows = [{"id": "a", "prompt": TEXT}, {"id": "b", "prompt": "She sells sea shells by the sea shore."}]
    a = augment_rows(rows, "synonym,insert", n=2, seed=4, synonyms="lm", model=tiny_pair, rates=0.2)
    b = augment_rows(rows, "synonym,insert", n=2, seed=4, synonyms="lm", model=tiny_pair, rates=0.2)
    assert a == b
    variants = [r for r in a if r["aug_op"] != "original"]
    assert variants
    for r in variants:
        src = rows[r["aug_source"]]["prompt"]
        assert r["prompt"].endswith(".")
        n_src, n_out = len(WordText.parse(src).words), len(WordText.parse(r["prompt"]).words)
        assert n_out == n_src if r["aug_op"] == "synonym" else n_out > n_src
