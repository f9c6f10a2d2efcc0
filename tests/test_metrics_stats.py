"""Bootstrap CIs (per-item and corpus metrics, two-level with repeats) and paired tests."""

from __future__ import annotations

import numpy as np
import pytest

from decodetune.metrics import MetricInput, MetricScores, get_metric
from decodetune.metrics.stats import (
    bootstrap_ci,
    bootstrap_weights,
    item_means,
    paired_compare,
    row_grid,
    wilcoxon_p,
)


def test_row_grid_and_weights_resample_items_then_repeats():
    grid = row_grid(4, 3)
    assert grid.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    rng = np.random.default_rng(0)
    w = bootstrap_weights(grid, 50, rng)
    assert w.shape == (50, 12)
    assert (w.sum(axis=1) == 12).all()  # n_items x repeats rows per replicate
    # shared draws: a one-repeat grid takes the same items
    items = rng.integers(0, 4, size=(5, 4))
    reps = rng.integers(0, 3, size=(5, 4, 3))
    w1 = bootstrap_weights(row_grid(4, 1), 5, rng, items, reps)
    for b in range(5):
        assert w1[b].tolist() == np.bincount(items[b], minlength=4).tolist()


def test_constant_scores_have_zero_width_ci():
    s = MetricScores(per_row=np.full(30, 0.7))
    lo, hi = bootstrap_ci(s, row_grid(30, 1), n_boot=200)
    assert lo == pytest.approx(0.7) and hi == pytest.approx(0.7)


def test_bootstrap_ci_covers_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(123)
    covered = 0
    for rep in range(60):
        x = (rng.random(150) < 0.3).astype(float)
        lo, hi = bootstrap_ci(MetricScores(per_row=x), row_grid(150, 1), n_boot=400, seed=rep)
        covered += lo <= 0.3 <= hi
    assert 51 <= covered <= 60  # 95% nominal: 57 expected; 51 is > 3 sd below


def test_per_item_ci_matches_normal_approximation():
    rng = np.random.default_rng(7)
    x = rng.normal(5.0, 2.0, size=400)
    lo, hi = bootstrap_ci(MetricScores(per_row=x), row_grid(400, 1), n_boot=2000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.06)
    assert hi == pytest.approx(x.mean() + half, abs=0.06)


def test_corpus_metric_is_recomputed_on_resamples():
    texts = ["a b c d", "a b a b", "e f g h", "x y z w"]
    s = get_metric("distinct-2")(MetricInput(predictions=texts))
    assert s.is_corpus
    assert s.value() == pytest.approx(len({"a b", "b c", "c d", "b a", "e f", "f g", "g h", "x y", "y z", "z w"}) / 12)
    # the weighted value equals a ratio of the weighted per-row statistics
    w = np.array([2.0, 0.0, 1.0, 1.0])
    assert s.value(w) == pytest.approx((w @ s.stats)[0] / (w @ s.stats)[1])
    lo, hi = bootstrap_ci(s, row_grid(4, 1), n_boot=300)
    assert lo <= s.value() <= hi and lo < hi


def test_two_level_bootstrap_is_wider_with_noisy_repeats():
    rng = np.random.default_rng(1)
    item_effect = rng.normal(0, 1, size=(60, 1))
    noise = rng.normal(0, 3, size=(60, 4))
    x = (item_effect + noise).ravel()
    grid = row_grid(60, 4)
    lo2, hi2 = bootstrap_ci(MetricScores(per_row=x), grid, n_boot=1000)
    means = item_means(x, grid)
    lo1, hi1 = bootstrap_ci(MetricScores(per_row=means), row_grid(60, 1), n_boot=1000)
    assert (hi2 - lo2) >= 0.95 * (hi1 - lo1)  # resampling repeats adds their variance back


def test_paired_wilcoxon_for_per_item_metric():
    rng = np.random.default_rng(0)
    a = rng.random(40)
    b = a + 0.1 + rng.normal(0, 0.01, 40)
    res = paired_compare("m", MetricScores(per_row=a), row_grid(40, 1), MetricScores(per_row=b), row_grid(40, 1),
                         n_boot=500)
    from scipy.stats import wilcoxon

    assert res.test == "wilcoxon"
    assert res.diff == pytest.approx(b.mean() - a.mean())
    assert res.p_value == pytest.approx(wilcoxon(b - a).pvalue)
    assert res.p_value < 1e-6
    assert res.ci_low <= res.diff <= res.ci_high
    same = paired_compare("m", MetricScores(per_row=a), row_grid(40, 1), MetricScores(per_row=a), row_grid(40, 1))
    assert same.diff == 0 and same.p_value == 1.0


def test_paired_bootstrap_for_corpus_metric():
    texts_a = ["the cat sat on the mat", "the cat sat on the hat", "the cat sat on the bat"] * 5
    texts_b = [f"word{i} other{i} thing{i} more{i}" for i in range(15)]
    a = get_metric("distinct-2")(MetricInput(predictions=texts_a))
    b = get_metric("distinct-2")(MetricInput(predictions=texts_b))
    res = paired_compare("distinct-2", a, row_grid(15, 1), b, row_grid(15, 1), n_boot=400)
    assert res.test == "paired-bootstrap"
    assert res.diff == pytest.approx(1.0 - a.value())
    assert res.p_value < 0.01
    assert res.ci_low > 0


def test_wilcoxon_edge_cases():
    assert wilcoxon_p(np.zeros(5)) == 1.0
    assert np.isnan(wilcoxon_p(np.array([np.nan])))
