"""After the search: the winner on the held-out test split against the defaults, and the output files.

The winner (or the first Pareto-optimal configs) is compared with greedy decoding and, when the model ships
one, its own ``generation_config``, on the test split that the search never saw, with the paired test of
:func:`decodetune.eval.compare` (Holm-adjusted over the tuned configs when several are checked). The
table, the dev-to-test gap, the minimum detectable effect of the split (:func:`power_note`) and a few
example generations are stored in the study's user attributes (``final``), so that ``decodetune report``
needs nothing but the storage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from decodetune.config import DecodingConfig
from decodetune.io import write_json

if TYPE_CHECKING:
    from decodetune.tuning.core import TuneResult
    from decodetune.tuning.objectives import Objective
    from decodetune.tuning.runner import Splits

MAX_PARETO_CHECKED = 4
N_EXAMPLES = 6
_CLIP = 400
#: significance level and power the minimum detectable effect is stated at
ALPHA, POWER = 0.05, 0.8


def model_generation_config(loaded: Any) -> DecodingConfig | None:
    """The model's own generation defaults as the backend reports them (None if it has none)."""
    own = getattr(loaded, "default_config", None)
    if own is not None:
        return own()
    from decodetune.backends.torch_backend import generation_config_to_decoding

    return generation_config_to_decoding(getattr(getattr(loaded, "model", None), "generation_config", None))


def final_check(loaded: Any, task: Any, study: Any, splits: Splits, objectives: list[Objective],
                winners: list[Any], *, repeats: int, seed: int, cache: Any, progress: bool = False,
                compare: Any = None) -> dict[str, Any]:
    """Compare the winner(s) with the defaults on the test split; store and return the table."""
    if compare is None:
        from decodetune.eval import compare as compare  # noqa: PLW0127

    defaults: list[tuple[str, DecodingConfig]] = [("greedy (default)", DecodingConfig(strategy="greedy"))]
    own = model_generation_config(loaded)
    if own is not None:
        defaults.append(("model generation_config", own))
    tuned = [(f"tuned (trial {t.number})", DecodingConfig.from_dict(t.user_attrs["config"]))
             for t in winners[:MAX_PARETO_CHECKED]]
    metrics = [o.metric for o in objectives]
    common = dict(split=splits.test, item_indices=list(splits.test_indices), repeats=repeats, seed=seed,
                  metrics=metrics, cache=cache)
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for ref_name, ref_cfg in defaults:
        cmp = compare(loaded, task, [ref_cfg] + [c for _, c in tuned], **common)
        res_list = _results_of(cmp)
        if ref_name not in results:
            results[ref_name] = res_list[0]
            rows.append(_row(ref_name, ref_cfg, res_list[0], objectives, None, None))
        for (name, cfg), res, diffs in zip(tuned, res_list[1:], _diffs_of(cmp, metrics, len(tuned)),
                                           strict=True):
            results.setdefault(name, res)
            rows.append(_row(name, cfg, res, objectives, ref_name, diffs))
    gap = {}
    for t, (name, _) in zip(winners[:MAX_PARETO_CHECKED], tuned, strict=False):
        gap[name] = {o.metric: _sub(t.values[i], results[name].metrics[o.metric].value)
                     for i, o in enumerate(objectives)}
    examples = _examples(results, [n for n, _ in defaults][:1] + [n for n, _ in tuned][:1],
                         objectives[0].metric)
    final = {"split": splits.test, "n_items": len(splits.test_indices), "held_out": splits.held_out,
             "objectives": [str(o) for o in objectives], "rows": rows, "dev_to_test_gap": gap,
             "examples": examples,
             "power": power_note(results[defaults[0][0]], results[tuned[0][0]], objectives[0].metric,
                                 _test_items_available(task)) if tuned else None}
    study.set_user_attr("final", final)
    return final


