"""scikit-learn interface: ``from decodetune.sklearn import DecodingEstimator``.

See :mod:`decodetune.tuning.estimator`.
"""

from __future__ import annotations

from decodetune.tuning.estimator import DecodingEstimator, register_model, resolve_model

__all__ = ["DecodingEstimator", "register_model", "resolve_model"]
