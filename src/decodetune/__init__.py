"""decodetune: choose how a language model decodes.

Public API (imported lazily so the CLI starts fast)::

    from decodetune import load_model, DecodingConfig, generate, evaluate, tune
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from decodetune.config import DecodingConfig
from decodetune.errors import UserError

__version__ = "0.1.0"
__all__ = ["DecodingConfig", "EvalResult", "Generation", "UserError", "load_model", "generate", "evaluate", "tune",
           "__version__"]

_LAZY = {
    "load_model": "decodetune.models",
    "generate": "decodetune.decoding",
    "Generation": "decodetune.decoding",
    "evaluate": "decodetune.eval",
    "EvalResult": "decodetune.eval",
    "tune": "decodetune.tuning",
}

if TYPE_CHECKING:  # pragma: no cover
    from decodetune.decoding import Generation, generate
    from decodetune.eval import EvalResult, evaluate
    from decodetune.models import load_model
    from decodetune.tuning import tune


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'decodetune' has no attribute {name!r}")
