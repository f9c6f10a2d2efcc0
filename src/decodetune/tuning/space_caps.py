"""Search spaces against a backend's capabilities and a task's defaults: the default spaces cut down to
what the backend can do, and a user's space refused, before the first trial, where it asks for more than
the backend does or has a point that is invalid with the task's defaults.

The tuner's default space is :func:`default_space_for` the task: the plain default (greedy, beam and
sampling knobs) plus, where the task fits, a candidate strategy (self-consistency for exact / numeric
match, MBR for chrF / BLEU / ROUGE, each with ``num_candidates``) and, for open-ended tasks, DRY and XTC
(only on backends that honour them). ``decodetune demo`` keeps its own small space, so its cost is
unchanged; a tune with the default space pays k samples per row on the trials that pick a candidate
strategy, which ``--objective tokens:min`` makes visible.
"""

from __future__ import annotations

from typing import Any

from decodetune.backends.base import NEUTRAL
from decodetune.config import CANDIDATE_STRATEGIES, DecodingConfig
from decodetune.errors import UserError
from decodetune.export import PENALTIES, active
from decodetune.tuning.space import (
    BEAM_ONLY,
    CANDIDATE_ONLY,
    SAMPLING_ONLY,
    STRATEGY_KNOBS,
    Param,
    SearchSpace,
    _readers,
    parse_space,
)

#: The open-ended tasks' extra samplers: llama.cpp's DRY and XTC, off or on, on the sampled strategies.
_OPEN_SAMPLERS = ("dry_multiplier", "xtc_probability", "xtc_threshold")


def default_space(grid: bool = False, capabilities: Any = None) -> SearchSpace:
    """The built-in conditional space (a small finite version when ``grid`` is true).

    ``capabilities`` (a backend's): strategies and fields it cannot honour are left out.
    """
    spec = _default_spec(grid)
    return parse_space(restrict_spec(spec, capabilities), source="default grid space" if grid else "default space")


#: Primary metrics (canonical names) for which self-consistency / MBR enter the task's default space.
_VOTED_METRICS = {"exactmatch", "numericmatch"}
_MBR_METRICS = {"chrf": "chrf", "bleu": "bleu", "rougel": "rouge_l", "rouge1": "rouge_l", "rouge2": "rouge_l"}


def default_space_for(task: Any, grid: bool = False, capabilities: Any = None) -> SearchSpace:
    """:func:`default_space` plus the candidate strategy that fits ``task``'s primary metric.

    Exact / numeric match (closed answers): ``self_consistency``; chrF, BLEU or ROUGE (references):
    ``mbr`` with the primary metric as its utility. Either comes with ``num_candidates`` (3-10; 4 or 8
    on a grid), and costs that many samples per row. Other tasks get the plain default space.
    """
    from decodetune.metrics.base import canonical_name

    spec = _default_spec(grid)
    primary = canonical_name(str(getattr(task, "primary", "") or ""))
    if primary in _VOTED_METRICS or primary in _MBR_METRICS:
        strategy = "self_consistency" if primary in _VOTED_METRICS else "mbr"
        spec["strategy"] = [*spec["strategy"], strategy]
        spec["num_candidates"] = [4, 8] if grid else {"low": 3, "high": 10}
        if strategy == "mbr" and _MBR_METRICS[primary] != "chrf":
            spec["mbr_utility"] = _MBR_METRICS[primary]
    if getattr(task, "kind", "") == "open":
        _add_open_samplers(spec, grid, capabilities)
    source = ("default grid space" if grid else "default space") + f" for {getattr(task, 'name', 'the task')}"
    return parse_space(restrict_spec(spec, capabilities), source=source)


def _add_open_samplers(spec: dict[str, Any], grid: bool, capabilities: Any) -> None:
    """DRY and XTC on the sampled strategies of an open-ended task, where the backend honours them.

    XTC's threshold is searched only when XTC is on; conditions need a categorical parent, so the
    multiplier and probability are choices (off or on).
    """
    if not all(_honoured(name, capabilities) for name in _OPEN_SAMPLERS):
        return
    sampled = [s for s in spec["strategy"] if s in _readers("temperature")]
    if not sampled:
        return
    spec["dry_multiplier"] = {"choices": [0.0, 0.8], "when": {"strategy": sampled}}
    spec["xtc_probability"] = {"choices": [0.0, 0.5], "when": {"strategy": sampled}}
    spec["xtc_threshold"] = ({"choices": [0.1]} if grid else {"low": 0.05, "high": 0.3}) | {
        "when": {"xtc_probability": [0.5]}}


