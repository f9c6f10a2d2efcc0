"""augment_task / robustness: augmented task items and the paired original-vs-augmented metric."""

from __future__ import annotations

import json

import pytest

from decodetune.config import DecodingConfig
from decodetune.errors import UserError
from decodetune.train.augment.robustness import augment_task, robustness
from decodetune.train.augment.text import numbers_in


@pytest.fixture()
def closed_task(tmp_path):
    rows = [{"id": f"q{i}", "prompt": f"What is {i} plus {i + 3}? Answer with just the number.",
             "answer": str(2 * i + 3)} for i in range(6)]
    path = tmp_path / "add.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_augment_task_keeps_references_and_numbers(closed_task):
    from decodetune.tasks import load_task

    base = load_task(closed_task)
    aug = augment_task(base, "swap,delete", n=3, seed=2, split="all")
    items = aug.items("all")
    originals = {it.id: it for it in base.items("all")}
    assert aug.kind == base.kind and aug.metrics == base.metrics and aug.extract == base.extract
    assert items and all("~" in it.id for it in items)
    for it in items:
        src = originals[it.data["aug_source"]]
        assert it.references == src.references
        assert it.id.startswith(src.id + "~" + it.data["aug_op"])
        assert numbers_in(it.prompt) == numbers_in(src.prompt)  # closed task: numbers preserved by default
        assert it.prompt != src.prompt
    assert len({it.id for it in items}) == len(items)


def test_backgen_refused_for_tasks_with_answers(closed_task):
    with pytest.raises(UserError, match="backgen writes new prompts"):
        augment_task(closed_task, "backgen", split="all")


def test_robustness_matches_separate_evaluations(closed_task, tiny_pair):
    from decodetune.eval import evaluate

    greedy = DecodingConfig(max_new_tokens=4)
    res = robustness(tiny_pair, closed_task, [greedy], "swap,delete", n=2, seed=1, split="all")
    assert len(res) == 1
    r = res[0]
    orig = evaluate(tiny_pair, closed_task, greedy, split="all", seed=1, bootstrap=0)
    assert r.original == pytest.approx(orig.score)
    aug = augment_task(closed_task, "swap,delete", n=2, seed=1, split="all")
    aug_eval = evaluate(tiny_pair, aug, greedy, split="all", seed=1, bootstrap=0)
    assert r.augmented == pytest.approx(aug_eval.score)
    # the paired drop, recomputed by hand from the two evaluations
    o = dict(zip(orig.item_ids, orig.per_item(), strict=True))
    groups: dict[str, list[float]] = {}
    for item, s in zip(aug.items("all"), aug_eval.per_item(), strict=True):
        groups.setdefault(item.data["aug_source"], []).append(s)
    diffs = [o[k] - sum(v) / len(v) for k, v in groups.items()]
    assert r.drop == pytest.approx(sum(diffs) / len(diffs))
    assert r.items == len(groups) and r.variants == len(aug.items("all"))
    assert r.drop_ci[0] <= r.drop <= r.drop_ci[1]
    assert set(r.per_op) <= {"swap", "delete"}
