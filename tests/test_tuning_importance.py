"""Which knobs matter, on synthetic per-item scores with known effects: an inert parameter gets "no effect
within ±margin", a strong one "matters", a weak one drowned in noise "not enough data"."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from decodetune.tuning.importance import (
    MATTERS,
    NO_EFFECT,
    NOT_ENOUGH,
    best_pair,
    knob_verdicts,
    paired_verdict,
    param_distance,
)

N_ITEMS = 60
LEVELS = [0.0, 0.25, 0.5, 0.75, 1.0]


def synthetic_study(noise: float = 0.01, weak_noise: float = 0.6) -> optuna.Study:
    """strong: +0.3 per unit; inert: nothing; weak: +0.02 per unit, with its own large item-level noise."""
    rng = np.random.default_rng(0)
    item = rng.uniform(0.2, 0.6, N_ITEMS)  # item difficulty, shared by every trial (paired design)
    study = optuna.create_study(direction="maximize")
    dists = {"strong": FloatDistribution(0, 1), "inert": FloatDistribution(0, 1), "weak": FloatDistribution(0, 1)}
    for s in LEVELS:
        for i in LEVELS:
            for w in (0.0, 1.0):
                scores = item + 0.3 * s + 0.02 * w + rng.normal(0, noise, N_ITEMS) \
                    + (rng.normal(0, weak_noise, N_ITEMS) if w else 0.0)
                study.add_trial(create_trial(params={"strong": s, "inert": i, "weak": w}, distributions=dists,
                                             value=float(scores.mean()),
                                             user_attrs={"per_item": [float(x) for x in scores], "pruned": False}))
    return study


def test_inert_strong_and_noisy_parameters_get_their_verdicts():
    verdicts = {v.param: v for v in knob_verdicts(synthetic_study())}
    assert verdicts["strong"].verdict == MATTERS
    assert verdicts["strong"].diff == pytest.approx(0.3, abs=0.02)  # levels 0 vs 1: the whole effect
    assert verdicts["strong"].p_diff < 1e-6
    assert verdicts["inert"].verdict == NO_EFFECT and verdicts["inert"].p_tost < 0.05
    assert abs(verdicts["inert"].diff) < verdicts["inert"].margin
    assert verdicts["weak"].verdict == NOT_ENOUGH  # 0.02 under noise sd 0.6 on 60 items: can't tell
    for v in verdicts.values():  # the pair moved only the parameter in question
        assert v.n_items == N_ITEMS and {v.value_a, v.value_b} == {0.0, 1.0}
    assert verdicts["strong"].importance > verdicts["inert"].importance  # PED-ANOVA agrees


def test_paired_verdict_edge_cases():
    a = np.zeros(20)
    assert paired_verdict(a, a, 0.02)[0] == NO_EFFECT  # identical generations: no variance, no effect
    assert paired_verdict(a, a + 0.5, 0.02)[0] == MATTERS  # a constant shift outside the margin
    assert paired_verdict(a[:3], a[:3] + 1, 0.02)[0] == NOT_ENOUGH  # too few items
    with_nan = np.r_[np.full(10, np.nan), np.zeros(10)]
    assert paired_verdict(with_nan, np.zeros(20), 0.02)[4] == 10  # NaN items are left out


def test_pair_selection_and_distances():
    log = FloatDistribution(0.1, 10.0, log=True)
    assert param_distance(log, 0.1, 10.0) == pytest.approx(1.0) and param_distance(log, 1.0, 10.0) == 0.5
    assert param_distance(CategoricalDistribution(["a", "b"]), "a", "b") == 1.0
    study = synthetic_study()
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    a, b = best_pair(trials, "inert")
    assert a.params["strong"] == b.params["strong"] and a.params["weak"] == b.params["weak"]
    assert {a.params["inert"], b.params["inert"]} == {0.0, 1.0}


def test_no_pair_or_no_scores_is_not_enough_data():
    study = optuna.create_study(direction="maximize")
    d = {"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)}
    # x and y always move together: no pair differs mainly in one of them
    for v in (0.0, 0.5, 1.0):
        study.add_trial(create_trial(params={"x": v, "y": v}, distributions=d, value=v,
                                     user_attrs={"per_item": [v] * 10}))
    assert {k.verdict for k in knob_verdicts(study)} == {NOT_ENOUGH}
    bare = optuna.create_study()
    for v in (0.0, 1.0):  # a study from before per-item scores were stored
        bare.add_trial(create_trial(params={"x": v}, distributions={"x": d["x"]}, value=v))
    assert [k.verdict for k in knob_verdicts(bare)] == [NOT_ENOUGH]