def power_note(ref: Any, tuned: Any, metric: str, n_available: int | None, alpha: float = ALPHA,
               power: float = POWER) -> dict[str, Any] | None:
    """Minimum detectable effect of the test split for ``metric``, and the items the observed effect needs.

    Paired design, two-sided ``alpha``, ``power``, normal approximation, from the observed standard deviation
    of the per-item differences (tuned minus reference): ``MDE = (z_{1-alpha/2} + z_power) * sd / sqrt(n)``.
    The reported p-value is Wilcoxon's; the MDE is the t/normal test's, which is close enough to size a
    split. ``suggested_limit`` is the ``--limit`` (items per split) at which the observed difference would be
    detected with that power; None when it already is, or when it is zero. None for a corpus metric.
    """
    from decodetune.metrics.stats import items_to_detect, min_detectable_effect

    try:
        a = np.asarray(ref.per_item(metric), dtype=float)
        b = np.asarray(tuned.per_item(metric), dtype=float)
    except (KeyError, TypeError, ValueError):
        return None
    d = (b - a)[~(np.isnan(a) | np.isnan(b))]
    n = int(d.size)
    if n < 2:
        return None
    sd, observed = float(np.std(d, ddof=1)), float(np.mean(d))
    mde = min_detectable_effect(sd, n, alpha, power)
    need = items_to_detect(observed, sd, alpha, power)
    if sd == 0:
        sentence = (f"with {n} test items every per-item difference is {observed:+.3g}: there is no spread to "
                    "size a minimum detectable effect from")
        need = None
    else:
        sentence = f"with {n} test items a difference below {mde:.2g} cannot be told from noise"
        if need is None:
            sentence += "; the observed difference is 0"
        elif need <= n:
            sentence += f"; the observed {observed:+.2g} is above it"
            need = None
        else:
            sentence += f"; to detect the observed {observed:+.2g} use --limit {need}"
            if n_available is not None and need > n_available:
                sentence += f" (the test split has only {n_available} items)"
    return {"metric": metric, "n_items": n, "sd_diff": sd, "observed_diff": observed, "mde": mde,
            "alpha": alpha, "power": power, "suggested_limit": need, "sentence": sentence}


def _test_items_available(task: Any) -> int | None:
    """Test items with no ``--limit`` (a one-split task keeps its held-out half)."""
    from decodetune.tuning.runner import make_splits

    try:
        return len(make_splits(task, None, 0).test_indices)
    except Exception:  # a task that can't list its items: the sentence just leaves the cap out
        return None


def _results_of(cmp: Any) -> list[Any]:
    for name in ("results", "evals", "eval_results"):
        if hasattr(cmp, name):
            return list(getattr(cmp, name))
    raise TypeError("compare() returned an object without .results")


def _diffs_of(cmp: Any, metrics: list[str], n: int) -> list[dict[str, Any]]:
    """Per tuned config: {metric: {diff, ci_low, ci_high, p_value, p_holm, test}} against configs[0]."""
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    table = getattr(cmp, "differences", None) or getattr(cmp, "diffs", None) or []
    for entry in table:
        d = entry if isinstance(entry, dict) else getattr(entry, "__dict__", {})
        idx = int(d.get("index", d.get("config_index", 0))) - 1
        metric = d.get("metric")
        if 0 <= idx < n and metric in metrics:
            keys = ("diff", "ci_low", "ci_high", "p_value", "p_holm", "test")
            out[idx][metric] = {k: _json(d.get(k)) for k in keys if k in d}
    return out


def _row(name: str, cfg: DecodingConfig, res: Any, objectives: list[Objective], vs: str | None,
         diffs: dict[str, Any] | None) -> dict[str, Any]:
    metrics = {}
    for o in objectives:
        m = res.metrics[o.metric]
        metrics[o.metric] = {"value": _json(m.value), "ci_low": _json(m.ci_low), "ci_high": _json(m.ci_high)}
    return {"name": name, "config": cfg.to_dict(only_set=True), "metrics": metrics, "vs": vs,
            "paired": diffs or {}}


