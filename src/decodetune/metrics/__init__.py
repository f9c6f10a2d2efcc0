"""Metrics: per-row scores plus an aggregate, bootstrap CIs and paired tests.

``get_metric(name)`` resolves a builtin name (see :func:`list_metrics`), ``pkg.module:function`` (a user
metric called as ``fn(predictions, references, items) -> per-item floats``) or a callable.
"""

from __future__ import annotations

from decodetune.metrics.base import (
    Metric,
    MetricInput,
    MetricScores,
    canonical_name,
    get_metric,
    list_metrics,
    user_metric,
)
from decodetune.metrics.stats import PairedResult, bootstrap_ci, paired_compare, row_grid

__all__ = ["Metric", "MetricInput", "MetricScores", "PairedResult", "bootstrap_ci", "canonical_name",
           "get_metric", "list_metrics", "paired_compare", "row_grid", "user_metric"]
