"""Confidence intervals, paired tests, multiple-comparison correction and power over items (and repeats).

Rows are laid out as an (items x repeats) grid of row indices. A bootstrap replicate draws items with
replacement and, when there are several repeats (sampling configs), draws each chosen item's repeats with
replacement too (a two-level bootstrap), then recomputes the metric's aggregate under the resulting row
counts, so corpus-level metrics are recomputed rather than averaged.

A binary per-item metric (every row 0 or 1, one row per item: exact or numeric match of a deterministic
config) gets a Wilson score interval instead (:func:`bootstrap_ci`). Several configs compared against one
baseline get Holm-adjusted p-values (:func:`holm`); :func:`min_detectable_effect` and
:func:`items_to_detect` say how small a paired difference a split of n items can see.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from decodetune.metrics.base import MetricScores


def row_grid(n_items: int, repeats: int) -> np.ndarray:
    """Row index of (item i, repeat r) when rows are stored item-major: ``i * repeats + r``."""
    return np.arange(n_items * repeats).reshape(n_items, repeats)


def bootstrap_weights(grid: np.ndarray, n_boot: int, rng: np.random.Generator,
                      item_draws: np.ndarray | None = None, repeat_draws: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, n_rows) matrix of row counts for a two-level bootstrap over ``grid`` (items x repeats).

    ``item_draws`` (n_boot, n_items) and ``repeat_draws`` (n_boot, n_items, R) may be given to share the
    same resamples between configs (paired bootstrap); repeat draws are taken modulo this grid's repeats.
    """
    n_items, repeats = grid.shape
    if item_draws is None:
        item_draws = rng.integers(0, n_items, size=(n_boot, n_items))
    if repeat_draws is None:
        repeat_draws = rng.integers(0, repeats, size=(n_boot, n_items, repeats))
    reps = repeat_draws[:, :, :repeats] % repeats
    rows = grid[item_draws[:, :, None], reps]  # (B, n_items, repeats)
    w = np.zeros((n_boot, grid.size))
    for b in range(n_boot):
        w[b] = np.bincount(rows[b].ravel(), minlength=grid.size)
    return w


def percentile_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap values (NaNs ignored)."""
    v = values[~np.isnan(values)]
    if len(v) == 0:
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    return float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))


def bootstrap_ci(scores: MetricScores, grid: np.ndarray, n_boot: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """CI of ``scores``' aggregate; ``(nan, nan)`` with ``n_boot=0`` (no CIs asked) or a single row.

    A binary per-item metric with one row per item gets the Wilson score interval, at every n: the
    percentile bootstrap of a proportion collapses to zero width when every item is right (or wrong), e.g.
    [1, 1] for 10 of 10, and under-covers at small n; Wilson keeps close to nominal coverage there and agrees
    with the bootstrap at large n, so one rule avoids a jump at an arbitrary n threshold. With repeats the
    item means are not 0/1 and rows of an item are correlated, so the two-level bootstrap stays.
    """
    if n_boot <= 0 or grid.size < 2:
        return math.nan, math.nan
    if not scores.is_corpus and grid.shape[1] == 1 and is_binary(scores.per_row / scores.scale):
        lo, hi = wilson_ci(int(round(scores.per_row.sum() / scores.scale)), len(scores.per_row), confidence)
        return lo * scores.scale, hi * scores.scale
    rng = np.random.default_rng(seed)
    w = bootstrap_weights(grid, n_boot, rng)
    return percentile_ci(scores.values(w), confidence)


@dataclass
class PairedResult:
    """B minus A on one metric: the difference, its bootstrap CI and a two-sided p-value."""

    metric: str
    value_a: float
    value_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str  # "wilcoxon" | "paired-bootstrap"
    n_items: int


def item_means(per_row: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Per-item mean over repeats (NaN rows ignored; NaN when all of an item's rows are NaN)."""
    vals = per_row[grid]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice" for all-NaN items
        return np.nanmean(vals, axis=1)


