"""Search spaces over :class:`~decodetune.config.DecodingConfig` fields, with conditions.

A space is an ordered list of :class:`Param`. Each parameter is a numeric range (``low``/``high``,
optional ``log`` or ``step``), a list of ``choices``, or a fixed ``value``, and may carry a condition
``when: {param: value | [values]}``: it is only suggested when the named (categorical or fixed)
parameter has one of those values. Parameters that only matter for beams (``num_beams``,
``length_penalty``, ``early_stopping``) or for sampling (``temperature``, ``top_p``...) get that
condition automatically when ``strategy`` is searched and the file gives no ``when``, so that a trial
never spends a dimension on a knob its strategy ignores.

YAML file format (one mapping, keys are DecodingConfig fields; ``beam_size`` is an alias)::

    strategy: [greedy, beam, sample]          # a list is a set of choices
    max_new_tokens: 32                        # a scalar is a fixed value
    num_beams: {low: 2, high: 8, step: 2}     # gets "when strategy is beam" automatically
    temperature: {low: 0.1, high: 2.0, log: true, when: {strategy: sample}}
    top_p: {choices: [0.8, 0.9, 1.0]}

Every error names the file and line, and is raised before any generation.
"""

from __future__ import annotations

import dataclasses
import decimal
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from decodetune.config import ALIASES, CANDIDATE_STRATEGIES, DecodingConfig
from decodetune.errors import ConfigError, UserError

if TYPE_CHECKING:
    import optuna

_FIELDS = {f.name: f for f in dataclasses.fields(DecodingConfig)}
_INT_FIELDS = {"max_new_tokens", "min_new_tokens", "top_k", "no_repeat_ngram_size", "num_beams",
               "num_return_sequences", "num_candidates", "seed"}
BEAM_ONLY = ("num_beams", "length_penalty", "early_stopping")
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
#: Knobs of the candidate strategies, and the strategies that read each.
CANDIDATE_ONLY = {"num_candidates": CANDIDATE_STRATEGIES, "mbr_utility": ("mbr",), "rerank": ("best_of_n",)}
#: Strategies that read the sampling knobs (the candidate strategies draw their candidates with them).
_SAMPLED = ("sample", "beam_sample", *CANDIDATE_STRATEGIES)
#: Strategies with beams (they read BEAM_ONLY).
_BEAMED = ("beam", "beam_sample", "diverse_beam")
#: Knobs of contrastive search and diverse beam search, and the strategy that reads each.
STRATEGY_KNOBS = {"penalty_alpha": ("contrastive",), "num_beam_groups": ("diverse_beam",),
                  "diversity_penalty": ("diverse_beam",)}
#: What a searched contrastive / diverse_beam strategy gets when the space leaves its knobs out (Su et
#: al.'s alpha 0.6, k 4; two groups of two beams with transformers' documented penalty scale).
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "contrastive": {"penalty_alpha": 0.6, "top_k": 4},
    "diverse_beam": {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.5},
}
_SPEC_KEYS = {"low", "high", "log", "step", "type", "choices", "value", "when"}
#: Strategy under which a field's values are checked when the file does not constrain it.
_CHECK_STRATEGY = {**{n: "beam_sample" for n in BEAM_ONLY}, **{n: "sample" for n in SAMPLING_ONLY},
                   **{n: wanted[0] for n, wanted in {**CANDIDATE_ONLY, **STRATEGY_KNOBS}.items()}}
#: ``num_candidates`` of a searched candidate strategy when the space does not set it.
DEFAULT_NUM_CANDIDATES = 5


