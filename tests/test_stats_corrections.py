"""Corrected tests: Holm over several comparisons, Wilson intervals for 0/1 metrics, the minimum detectable
effect of a test split (all against hand computations)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from decodetune.metrics import MetricScores
from decodetune.metrics.stats import (
    bootstrap_ci,
    holm,
    items_to_detect,
    min_detectable_effect,
    row_grid,
    wilson_ci,
)
from decodetune.tuning.final import power_note

Z = 1.959963985 + 0.841621234  # z_{0.975} + z_{0.8}


def test_holm_on_known_p_values():
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]).tolist() == pytest.approx([0.5, 0.002])
    assert holm([0.02, 0.6, 0.9]).tolist() == pytest.approx([0.06, 1.0, 1.0])  # capped at 1
    out = holm([0.01, math.nan, 0.04])  # a NaN is no comparison: m = 2
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert holm([0.3]).tolist() == [0.3]


def wilson_by_hand(k, n, z=1.959963985):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k, n", [(10, 10), (3, 12), (0, 7), (40, 100)])
def test_wilson_interval_matches_the_formula(k, n):
    assert wilson_ci(k, n) == pytest.approx(wilson_by_hand(k, n), abs=1e-9)


def test_binary_metric_ci_is_wilson_and_never_zero_width():
    all_right = MetricScores(per_row=np.ones(10))
    lo, hi = bootstrap_ci(all_right, row_grid(10, 1), n_boot=200)
    assert (lo, hi) == pytest.approx(wilson_by_hand(10, 10))  # bootstrap would say [1, 1]
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == pytest.approx(1.0)
    x = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=float)
    assert bootstrap_ci(MetricScores(per_row=x), row_grid(12, 1)) == pytest.approx(wilson_by_hand(8, 12))
    # not a proportion of items: 0/1 rows with repeats (correlated), or non-binary scores, keep the bootstrap
    rep = bootstrap_ci(MetricScores(per_row=np.ones(20)), row_grid(10, 2), n_boot=200)
    assert rep == pytest.approx((1.0, 1.0))
    graded = bootstrap_ci(MetricScores(per_row=np.full(10, 0.5)), row_grid(10, 1), n_boot=200)
    assert graded == pytest.approx((0.5, 0.5))
    assert all(math.isnan(v) for v in bootstrap_ci(all_right, row_grid(10, 1), n_boot=0))  # no CIs asked


def test_percentage_metric_ci_is_wilson_in_percent():
    """A 0/100 metric (repetition %) gets the Wilson interval in its own units, all-zero rows included
    (it used to come out as a fraction, [0, 0.11] for 0 of 32, beside a value in percent)."""
    none = MetricScores(per_row=np.zeros(32), scale=100.0)
    lo, hi = bootstrap_ci(none, row_grid(32, 1), n_boot=200)
    assert (lo, hi) == pytest.approx(tuple(100 * v for v in wilson_by_hand(0, 32)))
    assert hi == pytest.approx(10.72, abs=0.01)
    some = MetricScores(per_row=np.array([100.0] * 4 + [0.0] * 28), scale=100.0)
    assert bootstrap_ci(some, row_grid(32, 1)) == pytest.approx(tuple(100 * v for v in wilson_by_hand(4, 32)))


def test_minimum_detectable_effect_by_hand():
    # (1.96 + 0.8416) * 0.5 / sqrt(32) = 0.2476
    assert min_detectable_effect(0.5, 32) == pytest.approx(Z * 0.5 / math.sqrt(32), rel=1e-6)
    assert min_detectable_effect(0.5, 32) == pytest.approx(0.2476, abs=1e-4)
    # n = ((z_a + z_b) * sd / effect)^2 = (2.8016 * 0.5 / 0.1)^2 = 196.2 -> 197
    assert items_to_detect(0.1, 0.5) == 197
    assert items_to_detect(-0.1, 0.5) == 197  # the sign does not matter
    assert items_to_detect(0.0, 0.5) is None


def _res(scores):
    return SimpleNamespace(per_item=lambda metric: list(scores))


def test_final_check_power_note_sentence_and_suggested_limit():
    ref = [0.0] * 32
    tuned = [1.0] * 4 + [0.0] * 28  # d: four 1s, 28 0s; mean 0.125
    sd = math.sqrt((4 * 0.875 ** 2 + 28 * 0.125 ** 2) / 31)
    note = power_note(_res(ref), _res(tuned), "exact_match", n_available=50)
    assert note["sd_diff"] == pytest.approx(sd) and note["observed_diff"] == pytest.approx(0.125)
    assert note["mde"] == pytest.approx(Z * sd / math.sqrt(32))  # 0.166
    need = math.ceil((Z * sd / 0.125) ** 2)  # 56.7 -> 57
    assert need == 57 and note["suggested_limit"] == 57
    assert note["sentence"] == ("with 32 test items a difference below 0.17 cannot be told from noise; "
                                "to detect the observed +0.12 use --limit 57 (the test split has only 50 items)")
    big = power_note(_res(ref), _res([1.0] * 8 + [0.0] * 24), "exact_match", n_available=50)
    assert big["suggested_limit"] is None and big["sentence"].endswith("the observed +0.25 is above it")
    assert "a difference below 0.22 cannot" in big["sentence"]
    assert power_note(_res([math.nan] * 3), _res([1.0] * 3), "zipf", None) is None  # corpus-only metric


@pytest.fixture()
def engine(tiny_pair, monkeypatch):
    from decodetune.evaluation import runner
    from decodetune.models.handle import LoadedModel
    from test_eval import FakeEngine

    fake = FakeEngine(LoadedModel(*tiny_pair, name="tiny"))
    monkeypatch.setattr(runner, "_generate", fake)
    return fake


CONFIGS = [{"strategy": "greedy"}, {"strategy": "sample"}, {"strategy": "sample", "top_k": 5}]


def test_compare_holm_corrects_each_metric_over_the_configs(tiny_pair, engine):
    from decodetune.eval import compare
    from decodetune.models.handle import LoadedModel

    lm = LoadedModel(*tiny_pair, name="tiny")
    cmp = compare(lm, "arith", CONFIGS, limit=30, bootstrap=100)
    assert cmp.n_comparisons == 2 and cmp.correction_note.startswith("Holm-corrected over 2 comparisons")
    for metric in ("numeric_match", "length"):
        family = [cmp.difference(i, metric) for i in (1, 2)]
        assert [d.p_holm for d in family] == pytest.approx(holm([d.p_value for d in family]).tolist())
        assert all(d.p_holm >= d.p_value for d in family)
    d = cmp.to_dict()
    assert d["correction"] == {"method": "holm", "n_comparisons": 2}
    keys = list(d["differences"][0])
    assert keys[keys.index("p_value") + 1] == "p_holm"
    two = compare(lm, "arith", CONFIGS[:2], limit=30, bootstrap=100)
    assert all(x.p_holm == x.p_value for x in two.differences) and two.correction_note == ""


def test_compare_cli_says_holm_and_uses_it(tiny_pair, engine, tmp_path, capsys):
    from decodetune.cli.main import main

    model, tok = tiny_pair
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["compare", "-m", str(tmp_path / "m"), "-t", "arith", "-n", "20", "--bootstrap", "100"]
    for c in CONFIGS:
        args += ["-c", json.dumps(c)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Holm-corrected over 2 comparisons" in out and "Holm" in out.split("paired differences")[1]
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["correction"]["n_comparisons"] == 2 and all("p_holm" in x for x in d["differences"])
