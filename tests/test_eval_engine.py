"""evaluate() on the real engine: rows equal direct generate() calls, batch composition does not matter."""

from __future__ import annotations

import json

import pytest

from decodetune import DecodingConfig
from decodetune.decoding import generate
from decodetune.eval import evaluate, evaluate_many
from decodetune.models.handle import LoadedModel

PROMPTS = ["The quick brown fox", "Once upon a time", "Paris is the capital", "She sells sea shells",
           "What is 12 plus 7?"]


@pytest.fixture()
def lm(tiny_pair):
    return LoadedModel(*tiny_pair, name="tiny")


@pytest.fixture()
def task_file(tmp_path):
    p = tmp_path / "open.jsonl"
    p.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS)))
    return p


def test_rows_equal_direct_generate_with_the_row_seeds(lm, task_file):
    cfg = DecodingConfig(strategy="sample", temperature=1.3, top_k=50, max_new_tokens=10)
    res = evaluate(lm, task_file, cfg, repeats=2, metrics=["distinct-1", "length"], bootstrap=0)
    assert len(res.rows) == 10
    gens = generate(lm, [r["prompt"] for r in res.rows], cfg, seeds=[r["seed"] for r in res.rows])
    assert [r["prediction"] for r in res.rows] == [g.text for g in gens]
    assert [r["num_tokens"] for r in res.rows] == [len(g.token_ids) for g in gens]
    # two repeats of one item differ (different seeds), so sampling really happened
    assert len({r["prediction"] for r in res.rows}) > len(PROMPTS)


def test_batch_composition_does_not_change_a_configs_rows(lm, task_file):
    a = DecodingConfig(strategy="greedy", max_new_tokens=8)
    b = DecodingConfig(strategy="sample", temperature=0.9, top_p=0.9, max_new_tokens=8)
    c = DecodingConfig(strategy="beam", num_beams=2, max_new_tokens=8)
    alone = evaluate(lm, task_file, b, repeats=2, metrics=["length"], bootstrap=0)
    together = evaluate_many(lm, task_file, [a, b, c], repeats=2, metrics=["length"], bootstrap=0, batch_size=3)
    assert [r["prediction"] for r in together[1].rows] == [r["prediction"] for r in alone.rows]
    greedy = generate(lm, PROMPTS, a)
    assert [r["prediction"] for r in together[0].rows] == [g.text for g in greedy]


def test_cache_serves_identical_rows_on_the_real_engine(lm, task_file, tmp_path):
    cfg = {"strategy": "sample", "temperature": 1.0, "max_new_tokens": 6}
    first = evaluate(lm, task_file, cfg, repeats=2, cache=tmp_path / "c.sqlite", metrics=["length"], bootstrap=0)
    again = evaluate(lm, task_file, cfg, repeats=2, cache=tmp_path / "c.sqlite", metrics=["length"], bootstrap=0)
    assert again.cache_hits == 10 and again.num_tokens_generated == 0
    assert [r["prediction"] for r in again.rows] == [r["prediction"] for r in first.rows]


def test_gen_ppl_through_evaluate_uses_the_model_as_scorer(lm, task_file):
    import math

    import torch

    res = evaluate(lm, task_file, {"max_new_tokens": 6}, metrics=["gen_ppl"], bootstrap=0)
    row = res.rows[0]
    ids = torch.tensor([lm.encode(row["prompt"]) + row["token_ids"]])
    labels = ids.clone()
    labels[0, : -len(row["token_ids"])] = -100
    with torch.no_grad():
        loss = lm.model(input_ids=ids, labels=labels).loss.item()
    assert res.metrics["gen_ppl"].per_row[0] == pytest.approx(math.exp(loss), rel=1e-4)


@pytest.mark.slow
def test_smollm2_greedy_on_arith_is_between_0_and_100_percent(smollm2):
    res = evaluate(smollm2, "arith", None, limit=24, bootstrap=200)
    assert 0.05 < res.score < 0.95, res.score
    assert sum(r["extracted"] != "" for r in res.rows) >= 20  # the model answers with numbers
