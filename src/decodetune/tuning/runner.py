"""The tuning loop: ask a batch of trials, evaluate their configs together, prune, tell.

Cost control, in order of how much it saves:

* **Config batching.** ``k`` trials are asked at once (random and grid always; TPE/GP/NSGA-II with
  constant-liar style handling of running trials) and all their rows, over items and repeats, go to
  :func:`decodetune.eval.evaluate_many`, which runs them in one ``generate()`` call.
* **Generation cache** next to the study: a repeated or resumed (config, prompt, seed) costs nothing.
* **Pruning** (one per-item objective): items are evaluated in chunks, in a shuffled order; after each
  chunk every trial reports its per-item scores (``step`` = the item's index in the split) and
  :class:`optuna.pruners.WilcoxonPruner` stops trials that are significantly worse than the best one.

Pruned trials are stored as ``TrialState.PRUNED``, with their running mean in
``user_attrs["metrics"]`` and ``user_attrs["pruned"] = True``. Why not COMPLETE with the running mean, as
Optuna suggests for this pruner: a mean over the first chunks is not comparable with full-dev means (other
items), and as COMPLETE it is an ordinary point to everything that reads the storage without knowing our
attribute: optimisation-history and slice plots, importances, ``study.best_trial`` (which the pruner
itself pairs against) and optuna-dashboard. TPE still learns from PRUNED trials (it puts them in its
"bad" group after the complete ones); GP and CMA-ES ignore them, which only costs them the knowledge that
a region is bad. Optuna stores the last intermediate value (one item's score) as a PRUNED trial's value;
decodetune never reads it.

Fully evaluated trials also store their per-item scores of the first objective (``user_attrs
["per_item"]``, aligned to the dev item indices in split order) for the equivalence tests of
:mod:`decodetune.tuning.importance`.

Everything a report needs is stored in the study (trial and study user attributes), so ``decodetune
report`` works from the storage alone.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from decodetune.config import DecodingConfig
from decodetune.errors import UserError
from decodetune.tuning.objectives import Objective

log = logging.getLogger("decodetune.tuning")

#: trials asked together, per search kind (cap; never more than the trials left)
DEFAULT_BATCH = {"grid": 8, "random": 8, "tpe": 4, "gp": 4, "cmaes": 4, "nsga2": 8}


@dataclass
class Splits:
    """Which split and item indices the search uses (dev) and which the final check uses (test)."""

    dev: str
    dev_indices: list[int]
    test: str
    test_indices: list[int]
    held_out: bool = True  # False when the task has one split and we cut it in two ourselves


@dataclass
class RunStats:
    """Counters of one ``tune`` invocation."""

    trials_told: int = 0
    trials_failed: int = 0
    trials_pruned: int = 0
    tokens_generated: int = 0
    tokens_evaluated: int = 0
    tokens_saved_by_pruning: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    generate_calls: int = 0
    wall_s: float = 0.0
    stop_reason: str = ""
    failures: list[str] = field(default_factory=list)


def make_splits(task: Any, limit: int | None, seed: int) -> Splits:
    """Dev/test item indices; a one-split task is cut 50/50 with a fixed seed."""
    splits = getattr(task, "splits", {}) or {}
    if "dev" in splits and "test" in splits:
        dev = list(range(len(task.items("dev"))))
        test = list(range(len(task.items("test"))))
        if limit:
            dev, test = dev[:limit], test[:limit]
        return Splits("dev", dev, "test", test)
    name = "all" if "all" in splits or not splits else next(iter(splits))
    n = len(task.items(name))
    order = list(range(n))
    random.Random(1234).shuffle(order)
    half = n // 2
    dev, test = sorted(order[:half]), sorted(order[half:])
    if limit:
        dev, test = dev[:limit], test[:limit]
    if not dev or not test:
        raise UserError(f"task {task.name}: needs at least 2 items to keep a held-out test part")
    return Splits(name, dev, name, test, held_out=False)


def chunk_plan(n_items: int, pruning: bool) -> list[int]:
    """Chunk sizes over the shuffled items: one chunk without pruning, about five with it."""
    if not pruning or n_items <= 8:
        return [n_items]
    size = max(8, math.ceil(n_items / 5))
    sizes = []
    left = n_items
    while left > 0:
        sizes.append(min(size, left))
        left -= size
    return sizes


def summarize_result(result: Any, objectives: list[Objective]) -> dict[str, Any]:
    """What a trial stores about one EvalResult: per-objective mean and CI, tokens, cache use."""
    metrics = {}
    for obj in objectives:
        m = result.metrics[obj.metric]
        metrics[obj.metric] = {"value": finite_or_none(m.value),
                                "ci_low": finite_or_none(m.ci_low), "ci_high": finite_or_none(m.ci_high)}
    rows = getattr(result, "rows", []) or []
    return {
        "metrics": metrics,
        "config": result.config.to_dict(only_set=True) if hasattr(result.config, "to_dict") else result.config,
        "n_items": len(result.item_ids),
        "n_rows": len(rows),
        "tokens_evaluated": int(sum(int(r.get("num_tokens", 0)) for r in rows)),
        "tokens_generated": int(getattr(result, "num_tokens_generated", getattr(result, "num_tokens", 0))),
        "cache_hits": int(getattr(result, "cache_hits", 0)),
        "cache_misses": int(getattr(result, "cache_misses", 0)),
    }


def compact_scores(values: Any) -> list[float | int | None]:
    """Per-item scores as stored in a trial: 0/1 as ints, others to 6 significant digits, NaN as None.

    Short because it is JSON in every trial row of the storage (a 0/1 metric costs 2 bytes an item).
    """
    out: list[float | int | None] = []
    for v in values:
        v = float(v)
        if not math.isfinite(v):
            out.append(None)
        elif v.is_integer():
            out.append(int(v))
        else:
            out.append(float(f"{v:.6g}"))
    return out


def finite_or_none(v: Any) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


class TrialBatchEvaluator:
    """Evaluates a batch of asked trials (configs) on the dev items, with chunked pruning.

    ``evaluate_many`` is :func:`decodetune.eval.evaluate_many` (injectable for tests).
    """

    def __init__(self, model: Any, task: Any, splits: Splits, objectives: list[Objective], *, repeats: int,
                 seed: int, cache: Any, pruning: bool, evaluate_many: Callable[..., list[Any]],
                 stats: RunStats):
        self.model, self.task, self.splits, self.objectives = model, task, splits, objectives
        self.repeats, self.seed, self.cache = repeats, seed, cache
        self.pruning = pruning
        self.evaluate_many = evaluate_many
        self.stats = stats

    def _call(self, configs: list[DecodingConfig], indices: list[int]) -> list[Any]:
        self.stats.generate_calls += 1
        results = self.evaluate_many(
            self.model, self.task, configs, split=self.splits.dev, repeats=self.repeats, seed=self.seed,
            item_indices=indices, metrics=[o.metric for o in self.objectives], cache=self.cache)
        for r in results:
            s = summarize_result(r, self.objectives)
            self.stats.tokens_generated += s["tokens_generated"]
            self.stats.cache_hits += s["cache_hits"]
            self.stats.cache_misses += s["cache_misses"]
        return results

    def run(self, trials: list[Any], configs: list[DecodingConfig], order_seed: int,
            on_done: Callable[[Any, dict[str, Any] | None, str | None], None]) -> None:
        """Evaluate, then call ``on_done(trial, attrs_or_None, error_or_None)`` once per trial."""
        items = list(self.splits.dev_indices)
        random.Random(order_seed).shuffle(items)
        sizes = chunk_plan(len(items), self.pruning)
        active = list(range(len(trials)))
        scored: dict[int, list[float]] = {i: [] for i in active}
        reported: dict[int, set[int]] = {i: set() for i in active}
        spent: dict[int, int] = {i: 0 for i in active}  # tokens of the rows seen (cached or not)
        generated: dict[int, int] = {i: 0 for i in active}  # tokens actually generated for the trial
        done_items = 0
        obj = self.objectives[0]
        if len(sizes) > 1:
            for size in sizes[:-1]:
                chunk = items[done_items:done_items + size]
                done_items += size
                results = self._guarded([configs[i] for i in active], chunk, [trials[i] for i in active],
                                        on_done)
                still = []
                for i, res in zip(active, results, strict=True):
                    if res is None:
                        continue  # failed, already told
                    per_item = res.per_item(obj.metric)
                    for idx, score in zip(chunk, per_item, strict=True):
                        trials[i].report(float(score), step=int(idx))
                        reported[i].add(int(idx))
                    scored[i].extend(float(s) for s in per_item)
                    spent[i] += sum(int(r.get("num_tokens", 0)) for r in res.rows)
                    generated[i] += int(getattr(res, "num_tokens_generated", 0))
                    if trials[i].should_prune():
                        n_eval = len(scored[i])
                        full = spent[i] * len(items) / max(1, n_eval)
                        saved = full - spent[i]
                        self.stats.trials_pruned += 1
                        self.stats.tokens_saved_by_pruning += saved
                        self.stats.tokens_evaluated += spent[i]
                        mean = sum(scored[i]) / max(1, n_eval)
                        attrs = {"pruned": True, "items_evaluated": n_eval, "tokens_evaluated": spent[i],
                                 "tokens_generated": generated[i],
                                 "tokens_saved_est": round(saved), "config": res.config.to_dict(only_set=True),
                                 "metrics": {obj.metric: {"value": mean, "ci_low": None, "ci_high": None}},
                                 "n_items": n_eval}
                        on_done(trials[i], attrs, None)
                    else:
                        still.append(i)
                active = still
                if not active:
                    return
        # the full evaluation: earlier chunks come back from the cache, so only the rest costs tokens
        full_indices = list(self.splits.dev_indices)
        results = self._guarded([configs[i] for i in active], full_indices, [trials[i] for i in active],
                                on_done)
        for i, res in zip(active, results, strict=True):
            if res is None:
                continue
            attrs = summarize_result(res, self.objectives)
            attrs["pruned"] = False
            attrs["per_item"] = compact_scores(res.per_item(obj.metric))
            attrs["tokens_generated"] += generated[i]  # chunks generated before the full call
            self.stats.tokens_evaluated += attrs["tokens_evaluated"]
            if self.pruning:
                # the pruner pairs later trials with the best one item by item: it needs every item
                for idx, score in zip(full_indices, res.per_item(obj.metric), strict=True):
                    if int(idx) not in reported[i]:
                        trials[i].report(float(score), step=int(idx))
            on_done(trials[i], attrs, None)

    def _guarded(self, configs: list[DecodingConfig], indices: list[int], trials: list[Any],
                 on_done: Callable[..., None]) -> list[Any]:
        """One batched call; if it raises, retry trial by trial so only the culprit fails."""
        try:
            return self._call(configs, indices)
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as e:
            log.warning("a batch of %d configs failed (%s: %s); retrying them one by one", len(configs),
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            if len(configs) == 1:
                return self._one(configs[0], indices, trials[0], on_done)
        out = []
        for cfg, t in zip(configs, trials, strict=True):
            out.extend(self._one(cfg, indices, t, on_done))
        return out

    def _one(self, cfg: DecodingConfig, indices: list[int], trial: Any, on_done: Callable[..., None]) -> list:
        try:
            return self._call([cfg], indices)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # the trial fails, the study goes on
            on_done(trial, None, f"{type(e).__name__}: {e}".splitlines()[0])
            return [None]


def trial_values(attrs: dict[str, Any], objectives: list[Objective]) -> list[float] | None:
    """The values to tell Optuna, or None when an objective is missing / not finite."""
    out = []
    for obj in objectives:
        v = attrs.get("metrics", {}).get(obj.metric, {}).get("value")
        if v is None or not math.isfinite(float(v)):
            return None
        out.append(float(v))
    return out