def _honoured(name: str, capabilities: Any) -> bool:
    """The backend has the field, and (on the torch engine) it is built: the engine names the fields it
    still refuses (issue 11's samplers land one by one)."""
    if capabilities is not None and name not in capabilities.fields:
        return False
    if capabilities is None or "contrastive" in capabilities.strategies:  # the torch engine
        from decodetune.decoding import engine

        return name not in getattr(engine, "_NOT_BUILT", ())
    return True


def _default_spec(grid: bool) -> dict[str, Any]:
    if grid:
        return {
            "strategy": ["greedy", "beam", "sample"],
            "num_beams": [2, 4],
            "length_penalty": [0.6, 1.0],
            "temperature": [0.3, 0.7, 1.0],
            "top_p": [0.9, 1.0],
            "repetition_penalty": [1.0, 1.2],
        }
    return {
        "strategy": ["greedy", "beam", "sample"],
        "num_beams": {"low": 2, "high": 8},
        "length_penalty": {"low": 0.0, "high": 2.0},
        "temperature": {"low": 0.05, "high": 2.0, "log": True},
        "top_p": {"low": 0.5, "high": 1.0},
        "top_k": {"low": 0, "high": 100},
        "min_p": {"low": 0.0, "high": 0.3},
        "repetition_penalty": {"low": 1.0, "high": 1.5},
        "no_repeat_ngram_size": {"low": 0, "high": 4},
    }



def restrict_spec(spec: dict[str, Any], capabilities: Any) -> dict[str, Any]:
    """The default spec without what a backend cannot do (beam knobs go when beams go; a candidate
    strategy stays where the backend returns n samples)."""
    if capabilities is None:
        return spec
    strategies = [s for s in spec["strategy"] if s in capabilities.strategies or (
        s in CANDIDATE_STRATEGIES and capabilities.n_candidates and "sample" in capabilities.strategies)]
    out: dict[str, Any] = {"strategy": strategies if len(strategies) > 1 else strategies[0]}
    for name, value in spec.items():
        if name in CANDIDATE_ONLY or name in STRATEGY_KNOBS:  # kept while a strategy that reads them is
            if any(s in _readers(name) for s in strategies):
                out[name] = value
            continue
        if name == "strategy" or (name not in capabilities.fields and name != "num_beams"):
            continue
        if (name in BEAM_ONLY or name in SAMPLING_ONLY) and not any(s in _readers(name) for s in strategies):
            continue
        out[name] = value
    return out


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
    if getattr(caps, "mirostat_alone", False):
        _check_mirostat_alone(space, backend_name)


#: What llama.cpp's mirostat chain (logit_bias -> temperature -> mirostat) leaves out; the backend refuses them
#: beside mirostat, so a space that can draw both would lose those trials one by one.
_NOT_WITH_MIROSTAT = (*PENALTIES, "dry_multiplier")


def _check_mirostat_alone(space: SearchSpace, backend_name: str) -> None:
    """Refuse a space that can sample mirostat together with a penalty or DRY (one line naming both)."""
    if "mirostat" not in space:
        return
    for name in _NOT_WITH_MIROSTAT:
        if name not in space:
            continue
        for values in _points_over(space, ("mirostat", name)):
            try:
                cfg = space.config(values, DecodingConfig())
            except UserError:  # an invalid point is check_space_against's to report
                continue
            if cfg.is_sampling and active(cfg, "mirostat") and active(cfg, name):
                where = space["mirostat"].where or space.source
                other = f" ({space[name].where})" if space[name].where else ""
                raise UserError(f"{where}: mirostat: backend {backend_name!r} runs mirostat alone (logit_bias -> "
                                f"temperature -> mirostat, no penalties or DRY), yet the space can draw "
                                f"mirostat={cfg.mirostat} with {name}={getattr(cfg, name)}{other}; every such "
                                f"trial would be refused: keep them under different strategies, or drop one")


