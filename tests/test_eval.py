"""evaluate / evaluate_many / compare with a fake engine: batching, seeds, cache, item selection, outputs."""

from __future__ import annotations

import json
import re

import pytest

from decodetune import DecodingConfig
from decodetune.decoding.types import Generation
from decodetune.errors import UserError
from decodetune.eval import compare, evaluate, evaluate_many, row_seed
from decodetune.evaluation import runner
from decodetune.models.handle import LoadedModel


class FakeEngine:
    """Answers arith prompts: greedy is right; a sample is right iff seed % 3 == 1, else off by one."""

    def __init__(self, lm):
        self.lm = lm
        self.calls: list[dict] = []

    def __call__(self, model, prompts, configs, seeds, *, batch_size, progress):
        self.calls.append({"prompts": list(prompts), "configs": list(configs), "seeds": list(seeds)})
        out = []
        for i, (p, c, s) in enumerate(zip(prompts, configs, seeds, strict=True)):
            m = re.search(r"(\d+) ([+-]) (\d+)", p if isinstance(p, str) else p[-1]["content"])
            if m:
                a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
                ans = a + b if op == "+" else a - b
                if c.is_sampling:
                    ans += (s % 3) - 1
                text = f"{a} {op} {b} = {ans}"
            else:
                text = f"story {s if c.is_sampling else 0} " + " ".join(["la"] * (c.max_new_tokens // 8))
            ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"][: c.max_new_tokens]
            for j in range(c.num_return_sequences):
                out.append(Generation(text=text, token_ids=list(ids), logprobs=None, finish_reason="eos",
                                      timings={"prefill_s": 0.01, "decode_s": 0.04, "total_s": 0.05},
                                      prompt_index=i, sequence_index=j, num_prompt_tokens=3, score=0.0, seed=s))
        return out


@pytest.fixture()
def lm(tiny_pair):
    model, tok = tiny_pair
    return LoadedModel(model, tok, name="tiny")


@pytest.fixture()
def engine(lm, monkeypatch):
    fake = FakeEngine(lm)
    monkeypatch.setattr(runner, "_generate", fake)
    return fake


def test_greedy_eval_scores_and_aligns_items(lm, engine):
    res = evaluate(lm, "arith", None, limit=10, bootstrap=200)
    assert len(engine.calls) == 1 and len(engine.calls[0]["prompts"]) == 10
    assert engine.calls[0]["configs"][0].max_new_tokens == 12  # the task default
    assert res.score == 1.0 and res.primary == "numeric_match"
    assert res.item_ids == [f"arith-dev-{k:03d}" for k in range(10)]
    assert res.per_item() == [1.0] * 10
    ci = res.metrics["numeric_match"]  # 10 of 10: Wilson, not a zero-width bootstrap [1, 1]
    assert ci.ci_low == pytest.approx(0.7225, abs=1e-4) and ci.ci_high == pytest.approx(1.0)
    assert res.rows[0]["extracted"] == res.rows[0]["references"][0]
    assert res.num_tokens == sum(r["num_tokens"] for r in res.rows) == res.num_tokens_generated
    assert res.cache_hits == 0 and res.cache_misses == 10


def test_item_indices_pick_items_in_order(lm, engine):
    res = evaluate(lm, "arith", {"strategy": "greedy"}, item_indices=[3, 1, 7], bootstrap=0)
    assert res.item_ids == ["arith-dev-003", "arith-dev-001", "arith-dev-007"]
    assert [r["item_id"] for r in res.rows] == res.item_ids
    with pytest.raises(UserError, match="item_indices: 500"):
        evaluate(lm, "arith", None, item_indices=[500])


def test_all_configs_rows_in_one_generate_call_with_common_random_numbers(lm, engine):
    cfgs = [{"strategy": "greedy"}, {"strategy": "sample", "temperature": 1.0},
            {"strategy": "sample", "temperature": 0.5, "top_k": 5}]
    results = evaluate_many(lm, "arith", cfgs, limit=6, repeats=3, seed=11, bootstrap=100)
    assert len(engine.calls) == 1
    assert len(engine.calls[0]["prompts"]) == 6 + 2 * 6 * 3  # greedy runs once per item
    assert [r.repeats for r in results] == [1, 3, 3]
    for res in results[1:]:
        assert [r["seed"] for r in res.rows] == [row_seed(11, r["item_id"], r["repeat"]) for r in res.rows]
    assert [r["seed"] for r in results[1].rows] == [r["seed"] for r in results[2].rows]
    assert len({r["seed"] for r in results[1].rows}) == 18  # distinct across items and repeats
    # a sample is right iff its seed % 3 == 1: the score follows from the seeds alone
    expected = sum(r["seed"] % 3 == 1 for r in results[1].rows) / 18
    assert results[1].score == pytest.approx(expected)
    assert results[1].per_item() == pytest.approx(
        [sum(r["seed"] % 3 == 1 for r in results[1].rows if r["item_index"] == i) / 3 for i in range(6)])


def test_row_seed_depends_on_base_item_and_repeat_only():
    assert row_seed(0, "a", 0) == row_seed(0, "a", 0)
    assert len({row_seed(0, "a", 0), row_seed(1, "a", 0), row_seed(0, "b", 0), row_seed(0, "a", 1)}) == 4
    assert 0 <= row_seed(123, "x", 9) < 2**31


def test_identical_rows_are_generated_once(lm, engine):
    cmp = compare(lm, "arith", [{"strategy": "greedy"}, DecodingConfig(strategy="greedy", temperature=0.3)],
                  limit=5, bootstrap=50)
    assert len(engine.calls[0]["prompts"]) == 5  # temperature cannot change greedy output
    assert cmp.results[0].rows[0]["prediction"] == cmp.results[1].rows[0]["prediction"]
    assert cmp.difference(1, "numeric_match").diff == 0
    assert cmp.difference(1, "numeric_match").p_value == 1.0


def test_cache_makes_a_repeated_config_free(lm, engine, tmp_path):
    path = tmp_path / "gen.sqlite"
    sample = {"strategy": "sample", "temperature": 0.9}
    first = evaluate(lm, "arith", sample, limit=8, repeats=2, cache=path, bootstrap=0)
    assert (first.cache_hits, first.cache_misses) == (0, 16) and len(engine.calls) == 1
    again = evaluate(lm, "arith", sample, limit=8, repeats=2, cache=path, bootstrap=0)
    assert len(engine.calls) == 1  # nothing generated
    assert (again.cache_hits, again.cache_misses, again.num_tokens_generated) == (16, 0, 0)
    assert [r["prediction"] for r in again.rows] == [r["prediction"] for r in first.rows]
    assert again.score == first.score
    # a third repeat and a new base seed generate only what is new
    evaluate(lm, "arith", sample, limit=8, repeats=3, cache=path, bootstrap=0)
    assert len(engine.calls[-1]["prompts"]) == 8
    evaluate(lm, "arith", sample, limit=8, repeats=1, seed=5, cache=path, bootstrap=0)
    assert len(engine.calls[-1]["prompts"]) == 8


def test_task_defaults_fill_only_unset_fields(lm, engine):
    evaluate(lm, "arith", {"max_new_tokens": 64}, limit=2, bootstrap=0)
    assert engine.calls[-1]["configs"][0].max_new_tokens == 64
    evaluate(lm, "arith", DecodingConfig(strategy="sample", top_k=3), limit=2, bootstrap=0)
    assert engine.calls[-1]["configs"][0].max_new_tokens == 12
    assert engine.calls[-1]["configs"][0].top_k == 3


def test_reference_metric_on_open_task_fails_before_generating(lm, engine):
    with pytest.raises(UserError, match="'bleu' needs references.*story-dev-000.*'story'"):
        evaluate(lm, "story", None, metrics=["bleu"], limit=3)
    assert engine.calls == []


def test_generations_are_written_before_a_failing_metric(lm, engine, tmp_path, monkeypatch):
    (tmp_path / "failing_metric_mod.py").write_text(
        "def boom(predictions, references, items):\n    raise RuntimeError('metric exploded')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "gens.jsonl"
    with pytest.raises(UserError, match="failing_metric_mod:boom' raised RuntimeError: metric exploded"):
        evaluate(lm, "arith", None, limit=4, metrics=["numeric_match", "failing_metric_mod:boom"], output=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all("prediction" in r and "scores" not in r for r in rows)


def test_output_rows_carry_scores(lm, engine, tmp_path):
    out = tmp_path / "gens.jsonl"
    res = evaluate(lm, "arith", None, limit=3, output=out, bootstrap=0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["scores"]["numeric_match"] for r in rows] == res.per_item()
    assert rows[0]["item_id"] == "arith-dev-000" and "token_ids" not in rows[0]


def test_open_task_corpus_metrics_and_json_result(lm, engine):
    res = evaluate(lm, "story", {"strategy": "sample"}, limit=6, repeats=2,
                   metrics=["distinct-2", "repetition", "self_bleu", "zipf", "length"], bootstrap=100)
    assert res.metrics["distinct-2"].corpus and not res.metrics["repetition"].corpus
    assert res.metrics["repetition"].value == 100.0  # "la la la ..." loops
    assert res.metrics["distinct-2"].ci_low <= res.metrics["distinct-2"].value <= res.metrics["distinct-2"].ci_high
    d = json.loads(json.dumps(res.to_dict(rows=True)))
    assert d["metrics"]["zipf"]["per_item"] == [None] * 6  # corpus-only: NaN -> null
    assert len(d["rows"]) == 12


def test_compare_reports_paired_differences(lm, engine):
    cmp = compare(lm, "arith", [{"strategy": "greedy"}, {"strategy": "sample"}], limit=30, repeats=2,
                  bootstrap=300)
    d = cmp.difference(1, "numeric_match")
    assert d.test == "wilcoxon" and d.config_index == 1
    assert d.value_a == 1.0 and d.diff == pytest.approx(cmp.results[1].score - 1.0)
    assert d.diff < 0 and d.p_value < 0.001 and d.ci_high < 0
    assert {x.metric for x in cmp.differences} == {"numeric_match", "length"}
    with pytest.raises(UserError, match="at least two configs"):
        compare(lm, "arith", [None])


def test_bad_arguments(lm, engine):
    with pytest.raises(UserError, match="repeats"):
        evaluate(lm, "arith", None, repeats=0)
    with pytest.raises(UserError, match="limit"):
        evaluate(lm, "arith", None, limit=0)
    with pytest.raises(UserError, match="top_p"):
        evaluate(lm, "arith", {"strategy": "sample", "top_p": 2})
    with pytest.raises(UserError, match="unknown metric"):
        evaluate(lm, "arith", None, metrics=["nope"])
    assert engine.calls == []
