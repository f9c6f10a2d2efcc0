"""Evaluation: run a task through the engine with one or several configs and score it."""

from __future__ import annotations

from decodetune.evaluation.result import Comparison, EvalResult, MetricSummary, PairedDifference
from decodetune.evaluation.runner import compare, evaluate, evaluate_many, resolve_config, row_seed

__all__ = ["Comparison", "EvalResult", "MetricSummary", "PairedDifference", "compare", "evaluate",
           "evaluate_many", "resolve_config", "row_seed"]