def _examples(results: dict[str, Any], names: list[str], metric: str | None = None) -> list[dict[str, Any]]:
    """Example generations of the default (``names[0]``) and the tuned config (``names[1]``).

    Chosen where the two *disagree*: test items whose extracted answers differ come first; those where
    exactly one of the two is right before those where both are wrong (the tuned config's wins, with one
    slot kept for a loss when there is one, so the page never shows only the good side); items where they
    agree only fill the remaining places. Each output carries its extracted answer, its ``metric`` score and
    ``correct``: True/False when the metric is 0/1 over the rows shown (exact or numeric match), else None.
    """
    by_item: dict[str, dict[str, Any]] = {}
    for name in names:
        res = results.get(name)
        if res is None:
            continue
        for row in res.rows:
            if row.get("repeat", 0) != 0:
                continue
            ex = by_item.setdefault(str(row["item_id"]), {"item_id": str(row["item_id"]),
                                                         "prompt": _clip(row.get("prompt")),
                                                         "references": [_clip(r) for r in
                                                                        (row.get("references") or [])[:2]],
                                                         "outputs": {}, "extracted": {}, "scores": {}})
            ex["outputs"][name] = _clip(row.get("prediction"))
            answer = row.get("extracted", row.get("prediction"))
            ex["extracted"][name] = None if answer is None else _clip(answer)
            score = (row.get("scores") or {}).get(metric) if metric else None
            ex["scores"][name] = _json(float(score)) if score is not None else None
    items = list(by_item.values())
    scores = [v for ex in items for v in ex["scores"].values() if v is not None]
    binary = bool(scores) and all(v in (0.0, 1.0) for v in scores)
    for ex in items:
        ex["correct"] = {n: (bool(v == 1.0) if binary and v is not None else None) for n, v in ex["scores"].items()}
        answers = [_norm_answer(ex["extracted"].get(n)) for n in names if n in ex["extracted"]]
        ex["disagree"] = len(answers) == len(names) and len(set(answers)) > 1
    if len(names) < 2:
        return items[:N_EXAMPLES]
    ref, tuned = names[0], names[1]

    def outcome(ex: dict[str, Any]) -> str:
        c = ex["correct"]
        if c.get(ref) is None or c.get(tuned) is None:
            return "differ"
        return {(False, True): "win", (True, False): "loss"}.get((c[ref], c[tuned]), "differ")

    wins = [ex for ex in items if ex["disagree"] and outcome(ex) == "win"]
    losses = [ex for ex in items if ex["disagree"] and outcome(ex) == "loss"]
    other = [ex for ex in items if ex["disagree"] and outcome(ex) == "differ"]
    agree = [ex for ex in items if not ex["disagree"]]
    picked = wins[: N_EXAMPLES - 1 if losses else N_EXAMPLES] + losses
    picked = (picked + other + agree)[:N_EXAMPLES]
    order = {id(ex): i for i, ex in enumerate(items)}
    # disagreements first, then the page's order of the split
    return sorted(picked, key=lambda ex: (not ex["disagree"], order[id(ex)]))


def _norm_answer(v: Any) -> str:
    return " ".join(str(v).split()).lower() if v is not None else ""


def _clip(v: Any) -> str:
    if isinstance(v, list):  # chat messages
        v = "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in v if isinstance(m, dict))
    s = "" if v is None else str(v)
    return s if len(s) <= _CLIP else s[: _CLIP - 1] + "…"


def _sub(a: Any, b: Any) -> float | None:
    if a is None or b is None:
        return None
    d = float(a) - float(b)
    return d if math.isfinite(d) else None


def _json(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def essential_fields(config: DecodingConfig) -> dict[str, Any]:
    """The fields that decide what ``config`` generates: set away from their defaults and read by its strategy.

    ``best_config.json`` of a beam winner has no ``temperature`` or ``top_k`` in it: fields the strategy
    ignores change nothing, and a default is what :meth:`DecodingConfig.load` fills in anyway.
    """
    ignored = set(config.ignored_fields())
    return {k: v for k, v in config.to_dict(only_set=True).items() if k not in ignored}


def write_outputs(result: TuneResult) -> dict[str, str]:
    """best_config.json, exports (with what each target dropped) and summary.json in the out folder."""
    out = Path(result.out_dir)
    files: dict[str, str] = {}
    if result.best_config is None:
        return files
    fields = essential_fields(result.best_config)
    # the file, the exports and the result say the same config: the one a user loads back from the file
    best = result.best_config = DecodingConfig.from_dict(fields, source="best_config.json")
    path = out / "best_config.json"
    write_json(path, fields)
    files["best_config"] = str(path)
    from decodetune.tuning.exports import write_exports

    backend = result.study.user_attrs.get("backend", "torch")
    exports = write_exports(best, out, backend)
    result.study.set_user_attr("exports", {"backend": backend, "targets": exports, "out": str(out),
                                           "best_config": str(path)})
    for target, entry in exports.items():
        if entry["file"]:
            files[target if entry["exact"] else f"{target} (approximate)"] = entry["file"]
    files["changes"] = str(out / "exports" / "changes.json")
    trial = result.best_trial
    summary = {
        "study_name": result.study_name, "storage": result.storage_url,
        "objectives": [str(o) for o in result.objectives],
        "best_trial": trial.number if trial is not None else None,
        "best_dev_values": list(trial.values) if trial is not None else None,
        "best_config": best.to_dict(only_set=True),
        "pareto_trials": [t.number for t in result.best_trials] if len(result.objectives) > 1 else None,
        "test": result.test, "run": result.stats.__dict__, "backend": backend,
        "exports": {t: {"exact": e["exact"], "changes": e["changes"]} for t, e in exports.items()},
        "totals": result.study.user_attrs.get("totals", {}),
    }
    write_json(out / "summary.json", json.loads(json.dumps(summary, default=str)))
    files["summary"] = str(out / "summary.json")
    return files

