"""DecodingEstimator: sklearn conventions, predictions against transformers, and the search snippets of the
issue run as written (GridSearchCV, RandomizedSearchCV, BayesSearchCV, HalvingRandomSearchCV,
OptunaSearchCV) on a tiny in-memory model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone

from decodetune.config import DecodingConfig
from decodetune.errors import UserError
from decodetune.models import load_model
from decodetune.sklearn import DecodingEstimator, register_model, resolve_model
from decodetune.tasks import load_task

TINY = "tiny-sklearn-test"


@pytest.fixture(autouse=True, scope="module")
def _setup(tiny_pair):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices; and the 2 cores are shared
    register_model(TINY, tiny_pair)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def arith_xy():
    items = load_task("arith").items("dev")[:9]
    return [it.prompt for it in items], [it.references[0] for it in items]


def test_params_roundtrip_and_auto_strategy():
    est = DecodingEstimator(model=TINY, temperature=0.7, beam_size=4, max_new_tokens=6)
    assert est.get_params()["temperature"] == 0.7 and est.get_params()["beam_size"] == 4
    assert est.config() == DecodingConfig(strategy="beam_sample", temperature=0.7, num_beams=4, max_new_tokens=6)
    est.set_params(temperature=None)
    assert est.config().strategy == "beam"
    est.set_params(beam_size=None, temperature=np.float64(0.3))
    assert est.config().strategy == "sample" and est.config().temperature == 0.3
    est.set_params(temperature=None)
    assert est.config() == DecodingConfig(max_new_tokens=6)
    est.set_params(beam_size=np.int64(5))  # numpy ints from skopt are plain ints in the config
    assert est.config().num_beams == 5 and isinstance(est.config().num_beams, int)
    # set_params stores, it doesn't validate (sklearn convention); fit/predict do
    est.set_params(top_p=3.0)
    with pytest.raises(UserError, match="top_p"):
        est.fit(["x"], ["y"])
    assert est.fit is not None and DecodingEstimator(task="arith").config().max_new_tokens == 12


def test_clone_shares_the_model_instead_of_copying_it(tiny_pair):
    lm = load_model(tiny_pair)
    est = DecodingEstimator(model=lm, temperature=0.5)
    c = clone(est)
    assert c is not est and c.model is lm and c.get_params() == est.get_params()
    by_name = clone(DecodingEstimator(model=TINY))
    assert resolve_model(by_name.model) is resolve_model(TINY)


def test_predict_matches_transformers_greedy_and_beam(tiny_pair):
    model, tok = tiny_pair
    lm = load_model(tiny_pair)
    prompts = ["The quick brown", "Once upon a time", "Paris is the", "She sells"]
    for kwargs, hf in (({}, {"do_sample": False}), ({"beam_size": 3}, {"do_sample": False, "num_beams": 3})):
        est = DecodingEstimator(model=TINY, max_new_tokens=5, **kwargs)
        got = est.predict(prompts)
        want = []
        for p in prompts:
            ids = torch.tensor([lm.encode(p)])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                     pad_token_id=0, **hf)
            want.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        assert list(got) == want, kwargs


def test_score_is_the_metric_of_extracted_answers():
    est = DecodingEstimator(model=TINY, max_new_tokens=4)
    X = ["The quick brown", "Once upon a time", "Paris is the", "She sells"]
    pred = est.predict(X)
    y = [pred[0].strip(), pred[1].strip(), "definitely not this", "nor this"]
    assert est.score(X, y) == pytest.approx(0.5)
    assert est.score(X, y, sample_weight=[1, 1, 0, 0]) == pytest.approx(1.0)
    with pytest.raises(UserError, match="metric: unknown metric 'acc'"):
        DecodingEstimator(model=TINY, metric="acc").score(X, y)


def _my_model():
    return DecodingEstimator.with_defaults(model=TINY, task="arith", max_new_tokens=3)


def test_issue_snippets_run_as_written(arith_xy):
    X_train, y_train = arith_xy
    MyModel = _my_model()
    assert MyModel().get_params()["max_new_tokens"] == 3
    # ---- the issue's snippets, verbatim
    from sklearn.model_selection import GridSearchCV, RandomizedSearchCV
    from skopt import BayesSearchCV
    params = {'temperature': [0.1, 0.5, 1.0], 'beam_size': [5, 10, 20]}
    grid_search = GridSearchCV(MyModel(), params, cv=3); grid_search.fit(X_train, y_train)  # noqa: E702
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # n_iter=10 > 9 grid points
        random_search = RandomizedSearchCV(MyModel(), params, n_iter=10, cv=3); random_search.fit(X_train, y_train)  # noqa: E501,E702
    bayes_search = BayesSearchCV(MyModel(), {'temperature': (0.1, 10.0), 'beam_size': (5, 20)}, n_iter=32, cv=3)
    bayes_search.fit(X_train, y_train)
    # ---- what they found
    assert len(grid_search.cv_results_["params"]) == 9
    assert grid_search.best_params_ in grid_search.cv_results_["params"]
    assert grid_search.best_score_ == np.max(grid_search.cv_results_["mean_test_score"])
    assert set(random_search.best_params_) == {"temperature", "beam_size"}
    assert len(bayes_search.cv_results_["params"]) == 32
    bp = bayes_search.best_params_
    assert 0.1 <= bp["temperature"] <= 10.0 and 5 <= bp["beam_size"] <= 20
    # the refit best estimator is a configured DecodingEstimator
    assert grid_search.best_estimator_.config().strategy == "beam_sample"
    # every cross-validated score is the estimator's own score on that fold (no hidden state)
    best = MyModel(**grid_search.best_params_)
    assert 0.0 <= best.score(X_train, y_train) <= 1.0


def test_halving_and_optuna_search(arith_xy):
    X_train, y_train = arith_xy
    MyModel = _my_model()
    from optuna.distributions import FloatDistribution, IntDistribution
    from optuna_integration import OptunaSearchCV
    from sklearn.experimental import enable_halving_search_cv  # noqa: F401
    from sklearn.model_selection import HalvingRandomSearchCV

    halving = HalvingRandomSearchCV(MyModel(), {"temperature": [0.1, 0.5, 1.0], "beam_size": [2, 3, 4]},
                                    cv=3, min_resources=3, random_state=0)
    halving.fit(X_train, y_train)
    assert set(halving.best_params_) == {"temperature", "beam_size"}
    assert halving.n_iterations_ == 2 and len(halving.cv_results_["params"]) == 3 + 1  # 3 on 3 items, 1 on 9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OptunaSearchCV is experimental
        opt = OptunaSearchCV(MyModel(), {"temperature": FloatDistribution(0.1, 2.0),
                                         "beam_size": IntDistribution(2, 5)}, n_trials=4, cv=3, random_state=0)
        opt.fit(X_train, y_train)
    assert 0.1 <= opt.best_params_["temperature"] <= 2.0 and 2 <= opt.best_params_["beam_size"] <= 5
    assert len(opt.trials_) == 4


# ---------------------------------------------------------------- the backend protocol
class _RefusingBackend:
    """A backend that can only run greedy and fails the test if it is asked to generate."""

    name = "fake"
    model_name = "fake"

    def identity(self) -> str:
        return "fake"

    def capabilities(self):
        from decodetune.backends import Capabilities

        return Capabilities(strategies=frozenset({"greedy"}), fields=frozenset({"max_new_tokens"}))

    def render(self, prompt):
        return str(prompt)

    def generate(self, requests, *, logprobs=False, batch_size=None, progress=False):
        raise AssertionError("generated although the config was refused")

    def default_config(self):
        return None

    def close(self) -> None:
        pass


def test_backend_param_is_stored_and_resolved_once():
    from decodetune.backends import BackendOptions
    from decodetune.tuning.estimator import resolve_backend

    opts = BackendOptions(name="torch")
    est = DecodingEstimator(model=TINY, backend=opts)
    assert est.get_params()["backend"] is opts and clone(est).backend is opts
    assert DecodingEstimator().backend is None
    b = resolve_backend(TINY, None)
    assert b.name == "torch" and b.lm is resolve_model(TINY)
    assert resolve_backend(TINY, "torch") is b and resolve_backend(TINY, opts) is b
    with pytest.raises(UserError, match="unknown backend 'tensorrt'"):
        DecodingEstimator(model=TINY, backend="tensorrt").predict(["x"])
    with pytest.raises(UserError, match="only the torch backend"):
        DecodingEstimator(model=TINY, backend="llamacpp").predict(["x"])


def test_rows_are_seeded_like_the_evaluation():
    """Seeds are row_seed(seed, sha of the prompt, 0); sampling through the backend equals generate()."""
    import hashlib

    from decodetune.decoding import generate
    from decodetune.evaluation import row_seed
    from decodetune.tuning.estimator import prompt_id

    X = ["The quick brown", "Once upon a time", "Paris is the"]
    est = DecodingEstimator(model=TINY, temperature=1.0, max_new_tokens=5, seed=7)
    seeds = [row_seed(7, hashlib.sha256(p.encode()).hexdigest(), 0) for p in X]
    assert [r.seed for r in est._requests(X, est.config())] == seeds
    want = [g.text for g in generate(resolve_model(TINY), X, est.config(), seeds=seeds)]
    assert list(est.predict(X)) == want
    assert list(est.predict(X[::-1])) == want[::-1]  # a row's seed follows its prompt, not its position
    assert prompt_id([{"role": "user", "content": "hi"}]) == prompt_id([{"content": "hi", "role": "user"}])


def test_a_config_the_backend_cannot_run_is_refused_before_generating():
    est = DecodingEstimator(model=_RefusingBackend(), temperature=0.7, max_new_tokens=4)
    with pytest.raises(UserError, match="DecodingEstimator: strategy: backend 'fake' cannot run this config"):
        est.predict(["x"])


def test_llamacpp_backend_scores_the_builtin_model():
    """The estimator on backend="llamacpp" generates with llama.cpp (the embedded GGUF) and scores."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    from decodetune.backends import BackendOptions, Request
    from decodetune.tuning.estimator import resolve_backend

    items = load_task("arith").items("dev")[:4]
    X, y = [it.prompt for it in items], [it.references[0] for it in items]
    est = DecodingEstimator(model="smollm2-135m", task="arith", backend="llamacpp", max_new_tokens=8)
    score = est.score(X, y)
    assert 0.0 <= score <= 1.0
    backend = resolve_backend("smollm2-135m", "llamacpp")
    assert backend.name == "llamacpp" and resolve_backend("smollm2-135m", BackendOptions(name="llamacpp")) is backend
    direct = backend.generate([Request(p, est.config(), 0) for p in X])
    assert list(est.predict(X)) == [g.text for g in direct]  # greedy: the seed does not matter
    assert all(g.num_tokens <= 8 for g in direct)
    with pytest.raises(UserError, match="strategy: backend 'llamacpp' cannot run this config"):
        DecodingEstimator(model="smollm2-135m", backend="llamacpp", beam_size=3).predict(X)
