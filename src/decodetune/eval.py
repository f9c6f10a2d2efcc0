"""Public evaluation API (implemented in :mod:`decodetune.evaluation`).

``evaluate(model, task, config, ...) -> EvalResult``, ``evaluate_many(model, task, configs, ...) ->
list[EvalResult]`` (one generate() call for all configs), ``compare(model, task, configs, ...) ->
Comparison`` (paired differences against ``configs[0]``).
"""

from __future__ import annotations

from decodetune.evaluation import (
    Comparison,
    EvalResult,
    MetricSummary,
    PairedDifference,
    compare,
    evaluate,
    evaluate_many,
    resolve_config,
    row_seed,
)

__all__ = ["Comparison", "EvalResult", "MetricSummary", "PairedDifference", "compare", "evaluate",
           "evaluate_many", "resolve_config", "row_seed"]
