"""`DecodingEstimator`: decoding hyperparameters as a scikit-learn estimator.

So that ``GridSearchCV``, ``RandomizedSearchCV``, ``HalvingRandomSearchCV``, skopt's ``BayesSearchCV`` and
optuna-integration's ``OptunaSearchCV`` can search them: ``X`` is a list of prompts, ``y`` their reference
answers, ``fit`` does nothing (nothing is learned), ``predict`` returns generations and ``score`` the
metric of the extracted answers against ``y``.

Estimator conventions: every ``__init__`` keyword is stored unchanged (validation happens in
``fit``/``predict``), and :meth:`__sklearn_clone__` copies the parameters without deep-copying them, so a
search never copies the model. A model given by name is loaded once per process (``load_model`` memoises
string specs) and an in-memory model can be registered under a name with :func:`register_model`.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from decodetune.config import DecodingConfig
from decodetune.errors import UserError

_REGISTERED: dict[str, Any] = {}


def register_model(name: str, model: Any) -> None:
    """Make an in-memory model (a LoadedModel or a (model, tokenizer) pair) loadable by ``name``."""
    from decodetune.models import load_model

    _REGISTERED[name] = load_model(model)


def resolve_model(spec: Any) -> Any:
    """A registered name, or anything ``load_model`` accepts (string specs are loaded once per process)."""
    from decodetune.models import load_model

    if isinstance(spec, str) and spec in _REGISTERED:
        return _REGISTERED[spec]
    return load_model(spec)


def _plain(v: Any) -> Any:
    """numpy scalars (what skopt and numpy-based searches pass) as Python numbers."""
    return v.item() if isinstance(v, np.generic) else v


class DecodingEstimator(BaseEstimator):
    """A decoding configuration that predicts generations and scores them with a metric.

    ``strategy="auto"``: ``beam_size > 1`` with a ``temperature`` is stochastic beam search
    (``beam_sample``), ``beam_size > 1`` alone is beam search, a ``temperature`` alone is sampling, and
    nothing is greedy. ``None`` leaves a knob at its DecodingConfig default (or the task's). ``task``
    (a builtin name) supplies the answer extraction, default metric and defaults such as
    ``max_new_tokens``; without it answers are stripped text and the metric defaults to exact_match.
    """

    def __init__(self, model: Any = "smollm2-135m", metric: str | None = None, task: str | None = None,
                 strategy: str = "auto", temperature: float | None = None, beam_size: int | None = None,
                 top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                 length_penalty: float | None = None, max_new_tokens: int | None = None, seed: int = 0,
                 batch_size: int | None = None):
        self.model = model
        self.metric = metric
        self.task = task
        self.strategy = strategy
        self.temperature = temperature
        self.beam_size = beam_size
        self.top_p = top_p
        self.top_k = top_k
        self.min_p = min_p
        self.repetition_penalty = repetition_penalty
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.length_penalty = length_penalty
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.batch_size = batch_size

    # ------------------------------------------------------------ sklearn protocol
    def __sklearn_clone__(self) -> DecodingEstimator:
        """A new unfitted estimator with the same parameters, not deep-copied (the model stays shared)."""
        return type(self)(**self.get_params(deep=False))

    def __sklearn_is_fitted__(self) -> bool:
        return True  # nothing to learn: predict works without fit

    def fit(self, X: Any = None, y: Any = None) -> DecodingEstimator:  # noqa: N803 - sklearn's names
        """Validate the parameters; nothing is learned."""
        self.config_ = self.config()
        return self

    # ------------------------------------------------------------ decoding
    def _task(self) -> Any:
        if self.task is None:
            return None
        from decodetune.tasks import load_task

        return load_task(self.task)

    def config(self) -> DecodingConfig:
        """The DecodingConfig these parameters describe (validated; task defaults filled in)."""
        temperature, beams = _plain(self.temperature), _plain(self.beam_size)
        strategy = self.strategy
        if strategy == "auto":
            if beams is not None and beams > 1:
                strategy = "beam_sample" if temperature is not None else "beam"
            else:
                strategy = "sample" if temperature is not None else "greedy"
        fields: dict[str, Any] = {"strategy": strategy}
        for name, value in (("temperature", temperature), ("num_beams", beams), ("top_p", self.top_p),
                            ("top_k", self.top_k), ("min_p", self.min_p),
                            ("repetition_penalty", self.repetition_penalty),
                            ("no_repeat_ngram_size", self.no_repeat_ngram_size),
                            ("length_penalty", self.length_penalty), ("max_new_tokens", self.max_new_tokens)):
            if value is not None:
                fields[name] = _plain(value)
        if strategy in ("greedy", "sample") and fields.get("num_beams") == 1:
            fields.pop("num_beams")
        task = self._task()
        if task is not None:
            fields = {**{k: v for k, v in task.defaults.items() if k not in fields}, **fields}
        return DecodingConfig.from_dict(fields, source="DecodingEstimator")

    def _seeds(self, prompts: list[Any]) -> list[int]:
        # a row's seed depends on its prompt, not on which fold it landed in
        out = []
        for p in prompts:
            digest = hashlib.sha256(f"{self.seed}\x1f{p!r}".encode()).digest()
            out.append(int.from_bytes(digest[:4], "big") & 0x7FFFFFFF)
        return out

    def predict(self, X: Any) -> np.ndarray:  # noqa: N803
        """Generated text for each prompt in ``X`` (object array)."""
        from decodetune.decoding import generate

        prompts = [p if isinstance(p, list) else str(p) for p in X]
        if not prompts:
            return np.array([], dtype=object)
        gens = generate(resolve_model(self.model), prompts, self.config(), seeds=self._seeds(prompts),
                        batch_size=_plain(self.batch_size))
        texts = [g.text for g in gens if g.sequence_index == 0]
        return np.array(texts, dtype=object)

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:  # noqa: N803
        """The metric (higher is better for max metrics, negated for min metrics) on ``X`` against ``y``."""
        from decodetune.metrics import MetricInput, get_metric

        task = self._task()
        name = self.metric or (task.metrics[0] if task is not None else "exact_match")
        try:
            metric = get_metric(name)
        except UserError as e:
            raise UserError(f"DecodingEstimator.metric: {e}") from None
        texts = list(self.predict(X))
        refs = [[str(r) for r in ref] if isinstance(ref, list | tuple) else [str(ref)] for ref in list(y)]
        if len(refs) != len(texts):
            raise UserError(f"DecodingEstimator.score: {len(texts)} prompts but {len(refs)} references")
        extract = task.extract_answer if task is not None else str.strip
        inp = MetricInput(predictions=[extract(t) for t in texts], references=refs, texts=texts)
        scores = metric(inp)
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=float)
        value = float(scores.value(w))
        # sklearn maximises scores; a metric to minimise is negated (as its neg_* scorers are)
        return -value if metric.direction == "min" else value

    @classmethod
    def with_defaults(cls, **defaults: Any) -> type[DecodingEstimator]:
        """A subclass whose ``__init__`` defaults are ``defaults``, e.g. ``MyModel = DecodingEstimator
        .with_defaults(model="./tiny", max_new_tokens=8)``; ``MyModel()`` then needs no arguments and
        ``get_params``/``clone`` see an explicit signature, as sklearn requires."""
        sig = inspect.signature(cls.__init__)
        unknown = sorted(set(defaults) - set(sig.parameters) - {"self"})
        if unknown:
            raise UserError(f"DecodingEstimator.with_defaults: unknown parameter {unknown[0]!r}")
        new_sig = sig.replace(parameters=[p.replace(default=defaults[p.name]) if p.name in defaults else p
                                          for p in sig.parameters.values()])

        def __init__(self: Any, **kwargs: Any) -> None:
            bound = new_sig.bind(self, **kwargs)
            bound.apply_defaults()
            args = dict(bound.arguments)
            args.pop("self")
            cls.__init__(self, **args)

        __init__.__signature__ = new_sig  # type: ignore[attr-defined]
        return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                           "__doc__": cls.__doc__})
