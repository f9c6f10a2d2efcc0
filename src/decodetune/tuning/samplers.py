"""Budget-matched sampler comparison: each truncation family tuned with the same trials over a space of the
same size, then the families' winners compared on the held-out test split with paired tests and Holm.

Comparing samplers by their best score after unequal tuning misleads (the min-p dispute: "min-p does not
outperform other samplers when equalizing the volume of hyperparameter space", arXiv 2506.13681). So every
family here searches the same temperatures crossed with the same number of values of its own knob (5 x 5
= 25 points each), with the same number of trials, the same search, seed, items and row seeds. The winners
then meet twice on the test split, which no search saw: each against greedy, and the best of them (on
test) against each other one; both families of p-values are Holm-corrected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decodetune.errors import UserError
from decodetune.tuning.runner import finite_or_none

#: the temperatures every family searches (shared, so only the truncation knob differs)
TEMPERATURES = [0.3, 0.6, 1.0, 1.5, 2.0]
#: family -> (DecodingConfig field, its values): the same count for every family, spread over the range
#: its authors recommend
FAMILIES: dict[str, tuple[str, list[float]]] = {
    "top_p": ("top_p", [0.5, 0.7, 0.8, 0.9, 0.95]),
    "min_p": ("min_p", [0.02, 0.05, 0.1, 0.2, 0.3]),
    "top_k": ("top_k", [5, 10, 20, 40, 80]),
    "typical_p": ("typical_p", [0.2, 0.5, 0.8, 0.9, 0.95]),
    "epsilon": ("epsilon_cutoff", [0.0001, 0.0003, 0.001, 0.003, 0.01]),
    "eta": ("eta_cutoff", [0.0001, 0.0003, 0.001, 0.003, 0.01]),
}


@dataclass
class FamilyResult:
    """One family: its study, the dev winner and how it did on test."""

    family: str
    study_name: str
    n_trials: int
    best_config: dict[str, Any] | None
    dev_value: float | None
    test_value: float | None = None
    vs_greedy: dict[str, Any] = field(default_factory=dict)  # diff, ci, p_value, p_holm
    vs_best: dict[str, Any] = field(default_factory=dict)  # against the best family on test


def parse_families(text: str | list[str]) -> list[str]:
    """``top_p,min_p,top_k`` -> names, checked against :data:`FAMILIES` (at least two, no repeats)."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise UserError(f"--families: unknown family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise UserError("--families: give at least two different families, e.g. top_p,min_p,top_k")
    return names


def family_space(family: str) -> dict[str, Any]:
    """The family's search space: sampling, the shared temperatures, its knob's values."""
    knob, values = FAMILIES[family]
    return {"strategy": "sample", "temperature": list(TEMPERATURES), knob: list(values)}


def compare_samplers(backend: Any, task: Any, families: list[str], budget: int, *, out_dir: str | Path,
                     search: str = "random", seed: int = 0, limit: int | None = None, repeats: int = 1,
                     tune_fn: Any = None, compare_fn: Any = None) -> dict[str, Any]:
    """Tune each family with ``budget`` trials, then compare the winners on test; a JSON-able summary.

    ``backend`` is an open :class:`~decodetune.backends.Backend`; every family's study shares one storage
    and one generation cache in ``out_dir`` (so greedy and repeated configs are generated once).
    ``tune_fn`` / ``compare_fn`` replace :func:`decodetune.tuning.tune` / :func:`decodetune.eval.compare`.
    """
    if budget < 1:
        raise UserError(f"--budget: must be >= 1, got {budget}")
    if tune_fn is None:
        from decodetune.tuning import tune as tune_fn
    if compare_fn is None:
        from decodetune.eval import compare as compare_fn
    from decodetune.tuning.runner import make_splits

    out = Path(out_dir)
    storage = f"sqlite:///{(out / 'samplers.db').resolve()}"
    results: list[FamilyResult] = []
    task_obj = task if hasattr(task, "items") else _load(task)  # a bad task fails before any tuning
    task_name = task_obj.name
    cache = str(out / "samplers.cache.sqlite")  # one cache: greedy and shared configs are generated once
    for family in families:
        name = f"{task_name}-{family}-{search}-budget{budget}-seed{seed}"
        res = tune_fn(backend, task_obj, search=search, n_trials=budget, space=family_space(family),
                      storage=storage, study_name=name, seed=seed, limit=limit, repeats=repeats,
                      out_dir=out / family, final_test=False, backend=backend, cache=cache)
        best = res.best_trial
        results.append(FamilyResult(family, name, budget,
                                    res.best_config.to_dict(only_set=True) if res.best_config is not None else None,
                                    float(best.values[0]) if best is not None else None))
    scored = [r for r in results if r.best_config is not None]
    splits = make_splits(task_obj, limit, seed)
    common = dict(split=splits.test, item_indices=list(splits.test_indices), repeats=repeats, seed=seed,
                  cache=cache)
    summary: dict[str, Any] = {"task": task_name, "budget": budget, "search": search, "seed": seed,
                               "space_size": len(TEMPERATURES) * len(FAMILIES[families[0]][1]),
                               "test_split": splits.test, "n_test_items": len(splits.test_indices),
                               "families": [], "metric": None}
    if scored:
        metric = str(task_obj.metrics[0])  # the primary metric
        cmp = compare_fn(backend, task_obj, [{"strategy": "greedy"}] + [r.best_config for r in scored],
                         metrics=[metric], **common)
        summary["metric"] = metric
        summary["greedy_test"] = finite_or_none(cmp.results[0].metrics[metric].value)
        for r, res in zip(scored, cmp.results[1:], strict=True):
            r.test_value = finite_or_none(res.metrics[metric].value)
        for d in cmp.differences:
            if d.metric == metric:
                scored[d.config_index - 1].vs_greedy = _paired(d)
        if len(scored) > 1:
            sign = -1.0 if cmp.results[0].metrics[metric].direction == "min" else 1.0
            _against_the_best(backend, task_obj, scored, metric, sign, common, compare_fn, summary)
    summary["families"] = [r.__dict__ for r in results]
    return summary


def _against_the_best(backend: Any, task: Any, scored: list[FamilyResult], metric: str, sign: float,
                      common: dict[str, Any], compare_fn: Any, summary: dict[str, Any]) -> None:
    """The best family on test as the baseline, every other winner paired against it (Holm over them)."""
    best = max(scored, key=lambda r: sign * r.test_value if r.test_value is not None else float("-inf"))
    others = [r for r in scored if r is not best]
    cmp = compare_fn(backend, task, [best.best_config] + [r.best_config for r in others], metrics=[metric],
                     **common)
    for d in cmp.differences:
        if d.metric == metric:
            others[d.config_index - 1].vs_best = _paired(d)
    summary["best_family"] = best.family


def _paired(d: Any) -> dict[str, Any]:
    keys = ("diff", "ci_low", "ci_high", "p_value", "p_holm")
    out: dict[str, Any] = {k: finite_or_none(getattr(d, k, None)) for k in keys}
    out["test"] = getattr(d, "test", None)
    return out


def _load(task: Any) -> Any:
    from decodetune.tasks import load_task

    return load_task(task)