@dataclass(frozen=True)
class Param:
    """One searched (or fixed) DecodingConfig field."""

    name: str
    kind: str  # "float" | "int" | "categorical" | "fixed"
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    where: str = ""  # "file:line" for messages

    @property
    def searched(self) -> bool:
        """True unless the value is fixed."""
        return self.kind != "fixed"

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution of a searched parameter."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "float":
            return FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        if self.kind == "categorical":
            return CategoricalDistribution(self.choices)
        raise ValueError(f"{self.name} is fixed")

    def grid_values(self) -> list[Any]:
        """The finite set of values grid search visits; a continuous range is a UserError."""
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            if self.log:
                raise UserError(f"{self.where}: {self.name}: grid search cannot enumerate a log-scale range; "
                                "give choices instead")
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise UserError(f"{self.where}: {self.name}: grid search needs a finite space, but this is a "
                            "continuous range; add step: or give choices:")
        lo, hi, st = (decimal.Decimal(str(v)) for v in (self.low, self.high, self.step))
        out = []
        while lo <= hi:
            out.append(float(lo))
            lo += st
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (stored in the study so that a resumed run can check it)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "where"}
        d["choices"] = list(self.choices)
        d["when"] = {k: list(v) for k, v in self.when.items()}
        return d


class SearchSpace:
    """An ordered set of parameters with conditions; turns a trial into a DecodingConfig."""

    def __init__(self, params: list[Param], source: str = "space"):
        self.params = params
        self.source = source
        self._by_name = {p.name: p for p in params}

    # ---------------------------------------------------------------- views
    def __iter__(self) -> Iterator[Param]:
        return iter(self.params)

    def __getitem__(self, name: str) -> Param:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def searched(self) -> list[Param]:
        """The parameters that are not fixed."""
        return [p for p in self.params if p.searched]

    def is_numeric_only(self) -> bool:
        """True when no searched parameter is categorical (what CMA-ES and GP handle natively)."""
        return all(p.kind in ("float", "int") for p in self.searched)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, stored in the study's user attributes."""
        return {"source": self.source, "params": [p.to_dict() for p in self.params]}

    def _active(self, p: Param, values: dict[str, Any]) -> bool:
        return all(c in values and values[c] in allowed for c, allowed in p.when.items())

    # ---------------------------------------------------------------- sampling
    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Ask the trial for every active parameter; returns all values (fixed ones included)."""
        values: dict[str, Any] = {}
        for p in self.params:
            if not self._active(p, values):
                continue
            if p.kind == "fixed":
                values[p.name] = p.value
            elif p.kind == "float":
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
            elif p.kind == "int":
                values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log,
                                                   step=int(p.step or 1))
            else:
                values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        return values

    def active_values(self, params: dict[str, Any]) -> dict[str, Any]:
        """Fixed values plus the active subset of ``params`` (e.g. a stored trial's params)."""
        values: dict[str, Any] = {}
        for p in self.params:
            if not self._active(p, values):
                continue
            if p.kind == "fixed":
                values[p.name] = p.value
            elif p.name in params:
                values[p.name] = params[p.name]
        return values

    def config(self, values: dict[str, Any], base: DecodingConfig | None = None) -> DecodingConfig:
        """The DecodingConfig for a set of parameter values on top of ``base``."""
        base = base or DecodingConfig()
        changes = dict(values)
        # A searched strategy without beams leaves num_beams at 1 even if the base had beams.
        strategy = changes.get("strategy")
        if strategy in ("greedy", "sample", "contrastive", *CANDIDATE_STRATEGIES) and "num_beams" not in changes:
            changes["num_beams"] = 1
        if strategy in ("beam", "beam_sample") and "num_beams" not in changes \
                and base.num_beams < 2:
            changes["num_beams"] = 4
        _strategy_knobs(strategy, changes, base)
        # likewise for candidates: only the candidate strategies take num_candidates > 1
        if strategy is not None and "num_candidates" not in changes:
            if strategy not in CANDIDATE_STRATEGIES:
                changes["num_candidates"] = 1
            elif base.num_candidates < 2:
                changes["num_candidates"] = DEFAULT_NUM_CANDIDATES
        return base.replace(**changes)

    def baseline_point(self) -> dict[str, Any] | None:
        """The searched values that reproduce DecodingConfig's defaults (greedy), if the space has them.

        The tuner evaluates this point first, so the pruner has a reference from the start and the
        search never reports a winner that is worse than the default on dev without saying so.
        """
        defaults = DecodingConfig()
        values: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        for p in self.params:
            if not self._active(p, {**fixed, **values}):
                continue
            if p.kind == "fixed":
                fixed[p.name] = p.value
                continue
            v = getattr(defaults, p.name)
            if p.kind == "categorical":
                if v not in p.choices:
                    return None
            elif not (p.low <= v <= p.high) or (p.step and not _on_step(v, p)) or \
                    (p.kind == "int" and v != int(v)):
                return None
            values[p.name] = v
        return values

    def grid(self, seed: int | None = None) -> list[dict[str, Any]]:
        """Every point of a finite space (searched parameters only), shuffled when ``seed`` is given."""
        points: list[dict[str, Any]] = [{}]
        fixed: dict[str, Any] = {}
        for p in self.params:
            new_points = []
            for point in points:
                if not self._active(p, {**fixed, **point}):
                    new_points.append(point)
                    continue
                if p.kind == "fixed":
                    fixed[p.name] = p.value
                    new_points.append(point)
                    continue
                new_points.extend({**point, p.name: v} for v in p.grid_values())
            points = new_points
            if len(points) > 100_000:
                raise UserError(f"{self.source}: the grid has more than 100000 points; narrow the space")
        if seed is not None:
            random.Random(seed).shuffle(points)
        return points


def _on_step(v: float, p: Param) -> bool:
    span = decimal.Decimal(str(v)) - decimal.Decimal(str(p.low))
    return span % decimal.Decimal(str(p.step)) == 0


# ==================================================================== defaults
def default_space(grid: bool = False, capabilities: Any = None) -> SearchSpace:
    """The built-in conditional space cut down to ``capabilities`` (:mod:`decodetune.tuning.space_caps`)."""
    from decodetune.tuning import space_caps

    return space_caps.default_space(grid, capabilities)


def default_space_for(task: Any, grid: bool = False, capabilities: Any = None) -> SearchSpace:
    """:func:`default_space` plus what fits ``task`` (:func:`decodetune.tuning.space_caps.default_space_for`)."""
    from decodetune.tuning import space_caps

    return space_caps.default_space_for(task, grid, capabilities)


def restrict_spec(spec: dict[str, Any], capabilities: Any) -> dict[str, Any]:
    """A space mapping without what a backend cannot do (:func:`decodetune.tuning.space_caps.restrict_spec`)."""
    from decodetune.tuning import space_caps

    return space_caps.restrict_spec(spec, capabilities)



def _strategy_knobs(strategy: Any, changes: dict[str, Any], base: DecodingConfig) -> None:
    """Fill in a contrastive / diverse_beam point's own knobs the space leaves out (where ``base`` has
    none), and put diverse beam's back to neutral for the other strategies, so every point is valid."""
    if strategy is None:
        return
    for name, value in STRATEGY_DEFAULTS.get(strategy, {}).items():
        if name not in changes and getattr(base, name) == getattr(_NEUTRAL, name):
            changes[name] = value
    if strategy != "diverse_beam":
        changes.setdefault("num_beam_groups", 1)
        changes.setdefault("diversity_penalty", 0.0)
    if strategy != "contrastive":
        changes.setdefault("penalty_alpha", 0.0)


_NEUTRAL = DecodingConfig()


def _readers(name: str) -> tuple[str, ...]:
    """The strategies that read a strategy-specific knob."""
    if name in BEAM_ONLY:
        return _BEAMED
    if name == "top_k":  # contrastive search's candidate set
        return (*_SAMPLED, "contrastive")
    if name in SAMPLING_ONLY:
        return _SAMPLED
    return {**CANDIDATE_ONLY, **STRATEGY_KNOBS}[name]


# ==================================================================== parsing
def load_space(path: str) -> SearchSpace:
    """Parse a YAML (or JSON) space file; every error names ``path:line``."""
    from decodetune.io import read_text

    text = read_text(path)
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{where}: malformed YAML in search space") from None
    if data is None:
        raise UserError(f"{path}: the search space is empty")
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: a search space is a mapping of config fields, got {type(data).__name__}")
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            lines[str(key_node.value)] = key_node.start_mark.line + 1
    return parse_space(data, source=str(path), lines=lines)


def parse_space(spec: dict[str, Any], source: str = "space", lines: dict[str, int] | None = None) -> SearchSpace:
    """Build a SearchSpace from a mapping (the YAML file's content)."""
    lines = lines or {}
    if not spec:
        raise UserError(f"{source}: the search space is empty")
    params: list[Param] = []
    seen: set[str] = set()
    for key, raw in spec.items():
        where = f"{source}:{lines[str(key)]}" if str(key) in lines else source
        name = ALIASES.get(str(key), str(key))
        if name not in _FIELDS:
            raise UserError(f"{where}: unknown parameter {key!r}; known: {', '.join(sorted(_FIELDS))}")
        if name in seen:
            raise UserError(f"{where}: {key} is given twice (beam_size is an alias of num_beams)")
        seen.add(name)
        params.append(_parse_param(name, raw, where, {p.name: p for p in params}))
    params = _add_implicit_conditions(params)
    # strategy first, so that conditions on it can be resolved in one pass
    params.sort(key=lambda p: p.name != "strategy")
    _check_values(params)
    return SearchSpace(params, source=source)


def _parse_param(name: str, raw: Any, where: str, earlier: dict[str, Param]) -> Param:
    if isinstance(raw, list):
        raw = {"choices": raw}
    if not isinstance(raw, dict):
        return Param(name, "fixed", value=raw, where=where)
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise UserError(f"{where}: {name}: unknown key {sorted(unknown)[0]!r}; use low/high/log/step/type, "
                        "choices, value or when")
    when = _parse_when(name, raw.get("when"), where, earlier)
    if "value" in raw:
        if set(raw) - {"value", "when"}:
            raise UserError(f"{where}: {name}: 'value' fixes the parameter; don't combine it with a range")
        return Param(name, "fixed", value=raw["value"], when=when, where=where)
    if "choices" in raw:
        choices = raw["choices"]
        if set(raw) - {"choices", "when"}:
            raise UserError(f"{where}: {name}: 'choices' can't be combined with low/high/log/step")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: {name}: choices must be a non-empty list")
        for c in choices:
            if c is not None and not isinstance(c, bool | int | float | str):
                raise UserError(f"{where}: {name}: choice {c!r} must be a number, string, boolean or null")
        if len(set(map(repr, choices))) != len(choices):
            raise UserError(f"{where}: {name}: choices contain duplicates")
        return Param(name, "categorical", choices=tuple(choices), when=when, where=where)
    if "low" not in raw or "high" not in raw:
        raise UserError(f"{where}: {name}: a range needs both low and high (or give choices / value)")
    low, high = raw["low"], raw["high"]
    for label, v in (("low", low), ("high", high), ("step", raw.get("step", 1))):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise UserError(f"{where}: {name}: {label} must be a number, got {v!r}")
    if low > high:
        raise UserError(f"{where}: {name}: low ({low}) > high ({high})")
    kind = raw.get("type") or ("int" if name in _INT_FIELDS else "float")
    if kind not in ("int", "float"):
        raise UserError(f"{where}: {name}: type must be int or float, got {kind!r}")
    if kind == "float" and name in _INT_FIELDS:
        raise UserError(f"{where}: {name}: is an integer field; type float is not allowed")
    log = bool(raw.get("log", False))
    step = raw.get("step")
    if log and low <= 0:
        raise UserError(f"{where}: {name}: a log-scale range needs low > 0, got {low}")
    if log and step is not None:
        raise UserError(f"{where}: {name}: log and step can't be combined")
    if step is not None:
        if step <= 0:
            raise UserError(f"{where}: {name}: step must be > 0, got {step}")
        span = decimal.Decimal(str(high)) - decimal.Decimal(str(low))
        if span % decimal.Decimal(str(step)) != 0:
            raise UserError(f"{where}: {name}: step {step} does not divide high - low ({span})")
    if kind == "int":
        if any(float(v) != int(v) for v in (low, high, step or 1)):
            raise UserError(f"{where}: {name}: an integer range needs integer low/high/step")
        low, high, step = int(low), int(high), (int(step) if step is not None else None)
    else:
        low, high = float(low), float(high)
        step = float(step) if step is not None else None
    return Param(name, kind, low=low, high=high, step=step, log=log, when=when, where=where)


def _parse_when(name: str, raw: Any, where: str, earlier: dict[str, Param]) -> dict[str, tuple[Any, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: {name}: when must be a mapping such as {{strategy: sample}}")
    when: dict[str, tuple[Any, ...]] = {}
    for cond, allowed in raw.items():
        cond = ALIASES.get(str(cond), str(cond))
        if cond not in earlier:
            raise UserError(f"{where}: {name}: condition on {cond!r}, which is not defined above it")
        parent = earlier[cond]
        if parent.kind not in ("categorical", "fixed"):
            raise UserError(f"{where}: {name}: conditions must name a parameter with choices, not a range "
                            f"({cond})")
        allowed_t = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        possible = parent.choices if parent.kind == "categorical" else (parent.value,)
        bad = [a for a in allowed_t if a not in possible]
        if bad:
            raise UserError(f"{where}: {name}: condition {cond}={bad[0]!r} can never hold "
                            f"({cond} is one of {list(possible)})")
        when[cond] = allowed_t
    return when


def _strategies(params: list[Param]) -> tuple[Any, ...]:
    for p in params:
        if p.name == "strategy":
            return p.choices if p.kind == "categorical" else (p.value,)
    return ("greedy",)


def _add_implicit_conditions(params: list[Param]) -> list[Param]:
    """Beam-only / sampling-only / candidate knobs get ``when: strategy in ...`` if strategy is searched."""
    strategies = _strategies(params)
    out = []
    for p in params:
        if not p.when and p.name in (*BEAM_ONLY, *SAMPLING_ONLY, *CANDIDATE_ONLY, *STRATEGY_KNOBS) and any(
                q.name == "strategy" and q.kind == "categorical" for q in params):
            wanted = _readers(p.name)
            allowed = tuple(s for s in strategies if s in wanted)
            if not allowed:
                raise UserError(f"{p.where}: {p.name}: is only used by strategies {' / '.join(wanted)}, "
                                f"which the space's strategy choices {list(strategies)} never select")
            p = dataclasses.replace(p, when={"strategy": allowed})
        out.append(p)
    return out


def _check_values(params: list[Param]) -> None:
    """Each bound / choice / fixed value must be a valid DecodingConfig value for that field."""
    strategies = _strategies(params)
    for p in params:
        if p.name == "strategy":
            values = list(p.choices) if p.kind == "categorical" else [p.value]
        elif p.kind in ("int", "float"):
            values = [p.low, p.high]
        else:
            values = list(p.choices) if p.kind == "categorical" else [p.value]
        allowed = p.when.get("strategy", strategies)
        strategy = _CHECK_STRATEGY.get(p.name)
        if strategy is None or (strategy not in allowed and len(allowed) == 1):
            strategy = allowed[0] if allowed and isinstance(allowed[0], str) else "greedy"
        for v in values:
            fields = {p.name: v} if p.name == "strategy" else {"strategy": strategy, p.name: v}
            if fields.get("strategy") in ("beam", "beam_sample") and p.name != "num_beams":
                fields["num_beams"] = 4
            own = STRATEGY_DEFAULTS.get(fields.get("strategy"), {})  # type: ignore[arg-type]
            fields = {**{n: d for n, d in own.items() if n != p.name}, **fields}
            if fields.get("strategy") in CANDIDATE_STRATEGIES and p.name != "num_candidates":
                fields["num_candidates"] = DEFAULT_NUM_CANDIDATES
            try:
                DecodingConfig.from_dict(fields)
            except ConfigError as e:
                raise UserError(f"{p.where}: {p.name}: value {v!r} is invalid ({e})") from None
            except UserError as e:
                raise UserError(f"{p.where}: {p.name}: {e}") from None


# ==================================================================== against a task's defaults
def check_space_against(space: SearchSpace, base_fields: dict[str, Any]) -> None:
    """Refuse a space with a point that is invalid on top of a task's defaults
    (:func:`decodetune.tuning.space_caps.check_space_against`)."""
    from decodetune.tuning import space_caps

    space_caps.check_space_against(space, base_fields)
