"""Decoding hyperparameter search on top of Optuna: spaces, the batched/pruned loop, report, sklearn.

``tune(model, task, search="tpe", n_trials=20, ...)`` runs (or resumes) a study and returns a
:class:`TuneResult`. See :mod:`decodetune.tuning.core` for the loop and :mod:`decodetune.tuning.space`
for the search-space format.
"""

from __future__ import annotations

from decodetune.tuning.core import TuneResult, best_trials, tune
from decodetune.tuning.objectives import Objective, parse_objectives
from decodetune.tuning.space import Param, SearchSpace, default_space, load_space, parse_space
from decodetune.tuning.study import SEARCHES

__all__ = ["tune", "TuneResult", "best_trials", "Objective", "parse_objectives", "Param", "SearchSpace",
           "default_space", "load_space", "parse_space", "SEARCHES"]