def paired_compare(name: str, a: MetricScores, grid_a: np.ndarray, b: MetricScores, grid_b: np.ndarray,
                   n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> PairedResult:
    """Compare two configs scored on the same items (same order) with the same seeds.

    Per-item metrics: Wilcoxon signed-rank test on the per-item differences (mean over repeats), which
    is the paired test of "is B better than A on these items". Corpus metrics: a paired bootstrap (the
    same item and repeat draws for both) gives the p-value as twice the smaller tail of the difference.
    The CI is the paired bootstrap's in both cases.
    """
    if grid_a.shape[0] != grid_b.shape[0]:
        raise ValueError("paired comparison needs the same items for both configs")
    n_items = grid_a.shape[0]
    va, vb = a.value(), b.value()
    diff = vb - va
    lo = hi = math.nan
    boot_diffs = np.array([])
    if n_boot > 0 and n_items > 1:
        rng = np.random.default_rng(seed)
        reps = max(grid_a.shape[1], grid_b.shape[1])
        item_draws = rng.integers(0, n_items, size=(n_boot, n_items))
        repeat_draws = rng.integers(0, reps, size=(n_boot, n_items, reps))
        wa = bootstrap_weights(grid_a, n_boot, rng, item_draws, repeat_draws)
        wb = bootstrap_weights(grid_b, n_boot, rng, item_draws, repeat_draws)
        boot_diffs = b.values(wb) - a.values(wa)
        lo, hi = percentile_ci(boot_diffs, confidence)
    if not a.is_corpus and not b.is_corpus:
        p = wilcoxon_p(item_means(b.per_row, grid_b) - item_means(a.per_row, grid_a))
        test = "wilcoxon"
    else:
        d = boot_diffs[~np.isnan(boot_diffs)]
        if len(d) == 0 or diff == 0 and np.all(d == 0):
            p = 1.0 if len(d) else math.nan
        else:
            p = float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))
        test = "paired-bootstrap"
    return PairedResult(name, va, vb, diff, lo, hi, p, test, n_items)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value; 1.0 when every difference is zero, NaN with no data."""
    from scipy.stats import wilcoxon

    d = diffs[~np.isnan(diffs)]
    if len(d) == 0:
        return math.nan
    if np.all(d == 0):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def is_binary(values: np.ndarray) -> bool:
    """Every value is exactly 0 or 1 (no NaN): a proportion."""
    v = np.asarray(values, dtype=float)
    return v.size > 0 and bool(np.all((v == 0) | (v == 1)))


def wilson_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy's ``binomtest(...).proportion_ci``)."""
    from scipy.stats import binomtest

    if n < 1:
        return math.nan, math.nan
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def holm(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order (NaNs stay NaN and are not counted).

    The i-th smallest of m p-values is multiplied by (m - i + 1), then a running maximum keeps the
    adjusted values in the same order as the raw ones, capped at 1. scipy has no Holm (only
    ``false_discovery_control``), and statsmodels is not a dependency, hence these few lines.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    vals = p[ok]
    order = np.argsort(vals, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * vals[order]))
    res = np.empty(m)
    res[order] = adjusted
    out[ok] = res
    return out


def _z_sum(alpha: float, power: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha / 2) + norm.ppf(power))


def min_detectable_effect(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest mean paired difference a two-sided test at ``alpha`` finds with probability ``power``.

    Normal approximation for a paired design: ``(z_{1-alpha/2} + z_power) * sd_diff / sqrt(n)``, with
    ``sd_diff`` the standard deviation of the per-item differences (2.80 * sd / sqrt(n) at the defaults).
    """
    if n < 1 or not math.isfinite(sd_diff):
        return math.nan
    return _z_sum(alpha, power) * float(sd_diff) / math.sqrt(n)


def items_to_detect(effect: float, sd_diff: float, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Items needed to detect a true mean difference ``effect`` (same approximation); None for effect 0."""
    if not math.isfinite(effect) or effect == 0 or not math.isfinite(sd_diff):
        return None
    return max(2, math.ceil((_z_sum(alpha, power) * float(sd_diff) / abs(effect)) ** 2))
