"""A user's search space against a backend's capabilities: refused before the first trial."""

from __future__ import annotations

from typing import Any

from decodetune.backends.base import NEUTRAL
from decodetune.config import CANDIDATE_STRATEGIES
from decodetune.errors import UserError
from decodetune.tuning.space import SearchSpace


def _values(p: Any) -> list[Any]:
    if p.kind == "fixed":
        return [p.value]
    if p.kind == "categorical":
        return list(p.choices)
    return [p.low, p.high]


def _runs_candidates(strategy: Any, caps: Any) -> bool:
    """A candidate strategy runs where the backend returns n samples (its fields are checked one by one)."""
    return strategy in CANDIDATE_STRATEGIES and caps.n_candidates and "sample" in caps.strategies


def check_space_capabilities(space: SearchSpace, caps: Any, backend_name: str) -> None:
    """Raise one UserError naming the parameter (file:line) that ``backend_name`` cannot honour."""
    for p in space:
        where = f"{p.where}: " if p.where else ""
        if p.name == "strategy":
            bad = [v for v in _values(p) if v not in caps.strategies and not _runs_candidates(v, caps)]
            if bad:
                raise UserError(f"{where}strategy: backend {backend_name!r} has no strategy {bad[0]!r} "
                                f"(it has {', '.join(sorted(caps.strategies))})")
            continue
        if p.name == "sampler_order" and caps.sampler_order is not None:
            raise UserError(f"{where}sampler_order: backend {backend_name!r} applies its samplers in a fixed "
                            f"order ({' -> '.join(caps.sampler_order)})")
        if p.name not in NEUTRAL or p.name in caps.fields:
            continue
        if p.name == "num_return_sequences" and caps.n_candidates:
            continue
        if any(v != NEUTRAL[p.name] for v in _values(p)):
            raise UserError(f"{where}{p.name}: backend {backend_name!r} does not support {p.name}")