def _points_over(space: SearchSpace, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Corner points of ``names`` and the parameters their conditions read (the rest left out: defaults)."""
    relevant = {*names, "strategy", "temperature"}  # these two decide whether the point samples
    for p in reversed(space.params):  # conditions refer to earlier parameters
        if p.name in relevant:
            relevant |= set(p.when)
    points: list[dict[str, Any]] = [{}]
    for p in space.params:
        if p.name not in relevant:
            continue
        points = [{**pt, p.name: v} if space._active(p, pt) else pt
                  for pt in points for v in (_corner_values(p) if space._active(p, pt) else [None])]
    return points


# ==================================================================== against a task's defaults
#: Beyond this many corner points, each parameter is checked on its own instead of every combination.
_MAX_CORNERS = 4096


def _corner_values(p: Param) -> list[Any]:
    """The values that bound what a parameter can take: range ends, every choice, the fixed value."""
    if p.kind in ("int", "float"):
        return [p.low, p.high] if p.low != p.high else [p.low]
    return list(p.choices) if p.kind == "categorical" else [p.value]


def _corner_points(space: SearchSpace, only: str | None = None) -> list[dict[str, Any]] | None:
    """Every combination of corner values (conditions respected); None when there are too many.

    With ``only``, every other searched parameter stays at its first corner value, so the points vary
    ``only`` (and the strategy, which decides what is active).
    """
    points: list[dict[str, Any]] = [{}]
    for p in space.params:
        values = _corner_values(p)
        if only is not None and p.name not in (only, "strategy"):
            values = values[:1]
        grown = []
        for point in points:
            if not space._active(p, point):
                grown.append(point)
            else:
                grown.extend({**point, p.name: v} for v in values)
        points = grown
        if len(points) > _MAX_CORNERS:
            return None
    return points


def _effective(space: SearchSpace, values: dict[str, Any], base_fields: dict[str, Any]) -> None:
    """Build the config a trial with ``values`` runs (the tuner's rule: task defaults fill the fields the
    point leaves at DecodingConfig's default); raises ConfigError / UserError if it is invalid."""
    given = space.config(values, DecodingConfig()).to_dict(only_set=True)
    DecodingConfig.from_dict({**base_fields, **given}, source="space")


def check_space_against(space: SearchSpace, base_fields: dict[str, Any]) -> None:
    """Refuse, before the first trial, a space with a point that is invalid on top of ``base_fields``.

    ``base_fields``: the DecodingConfig fields the trials start from (a task's defaults, such as arith's
    ``max_new_tokens: 12``), merged as the tuner merges them. A space is checked on its own against
    ``DecodingConfig()`` when it is parsed; this finds what only the task's values make wrong, e.g.
    ``min_new_tokens: {low: 0, high: 20}`` with ``max_new_tokens: 12``. The corners of the space are
    checked (range ends, every choice, fixed values): all combinations when there are at most 4096, else
    each parameter across the strategies. The :class:`UserError` names the space file and line.
    """
    points = _corner_points(space)
    if points is None:
        points = [pt for p in space.params for pt in (_corner_points(space, only=p.name) or [])]
    for values in points:
        try:
            _effective(space, values, base_fields)
        except UserError as e:
            raise UserError(_blame(space, values, base_fields, e)) from None


def _blame(space: SearchSpace, values: dict[str, Any], base_fields: dict[str, Any], error: UserError) -> str:
    """One line: the space line of the offending field, its value, and the defaults it clashes with."""
    field_name = getattr(error, "field", None)
    culprit = field_name if field_name in values else next((k for k in values if space[k].searched), None)
    where = space[culprit].where if culprit in space else space.source
    point = ", ".join(f"{k}={v}" for k, v in values.items() if k == culprit or k == "strategy")
    defaults = ", ".join(f"{k}={v}" for k, v in base_fields.items() if k not in values)
    reason = str(error)
    return (f"{where or space.source}: {culprit or 'space'}: the point {point or '(fixed values)'} is invalid with "
            f"the task's defaults ({defaults}): {reason}")
