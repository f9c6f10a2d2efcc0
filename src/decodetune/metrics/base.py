"""What a metric is: per-row scores, an aggregate that can be recomputed on a bootstrap resample, a direction.

Every metric gets a :class:`MetricInput` (one entry per generated row) and returns :class:`MetricScores`.
Per-item metrics aggregate as the mean of their row scores. Corpus-level metrics (distinct-n, Zipf, corpus
BLEU...) carry either additive sufficient statistics per row (``stats``, summed with bootstrap weights and
turned into a value by ``combine``) or a general ``corpus_fn(weights)``, so that a bootstrap resample of
rows recomputes the corpus value instead of averaging row values.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from decodetune.errors import UserError

Direction = str  # "max" | "min" | "none" (informational: nothing to optimise)


@dataclass
class MetricInput:
    """Everything a metric may look at, one entry per generated row.

    ``predictions`` are the extracted answers (what answer and reference metrics score); ``texts`` are the
    raw generations (what diversity metrics score); ``token_ids`` the generated token ids (Holtzman
    repetition, Zipf, length, perplexity); ``prompt_token_ids`` the prompts' ids; ``gen_seconds`` each
    row's generation time; ``scorer`` a :class:`~decodetune.models.handle.LoadedModel` for perplexity and
    ``model_name`` the generating model's name (to know whether token ids can be reused).
    ``num_tokens`` is what each row cost in generated tokens: every candidate of a candidate strategy.
    """

    predictions: list[str]
    references: list[list[str]] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    prompts: list[Any] | None = None
    prompt_token_ids: list[list[int]] | None = None
    gen_seconds: list[float] | None = None
    scorer: Any = None
    scorer_loader: Callable[[], Any] | None = None
    model_name: str | None = None
    num_tokens: list[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.predictions)
        if not self.references:
            self.references = [[] for _ in range(n)]
        if self.texts is None:
            self.texts = list(self.predictions)
        for name in ("references", "texts", "token_ids", "prompt_token_ids", "gen_seconds", "num_tokens"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"MetricInput.{name} has {len(v)} entries for {n} predictions")

    def __len__(self) -> int:
        return len(self.predictions)

    def get_scorer(self) -> Any:
        """The perplexity scorer, loading it on first use."""
        if self.scorer is None and self.scorer_loader is not None:
            self.scorer = self.scorer_loader()
        return self.scorer


@dataclass
class MetricScores:
    """Per-row scores plus how to aggregate them under bootstrap weights (a count per row)."""

    per_row: np.ndarray
    stats: np.ndarray | None = None
    combine: Callable[[np.ndarray], float] | None = None
    corpus_fn: Callable[[np.ndarray], float] | None = None
    #: What a "yes" row scores in a proportion metric (1, or 100 for a percentage); the Wilson CI uses it.
    scale: float = 1.0

    def __post_init__(self) -> None:
        self.per_row = np.asarray(self.per_row, dtype=float)
        if self.stats is not None:
            self.stats = np.asarray(self.stats, dtype=float)

    @property
    def is_corpus(self) -> bool:
        """True when the aggregate is not the mean of the row scores."""
        return self.stats is not None or self.corpus_fn is not None

    def value(self, weights: np.ndarray | None = None) -> float:
        """Aggregate under row weights (None = every row once)."""
        w = np.ones(len(self.per_row)) if weights is None else np.asarray(weights, dtype=float)
        if self.corpus_fn is not None:
            return float(self.corpus_fn(w))
        if self.stats is not None and self.combine is not None:
            return float(self.combine(w @ self.stats))
        return weighted_nanmean(self.per_row, w)

    def values(self, weight_matrix: np.ndarray) -> np.ndarray:
        """Aggregate for each row of a (B, n_rows) weight matrix (vectorised where possible)."""
        if self.corpus_fn is not None:
            return np.array([float(self.corpus_fn(w)) for w in weight_matrix])
        if self.stats is not None and self.combine is not None:
            sums = weight_matrix @ self.stats
            return np.array([float(self.combine(s)) for s in sums])
        ok = ~np.isnan(self.per_row)
        vals = np.where(ok, self.per_row, 0.0)
        num = weight_matrix @ vals
        den = weight_matrix @ ok.astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def weighted_nanmean(values: np.ndarray, weights: np.ndarray) -> float:
    """Mean of the non-NaN values under weights; NaN when nothing is defined."""
    ok = ~np.isnan(values)
    den = float(weights[ok].sum())
    return float((values[ok] * weights[ok]).sum() / den) if den > 0 else math.nan


@dataclass(frozen=True)
class Metric:
    """A named metric: ``fn(MetricInput) -> MetricScores`` with its direction and needs."""

    name: str
    fn: Callable[[MetricInput], MetricScores]
    direction: Direction = "max"
    needs_references: bool = False
    corpus: bool = False
    description: str = ""

    def __call__(self, inp: MetricInput) -> MetricScores:
        if self.needs_references:
            for i, refs in enumerate(inp.references):
                if not refs:
                    item_id = getattr(inp.items[i], "id", i) if inp.items else i
                    raise UserError(f"metric {self.name!r} needs references, but item {item_id!r} has none "
                                    "(give the task a 'reference', 'references' or 'answer' field)")
        return self.fn(inp)


_REGISTRY: dict[str, Metric] = {}
# Metrics taking an integer suffix: "distinct-2", "rep-3", "self_bleu-4"...
_FAMILIES: dict[str, Callable[[int], Metric]] = {}


def register(metric: Metric) -> Metric:
    """Add a metric to the registry under its canonical name."""
    _REGISTRY[canonical_name(metric.name)] = metric
    return metric


def register_family(prefix: str, factory: Callable[[int], Metric]) -> None:
    """Register metrics named ``<prefix>-<n>`` built by ``factory(n)``."""
    _FAMILIES[canonical_name(prefix)] = factory


def canonical_name(name: str) -> str:
    """Lower-case without ``-``, ``_`` or spaces: ``rouge-L``, ``rouge_l`` and ``rougeL`` are one name."""
    return re.sub(r"[\s\-_]+", "", name.strip().lower())


def list_metrics() -> list[Metric]:
    """The builtin metrics (families listed with their default n)."""
    _load_builtins()
    fam = [f(2) for f in _FAMILIES.values()]
    return sorted(list(_REGISTRY.values()) + fam, key=lambda m: m.name)


def get_metric(spec: str | Metric | Callable[..., Any]) -> Metric:
    """Resolve a metric name, a ``pkg.module:function`` user metric, a callable or a :class:`Metric`."""
    if isinstance(spec, Metric):
        return spec
    if callable(spec):
        return user_metric(spec, getattr(spec, "__name__", "user_metric"))
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"metric: expected a name, got {spec!r}")
    if ":" in spec:
        return _import_user_metric(spec)
    _load_builtins()
    key = canonical_name(spec)
    if key in _REGISTRY:
        return _REGISTRY[key]
    m = re.fullmatch(r"(.+?)(\d+)", key)
    if m and canonical_name(m.group(1)) in _FAMILIES:
        n = int(m.group(2))
        if not 1 <= n <= 8:
            raise UserError(f"metric {spec!r}: n must be between 1 and 8")
        return _FAMILIES[canonical_name(m.group(1))](n)
    known = sorted({m.name for m in _REGISTRY.values()} | {f"{p}-N" for p in _FAMILIES})
    raise UserError(f"unknown metric {spec!r}; known: {', '.join(known)}, or pkg.module:function")


def load_function(spec: str, field: str) -> Callable[..., Any]:
    """``pkg.module:function`` imported; the one-line error names ``field`` (a metric, a config field)."""
    modname, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(modname)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise UserError(f"{field}: cannot import module {modname!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UserError(f"{field}: module {modname!r} has no function {attr!r}")
    return fn


def _import_user_metric(spec: str) -> Metric:
    return user_metric(load_function(spec, f"metric {spec!r}"), spec)


def user_metric(fn: Callable[..., Any], name: str) -> Metric:
    """Wrap ``fn(predictions, references, items) -> per-item floats`` as a :class:`Metric`.

    ``fn.direction`` ("max"/"min") and ``fn.needs_references`` are honoured when the function has them.
    Any exception inside it, or a malformed return value, becomes a one-line :class:`UserError`.
    """
    direction = getattr(fn, "direction", "max")
    if direction not in ("max", "min", "none"):
        raise UserError(f"metric {name!r}: direction must be 'max' or 'min', got {direction!r}")

    def run(inp: MetricInput) -> MetricScores:
        try:
            out = fn(list(inp.predictions), [list(r) for r in inp.references], list(inp.items))
        except Exception as e:  # noqa: BLE001 - the user's code; report it in one line
            msg = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"metric {name!r} raised {type(e).__name__}: {msg}") from None
        return MetricScores(per_row=_as_scores(out, len(inp), name))

    return Metric(name=name, fn=run, direction=direction,
                  needs_references=bool(getattr(fn, "needs_references", False)),
                  description=(fn.__doc__ or "user metric").strip().splitlines()[0])


def _as_scores(out: Any, n: int, name: str) -> np.ndarray:
    if isinstance(out, dict) and "per_item" in out:
        out = out["per_item"]
    if not isinstance(out, Sequence | np.ndarray) or isinstance(out, str | bytes):
        raise UserError(f"metric {name!r} must return a list of per-item numbers, got {type(out).__name__}")
    if len(out) != n:
        raise UserError(f"metric {name!r} returned {len(out)} scores for {n} predictions")
    vals = []
    for i, v in enumerate(out):
        if v is None:
            vals.append(math.nan)
            continue
        if isinstance(v, bool):
            v = float(v)
        try:
            vals.append(float(v))
        except (TypeError, ValueError):
            raise UserError(f"metric {name!r} returned a non-number at position {i}: {v!r}") from None
    return np.array(vals, dtype=float)


_LOADED = False


def _load_builtins() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from decodetune.metrics import answer, diversity, lm, overlap  # noqa: F401  (registers them)
