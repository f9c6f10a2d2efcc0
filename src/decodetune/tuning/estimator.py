"""`DecodingEstimator`: decoding hyperparameters as a scikit-learn estimator.

So that ``GridSearchCV``, ``RandomizedSearchCV``, ``HalvingRandomSearchCV``, skopt's ``BayesSearchCV`` and
optuna-integration's ``OptunaSearchCV`` can search them: ``X`` is a list of prompts, ``y`` their reference
answers, ``fit`` does nothing (nothing is learned), ``predict`` returns generations and ``score`` the
metric of the extracted answers against ``y``.

Estimator conventions: every ``__init__`` keyword is stored unchanged (validation happens in
``fit``/``predict``), and :meth:`__sklearn_clone__` copies the parameters without deep-copying them, so a
search never copies the model. ``predict`` generates through the backend protocol
(:mod:`decodetune.backends`): ``backend`` is a :class:`~decodetune.backends.BackendOptions`, a backend name
(``"llamacpp"``) or None for the torch engine, and each (model, backend) pair is opened once per process,
so a search over many candidates never reopens it. An in-memory model can be registered under a name
with :func:`register_model` (torch backend only).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator

from decodetune.config import DecodingConfig
from decodetune.errors import UserError

if TYPE_CHECKING:
    from decodetune.backends import Backend, BackendOptions, Request

_REGISTERED: dict[str, Any] = {}
#: open backends by (model key, BackendOptions); the model itself is kept beside its backend so that an
#: id() key cannot be reused by another object while the entry lives
_BACKENDS: dict[tuple[Any, Any], tuple[Any, Any]] = {}
_BACKENDS_LOCK = threading.Lock()


def register_model(name: str, model: Any) -> None:
    """Make an in-memory model (a LoadedModel or a (model, tokenizer) pair) loadable by ``name``."""
    from decodetune.models import load_model

    with _BACKENDS_LOCK:
        _REGISTERED[name] = load_model(model)
        for key in [k for k in _BACKENDS if k[0] == name]:  # a backend on the model this name held before
            del _BACKENDS[key]


def resolve_model(spec: Any) -> Any:
    """A registered name, or anything ``load_model`` accepts (string specs are loaded once per process)."""
    from decodetune.models import load_model

    if isinstance(spec, str) and spec in _REGISTERED:
        return _REGISTERED[spec]
    return load_model(spec)


def backend_options(backend: Any) -> BackendOptions:
    """``backend`` (BackendOptions, a backend name, or None = torch) as :class:`BackendOptions`."""
    from decodetune.backends import BackendOptions

    if backend is None:
        return BackendOptions()
    if isinstance(backend, BackendOptions):
        return backend
    if isinstance(backend, str):
        return BackendOptions(name=backend)
    raise UserError(f"DecodingEstimator.backend: expected a backend name, BackendOptions or None, "
                    f"got {type(backend).__name__}")


def resolve_backend(model: Any, backend: Any = None) -> Backend:
    """The backend serving ``model``, opened once per process for each (model, backend) pair.

    The torch backend takes anything :func:`resolve_model` does (registered names included); the others
    take what their ``open`` takes (a builtin name, a .gguf path, a served model name). A backend given
    as the model is used as it is.
    """
    from decodetune.backends import Backend, open_backend

    opts = backend_options(backend)
    if isinstance(model, Backend) and not isinstance(model, type):
        return model
    if isinstance(model, os.PathLike):
        model = os.fspath(model)  # one key per path, not one per Path object
    key = (model if isinstance(model, str) else id(model), opts)
    with _BACKENDS_LOCK:
        if key not in _BACKENDS:
            _BACKENDS[key] = (model, open_backend(_engine_model(model, opts.name), opts))
        return _BACKENDS[key][1]


def _engine_model(model: Any, engine: str) -> Any:
    """What ``open_backend`` gets: a registered name's model for torch, else the spec itself (so that the
    options' raw / device / trust_remote_code apply when torch loads it)."""
    if not (isinstance(model, str) and model in _REGISTERED):
        return model
    if engine == "torch":
        return _REGISTERED[model]
    raise UserError(f"DecodingEstimator.model: {model!r} is a registered in-memory model, which only the "
                    f"torch backend can run (backend is {engine!r})")


def prompt_id(prompt: Any) -> str:
    """A stable id of a prompt (text or chat messages): the sha256 of its text, so a row's seed depends on
    the prompt and not on which fold it landed in."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


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
    ``backend`` (a :class:`~decodetune.backends.BackendOptions`, a name such as ``"llamacpp"``, or None for
    the torch engine) is the engine ``predict`` and ``score`` generate with. Row seeds are
    ``row_seed(seed, prompt_id(prompt), 0)``, as the evaluation's.
    """

    def __init__(self, model: Any = "smollm2-135m", metric: str | None = None, task: str | None = None,
                 strategy: str = "auto", temperature: float | None = None, beam_size: int | None = None,
                 top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                 length_penalty: float | None = None, max_new_tokens: int | None = None, seed: int = 0,
                 batch_size: int | None = None, backend: Any = None):
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
        self.backend = backend

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

    def _requests(self, prompts: list[Any], cfg: DecodingConfig) -> list[Request]:
        from decodetune.backends import Request
        from decodetune.evaluation import row_seed

        return [Request(p, cfg, row_seed(int(_plain(self.seed)), prompt_id(p), 0)) for p in prompts]

    def predict(self, X: Any) -> np.ndarray:  # noqa: N803
        """Generated text for each prompt in ``X`` (object array), from the chosen backend.

        A config the backend cannot honour is a :class:`UserError` before anything is generated.
        """
        from decodetune.backends import check_config

        prompts = [p if isinstance(p, list) else str(p) for p in X]
        cfg = self.config()
        if not prompts:  # nothing to generate: no engine to open
            return np.array([], dtype=object)
        backend = resolve_backend(self.model, self.backend)
        check_config(cfg, backend, where="DecodingEstimator")
        from decodetune.evaluation.candidates import generate_selected

        # a candidate strategy answers with its selected candidate (the task extracts the answers it votes on)
        gens = generate_selected(backend, self._requests(prompts, cfg), self._task(),
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
