"""Which knobs matter: Optuna's PED-ANOVA importance plus a paired equivalence test per searched parameter.

Importance (:func:`optuna.importance.get_param_importances` with
:class:`~optuna.importance.PedAnovaImportanceEvaluator`, which handles conditional parameters such as
``num_beams``) says how much a parameter separates the best trials from the rest; it cannot say "this knob
does nothing". For that, each parameter gets the pair of fully evaluated trials that differ most in it and
least in everything else, and their per-item dev scores (``user_attrs["per_item"]``, same items and seeds)
go through two tests on the per-item differences:

* TOST (two one-sided paired t-tests, :func:`scipy.stats.ttest_rel`) against ``±margin``: both reject
  -> "no effect within ±margin";
* otherwise a two-sided paired t-test: rejects -> "matters";
* neither -> "not enough data" (as when no such pair or too few items exist).

Both families of p-values are Holm-adjusted over the parameters tested. ``margin`` is a fraction (default
0.02) of the metric's range, taken as the spread of the per-item scores the study saw (1 for a 0/1 metric).
One pair measures one change of the parameter, at one setting of the rest: "no effect" means none at the
values compared, not everywhere.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

import numpy as np

MATTERS = "matters"
NO_EFFECT = "no effect within ±margin"
NOT_ENOUGH = "not enough data"
#: fraction of the metric's range inside which a difference counts as no effect
MARGIN = 0.02
ALPHA = 0.05
MIN_ITEMS = 5
#: a pair "differs mainly" in a parameter when every other shared parameter moved at most this much
#: (a fraction of its range) and less than half as much as the parameter itself
MAX_OTHER_DISTANCE = 0.2


@dataclass
class KnobVerdict:
    """One searched parameter: its importance, the pair it was tested on, and the verdict."""

    param: str
    importance: float | None
    verdict: str
    diff: float | None = None  # mean per-item score of trial_b minus trial_a
    p_diff: float | None = None  # Holm-adjusted two-sided paired t-test
    p_tost: float | None = None  # Holm-adjusted TOST (max of the two one-sided p-values)
    margin: float | None = None  # absolute, in metric units
    trial_a: int | None = None
    trial_b: int | None = None
    value_a: Any = None
    value_b: Any = None
    n_items: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)


def paired_verdict(a: np.ndarray, b: np.ndarray, margin: float,
                   alpha: float = ALPHA) -> tuple[str, float, float, float, int]:
    """(verdict, mean difference b - a, p two-sided, p TOST, n) for per-item scores of two configs.

    Unadjusted p-values; the verdict uses them at ``alpha``. Items with a NaN score on either side are left
    out. Differences that are all equal have no variance: they are inside or outside the margin for sure.
    """
    from scipy.stats import ttest_rel

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    n = int(a.size)
    if n < MIN_ITEMS:
        return NOT_ENOUGH, (float(np.mean(b - a)) if n else math.nan), math.nan, math.nan, n
    d = b - a
    diff = float(d.mean())
    if np.all(d == d[0]):  # the t statistic is undefined; the answer is not
        inside = abs(diff) < margin
        return (NO_EFFECT if inside else MATTERS), diff, (1.0 if diff == 0 else 0.0), (0.0 if inside else 1.0), n
    p_lower = float(ttest_rel(b + margin, a, alternative="greater").pvalue)  # H0: mean diff <= -margin
    p_upper = float(ttest_rel(b - margin, a, alternative="less").pvalue)  # H0: mean diff >= +margin
    p_tost = max(p_lower, p_upper)
    p_diff = float(ttest_rel(b, a).pvalue)
    return _decide(p_diff, p_tost, alpha), diff, p_diff, p_tost, n


def _decide(p_diff: float, p_tost: float, alpha: float) -> str:
    # equivalence first: a real but tiny difference is, for choosing a config, no effect
    if p_tost < alpha:
        return NO_EFFECT
    if p_diff < alpha:
        return MATTERS
    return NOT_ENOUGH


def knob_verdicts(study: Any, margin: float = MARGIN, alpha: float = ALPHA) -> list[KnobVerdict]:
    """Importance and verdict for every parameter the study searched, most important first."""
    from decodetune.metrics.stats import holm

    trials = _scored_trials(study)
    params = _searched_params(study)
    if not params:
        return []
    importances = param_importances(study)
    scale = _metric_range(trials)
    absolute = margin * scale
    out: list[KnobVerdict] = []
    tested: list[tuple[KnobVerdict, float, float]] = []
    for name in params:
        v = KnobVerdict(name, importances.get(name), NOT_ENOUGH, margin=absolute)
        pair = best_pair(trials, name)
        if pair is not None:
            ta, tb = pair
            verdict, diff, p_diff, p_tost, n = paired_verdict(_scores(ta), _scores(tb), absolute, alpha)
            v.verdict, v.diff, v.n_items = verdict, _finite(diff), n
            v.trial_a, v.trial_b, v.value_a, v.value_b = ta.number, tb.number, ta.params[name], tb.params[name]
            if math.isfinite(p_diff):  # too few items: nothing to correct
                tested.append((v, p_diff, p_tost))
        out.append(v)
    p_diffs = holm([p for _, p, _ in tested])
    p_tosts = holm([p for _, _, p in tested])
    for (v, _, _), pd, pt in zip(tested, p_diffs, p_tosts, strict=True):
        v.p_diff, v.p_tost = _finite(pd), _finite(pt)
        v.verdict = _decide(pd if math.isfinite(pd) else 1.0, pt if math.isfinite(pt) else 1.0, alpha)
    return sorted(out, key=lambda v: -(v.importance if v.importance is not None else -1.0))


def param_importances(study: Any) -> dict[str, float]:
    """PED-ANOVA importances of the first objective ({} when Optuna can't compute them: too few trials)."""
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    target = None
    if len(study.directions) > 1:  # PED-ANOVA takes lower as better for an explicit target
        target = _first_objective(-1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "too few trials", experimental-feature warnings
            raw = optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(),
                                                          target=target)
    except Exception:  # e.g. fewer than two complete trials, or a parameter with one value
        return {}
    return {k: float(v) for k, v in raw.items() if math.isfinite(float(v))}


def best_pair(trials: list[Any], name: str) -> tuple[Any, Any] | None:
    """The two trials that differ most in ``name`` while every other shared parameter barely moves."""
    best: tuple[float, float, Any, Any] | None = None
    for a, b in combinations(trials, 2):
        if name not in a.params or name not in b.params:
            continue
        moved = param_distance(a.distributions[name], a.params[name], b.params[name])
        if moved <= 0:
            continue
        others = [param_distance(a.distributions[k], a.params[k], b.params[k])
                  for k in set(a.params) & set(b.params) if k != name and k in a.distributions]
        rest = max(others, default=0.0)  # parameters only one side has are children of a choice: ignored
        if rest > MAX_OTHER_DISTANCE or rest > moved / 2:
            continue
        key = (rest, -moved, a, b)
        if best is None or key[:2] < best[:2]:
            best = key
    return None if best is None else (best[2], best[3])


def param_distance(dist: Any, x: Any, y: Any) -> float:
    """How far apart two values of a parameter are, as a fraction of its range (log scale if log)."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution) or not hasattr(dist, "low"):
        return 0.0 if x == y else 1.0
    lo, hi, x, y = float(dist.low), float(dist.high), float(x), float(y)
    if getattr(dist, "log", False) and lo > 0:
        lo, hi, x, y = (math.log(v) for v in (lo, hi, x, y))
    return abs(x - y) / (hi - lo) if hi > lo else 0.0


def _scored_trials(study: Any) -> list[Any]:
    """COMPLETE, fully evaluated trials with per-item scores of the same length."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if not t.user_attrs.get("pruned") and isinstance(t.user_attrs.get("per_item"), list)]
    if not trials:
        return []
    n = max(len(t.user_attrs["per_item"]) for t in trials)
    return [t for t in trials if len(t.user_attrs["per_item"]) == n]


def _searched_params(study: Any) -> list[str]:
    """Parameters that took more than one value over the finished trials, in first-seen order."""
    from optuna.trial import TrialState

    seen: dict[str, set[str]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        for k, v in t.params.items():
            seen.setdefault(k, set()).add(repr(v))
    return [k for k, vals in seen.items() if len(vals) > 1]


def _scores(trial: Any) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in trial.user_attrs["per_item"]])


def _metric_range(trials: list[Any]) -> float:
    """Spread of every per-item score seen (1.0 when there is none: all scores equal or no trials)."""
    values = np.concatenate([_scores(t) for t in trials]) if trials else np.array([])
    values = values[~np.isnan(values)]
    spread = float(values.max() - values.min()) if values.size else 0.0
    return spread if spread > 0 else 1.0


def _finite(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _first_objective(sign: float) -> Any:
    def target(t: Any) -> float:
        return sign * t.values[0]

    return target
