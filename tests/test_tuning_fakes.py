"""A deterministic stand-in for ``evaluate_many`` / ``compare`` so the tuning loop is tested without generation.

Each (config, item) has score 1 when the item's fixed uniform number is below the config's ``quality``
(common random numbers, as the real evaluator derives row seeds from the item), so a better config
wins on a superset of items: exactly the situation a paired test (and WilcoxonPruner) is built for.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from decodetune.config import DecodingConfig
from decodetune.tasks.base import Task, TaskItem


def toy_task(n_dev: int = 40, n_test: int = 20) -> Task:
    def items(prefix: str, n: int) -> list[TaskItem]:
        return [TaskItem(id=f"{prefix}{i}", prompt=f"What is {i} plus 1?", references=[str(i + 1)])
                for i in range(n)]
    return Task(name="toy", kind="closed", metrics=["exact_match"],
                splits={"dev": items("d", n_dev), "test": items("t", n_test)}, extract="first_number",
                defaults={"max_new_tokens": 8})


def quality(cfg: DecodingConfig) -> float:
    """Best at sample, temperature 0.5, top_p 0.9; greedy 0.5; beam by width."""
    if cfg.strategy == "greedy":
        q = 0.5
    elif cfg.is_beam:
        q = 0.4 + 0.03 * cfg.num_beams
    else:
        q = 0.95 - 0.5 * abs(math.log(cfg.temperature / 0.5)) - abs(cfg.top_p - 0.9)
    q -= 0.2 * abs(cfg.repetition_penalty - 1.0)
    return max(0.0, min(1.0, q))


def uniform(*key: Any) -> float:
    h = hashlib.sha256(json.dumps(key).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


@dataclass
class Summary:
    name: str
    value: float
    ci_low: float
    ci_high: float
    per_item: list[float]
    direction: str = "max"
    corpus: bool = False


@dataclass
class FakeResult:
    config: DecodingConfig
    item_ids: list[str]
    metrics: dict[str, Summary]
    rows: list[dict[str, Any]]
    num_tokens: int
    cache_hits: int
    cache_misses: int
    split: str = "dev"

    def per_item(self, metric: str | None = None) -> list[float]:
        return self.metrics[metric or next(iter(self.metrics))].per_item


@dataclass
class FakeEval:
    """Records every call; ``cache`` persists across calls like the SQLite cache does."""

    tokens_per_row: int = 10
    calls: list[dict[str, Any]] = field(default_factory=list)
    cache: set = field(default_factory=set)
    fail_when: Any = None  # callable(cfg) -> bool: raise for that config
    interrupt_after: int | None = None  # raise KeyboardInterrupt on that call number

    def __call__(self, model: Any, task: Any, configs: list[DecodingConfig], *, split: str = "dev",
                 repeats: int = 1, seed: int = 0, item_indices: list[int] | None = None,
                 metrics: list[str] | None = None, cache: Any = None, **kw: Any) -> list[FakeResult]:
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt
        for c in configs:
            if self.fail_when is not None and self.fail_when(c):
                raise RuntimeError(f"boom for {c.strategy}")
        items = task.items(split)
        idx = list(range(len(items))) if item_indices is None else list(item_indices)
        self.calls.append({"n_configs": len(configs), "n_items": len(idx), "split": split, "indices": idx})
        out = []
        for cfg in configs:
            reps = repeats if cfg.is_sampling else 1
            rows, per_item, hits, misses = [], [], 0, 0
            key_cfg = cfg.to_json()
            for i in idx:
                item = items[i]
                scores = []
                for r in range(reps):
                    s = 1.0 if uniform(item.id, r) < quality(cfg) else 0.0
                    scores.append(s)
                    key = (key_cfg, item.id, seed, r)
                    if key in self.cache:
                        hits += 1
                    else:
                        misses += 1
                        self.cache.add(key)
                    rows.append({"item_id": item.id, "repeat": r, "seed": seed, "prompt": item.prompt,
                                 "prediction": str(int(s)), "references": item.references,
                                 "num_tokens": self.tokens_per_row, "scores": {"exact_match": s}})
                per_item.append(sum(scores) / len(scores))
            mean = sum(per_item) / len(per_item)
            half = 1.96 * math.sqrt(max(mean * (1 - mean), 1e-9) / len(per_item))
            summ = {m: Summary(m, mean, mean - half, mean + half, per_item) for m in (metrics or ["exact_match"])}
            out.append(FakeResult(cfg, [items[i].id for i in idx], summ, rows, misses * self.tokens_per_row,
                                  hits, misses, split))
        return out

    @property
    def rows_evaluated(self) -> int:
        return sum(c["n_configs"] * c["n_items"] for c in self.calls)


@dataclass
class FakeComparison:
    results: list[FakeResult]
    differences: list[dict[str, Any]]


def make_fake_compare(ev: FakeEval):
    def compare(model: Any, task: Any, configs: list[DecodingConfig], **kw: Any) -> FakeComparison:
        results = ev(model, task, configs, **kw)
        diffs = []
        for j, r in enumerate(results[1:], start=1):
            for m, s in r.metrics.items():
                diffs.append({"index": j, "metric": m, "diff": s.value - results[0].metrics[m].value,
                              "p_value": 0.5, "test": "fake"})
        return FakeComparison(results, diffs)
    return compare


def test_fake_quality_orders_configs():
    """Sanity of the stand-in itself: the intended optimum scores above greedy on the same items."""
    ev = FakeEval()
    task = toy_task()
    best, greedy = ev(None, task, [DecodingConfig(strategy="sample", temperature=0.5, top_p=0.9),
                                   DecodingConfig()])
    assert best.metrics["exact_match"].value > greedy.metrics["exact_match"].value
    # common random numbers: every item greedy solves, the better config solves too
    assert all(b >= g for b, g in zip(best.per_item(), greedy.per_item(), strict=True))
