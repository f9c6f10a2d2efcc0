"""`DecodingConfig`: every knob of how a model decodes, validated, serialisable and exportable.

Field names follow transformers' ``GenerationConfig`` where it has them. Penalties follow vLLM's
semantics: ``repetition_penalty`` looks at prompt and output tokens (as transformers does),
``presence_penalty`` and ``frequency_penalty`` look at output tokens only and lie in [-2, 2] (as in vLLM
and OpenAI). Every float field must be finite.
The exporters live in :mod:`decodetune.export`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from decodetune import config_checks
from decodetune.config_checks import DEFAULT_DRY_BREAKERS
from decodetune.errors import ConfigError, UserError

#: Strategies the engines run themselves.
ENGINE_STRATEGIES = ("greedy", "beam", "sample", "beam_sample", "contrastive", "diverse_beam")
#: Strategies that need hidden states or beam control: only the torch engine runs them.
TORCH_ONLY_STRATEGIES = ("contrastive", "diverse_beam")
#: Strategies that sample ``num_candidates`` sequences per prompt (with the config's own sampling fields)
#: and select one (:mod:`decodetune.evaluation.candidates`); no serving engine has them.
CANDIDATE_STRATEGIES = ("self_consistency", "mbr", "best_of_n")
STRATEGIES = ENGINE_STRATEGIES + CANDIDATE_STRATEGIES
#: Built-in MBR utilities (``mbr_utility``); a ``pkg.module:function(hypothesis, reference) -> float`` also works.
MBR_UTILITIES = ("chrf", "bleu", "rouge_l", "token_f1")
#: Built-in best-of-n rerankers (``rerank``); a ``pkg.module:function(prompt, candidates) -> list[float]`` also works.
RERANKERS = ("mean_logprob",)

#: Default order of the distribution-shaping samplers (transformers' order). Penalties and
#: ``no_repeat_ngram_size`` always run before these; llama.cpp puts temperature last instead.
DEFAULT_SAMPLER_ORDER = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                         "top_n_sigma", "xtc")
#: The config fields each sampler-order name stands for (the others are named after their one field).
SAMPLER_STAGE_FIELDS = {"temperature": ("temperature", "dynatemp_range"), "xtc": ("xtc_probability",)}

ALIASES = {"beam_size": "num_beams"}


@dataclass
class DecodingConfig:
    """How to decode. Unset sampling fields are neutral (``top_k=0``, ``top_p=1.0``... mean off).

    ``strategy`` is one of greedy | beam | sample | beam_sample | contrastive | diverse_beam |
    self_consistency | mbr | best_of_n. contrastive (Su et al. 2022: ``penalty_alpha``, ``top_k``) and
    diverse_beam (Vijayakumar et al.: ``num_beam_groups``, ``diversity_penalty``) run on the torch engine only.
    ``temperature=0`` with ``sample`` is greedy decoding (the limit of softmax(logits / T) as T -> 0).
    ``beam`` and ``beam_sample`` need ``num_beams >= 2``; the other strategies take ``num_beams = 1``.

    The candidate strategies (self_consistency, mbr, best_of_n) draw ``num_candidates >= 2`` samples per
    prompt with the config's own sampling fields (:func:`candidate_config`) and return one:
    self_consistency the majority answer, mbr the candidate with the highest mean ``mbr_utility`` against
    the others, best_of_n the best by ``rerank``. At temperature 0 every candidate is the greedy one.

    ``sampler_order`` is the order in which the distribution samplers run (default
    :data:`DEFAULT_SAMPLER_ORDER`, transformers' order; empty means the default). It may name only some
    samplers, but then it must name every sampler the config uses (set away from its neutral value):
    ``["top_p"]`` with ``temperature=0.7`` is refused rather than guessing whether temperature goes before
    or after top_p. The unnamed samplers are neutral, so where they run (after the named ones) changes nothing.
    """

    strategy: str = "greedy"
    # lengths and stops
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    # sampling
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    # penalties
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    penalty_last_n: int = -1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: list[str] = field(default_factory=lambda: list(DEFAULT_DRY_BREAKERS))
    # llama.cpp's samplers beyond transformers'
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    top_n_sigma: float = -1.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    adaptive_target: float = -1.0
    adaptive_decay: float = 0.9
    # token-level controls (vLLM's names)
    logit_bias: dict[int, float] = field(default_factory=dict)
    bad_words: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    top_logprobs: int = 0
    # contrastive search and diverse beam search
    penalty_alpha: float = 0.0
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    # beams
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    # candidates (self_consistency, mbr, best_of_n)
    num_candidates: int = 1
    mbr_utility: str = "chrf"
    rerank: str = "mean_logprob"
    # reproducibility and order
    seed: int | None = None
    sampler_order: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLER_ORDER))

    def __post_init__(self) -> None:
        self._coerce()
        self.validate()

    # ------------------------------------------------------------------ validation
    def _coerce(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _INT_FIELDS and not (v is None and f.name in _OPTIONAL_FIELDS):
                setattr(self, f.name, _as_int(f.name, v))
            elif f.name in _FLOAT_FIELDS:
                setattr(self, f.name, _as_float(f.name, v))
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list | tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError("stop", "must be a list of non-empty strings")
        self.stop = list(self.stop)
        if isinstance(self.sampler_order, str):
            self.sampler_order = [s.strip() for s in self.sampler_order.replace(";", ",").split(",") if s.strip()]
        if not isinstance(self.sampler_order, list | tuple):
            raise ConfigError("sampler_order", f"must be a list of sampler names, got {self.sampler_order!r}")
        self.sampler_order = list(self.sampler_order)
        for name in ("mbr_utility", "rerank"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise ConfigError(name, f"must be a name or pkg.module:function, got {v!r}")
            setattr(self, name, v.strip())
        config_checks.coerce(self)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        if self.strategy not in STRATEGIES:
            raise ConfigError("strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError("min_new_tokens", f"must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ConfigError("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ConfigError("min_p", f"must be in [0, 1], got {self.min_p}")
        if not 0 < self.typical_p <= 1:
            raise ConfigError("typical_p", f"must be in (0, 1], got {self.typical_p}")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):  # vLLM's and OpenAI's range
            if not -2 <= getattr(self, name) <= 2:
                raise ConfigError(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError("no_repeat_ngram_size", f"must be >= 0, got {self.no_repeat_ngram_size}")
        if self.num_beams < 1:
            raise ConfigError("num_beams", f"must be >= 1, got {self.num_beams}")
        if self.is_beam and self.num_beams < 2:
            # one beam is not greedy/sampling (it keeps the better of 2 candidates) yet exports as if it were
            raise ConfigError("num_beams", f"must be >= 2 for strategy {self.strategy!r}, got {self.num_beams} "
                                           f"(one beam is strategy {'sample' if self.is_sampling else 'greedy'})")
        if self.num_beams > 1 and not self.is_beam:
            raise ConfigError("num_beams", f"is {self.num_beams} but strategy {self.strategy!r} has no beams")
        if self.num_return_sequences < 1:
            raise ConfigError("num_return_sequences", f"must be >= 1, got {self.num_return_sequences}")
        if self.is_beam and self.num_return_sequences > self.num_beams:
            raise ConfigError(
                "num_return_sequences",
                f"({self.num_return_sequences}) must be <= num_beams ({self.num_beams})",
            )
        if self.strategy == "greedy" and self.num_return_sequences > 1:
            raise ConfigError("num_return_sequences", "greedy decoding returns one sequence; use sample or beam")
        self._check_candidates()
        config_checks.validate(self)
        # by identity: 1 == True, and the beam search tests ``early_stopping is True``
        if not (self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never"):
            raise ConfigError("early_stopping", f"must be true, false or 'never', got {self.early_stopping!r}")
        self._check_sampler_order()
        if self.seed is not None and self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")

    def _check_candidates(self) -> None:
        """``num_candidates`` belongs to the candidate strategies; their selectors must be known names or
        ``pkg.module:function`` (imported only when the selection runs, so a config file stays portable)."""
        if self.num_candidates < 1:
            raise ConfigError("num_candidates", f"must be >= 1, got {self.num_candidates}")
        if self.is_candidate:
            if self.num_candidates < 2:
                raise ConfigError("num_candidates", f"must be >= 2 for strategy {self.strategy!r} (it selects one "
                                                    f"of num_candidates samples), got {self.num_candidates}")
            if self.num_return_sequences > 1:
                raise ConfigError("num_return_sequences", f"strategy {self.strategy!r} returns the one selected "
                                                          f"candidate, got {self.num_return_sequences}")
        elif self.num_candidates > 1:
            raise ConfigError("num_candidates", f"is {self.num_candidates} but strategy {self.strategy!r} selects no "
                                                f"candidates (use {', '.join(CANDIDATE_STRATEGIES)})")
        for name, known in (("mbr_utility", MBR_UTILITIES), ("rerank", RERANKERS)):
            value = getattr(self, name)
            if value not in known and not _FUNCTION_RE.fullmatch(value):
                raise ConfigError(name, f"must be one of {', '.join(known)} or pkg.module:function, got {value!r}")

    def _check_sampler_order(self) -> None:
        """Known names, each once; and a partial order must name every sampler the config uses.

        Where an omitted sampler that is in use should go is a guess (before the named ones? after?),
        so it is refused; omitted samplers at their neutral value do nothing wherever they sit.
        """
        unknown = [s for s in self.sampler_order if s not in DEFAULT_SAMPLER_ORDER]
        if unknown:
            known = ", ".join(DEFAULT_SAMPLER_ORDER)
            raise ConfigError("sampler_order", f"unknown sampler {unknown[0]!r}; known: {known}")
        if len(set(self.sampler_order)) != len(self.sampler_order):
            raise ConfigError("sampler_order", "lists a sampler twice")
        if not self.sampler_order or not self.is_sampling:
            return
        unplaced = [s for s in DEFAULT_SAMPLER_ORDER if s not in self.sampler_order and stage_in_use(self, s)]
        if unplaced:
            name = SAMPLER_STAGE_FIELDS.get(unplaced[0], (unplaced[0],))[0]
            raise ConfigError("sampler_order", (
                f"names {', '.join(self.sampler_order)} but not {unplaced[0]} ({name}={getattr(self, name)!r}), "
                f"which is in use; name every sampler in use (e.g. "
                f"{','.join(self.sampler_order + unplaced)}), or none for the default order"))

    # ------------------------------------------------------------------ derived views
    @property
    def is_beam(self) -> bool:
        """True for beam, beam_sample and diverse_beam."""
        return self.strategy in ("beam", "beam_sample", "diverse_beam")

    @property
    def is_candidate(self) -> bool:
        """True for the strategies that select one of ``num_candidates`` samples."""
        return self.strategy in CANDIDATE_STRATEGIES

    @property
    def is_sampling(self) -> bool:
        """True when tokens are drawn at random (temperature 0 makes sampling greedy).

        The candidate strategies sample their candidates, so they count as sampling at temperature > 0.
        """
        return self.strategy in _SAMPLED and self.temperature > 0

    @property
    def full_sampler_order(self) -> list[str]:
        """``sampler_order`` with the omitted samplers (all neutral, see the class doc) appended in the default
        order; the default order when ``sampler_order`` is empty."""
        return list(self.sampler_order) + [s for s in DEFAULT_SAMPLER_ORDER if s not in self.sampler_order]

    def ignored_fields(self) -> list[str]:
        """Fields set away from their default that this config never reads, in field order.

        A config that does not sample (greedy, beam, or sampling at temperature 0) reads no sampler
        field, ``sampler_order`` or ``seed`` (temperature 0 itself is read: it is what makes it greedy);
        only the beam strategies read ``length_penalty`` and ``early_stopping``; only mbr reads
        ``mbr_utility`` and only best_of_n ``rerank``.
        """
        unread: set[str] = set()
        if not self.is_sampling:
            unread |= {*DEFAULT_SAMPLER_ORDER, "sampler_order", "seed"}
            if self.strategy in _SAMPLED:
                unread.discard("temperature")
            if self.strategy == "contrastive":
                unread.discard("top_k")  # its candidate set
        unread |= config_checks.unread_fields(self)
        if not self.is_beam:
            unread |= {"length_penalty", "early_stopping"}
        if self.strategy != "mbr":
            unread.add("mbr_utility")
        if self.strategy != "best_of_n":
            unread.add("rerank")
        return [f.name for f in dataclasses.fields(self) if f.name in unread and _is_set(self, f.name)]

    def ignored_field_warnings(self) -> list[str]:
        """One line per :meth:`ignored_fields` entry, e.g. ``temperature is ignored by strategy greedy``."""
        who = f"strategy {self.strategy}"
        if self.strategy in _SAMPLED and not self.is_sampling:
            who += " at temperature 0"
        return [f"{name} is ignored by {who}" for name in self.ignored_fields()]

    def replace(self, **changes: Any) -> DecodingConfig:
        """A validated copy with some fields changed (aliases accepted)."""
        d = self.to_dict()
        d.update(_field_kwargs(changes, "replace()"))
        return type(self)(**d)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self, only_set: bool = False) -> dict[str, Any]:
        """Plain dict of all fields, or only those that differ from the defaults."""
        d = dataclasses.asdict(self)
        if only_set:
            defaults = dataclasses.asdict(DecodingConfig())
            d = {k: v for k, v in d.items() if v != defaults[k] or k == "strategy"}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DecodingConfig:
        """Build from a dict; ``beam_size`` is an alias of ``num_beams``; unknown keys are an error."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a mapping of config fields, got {type(data).__name__}")
        return cls(**_field_kwargs(data, source))

    def to_json(self, only_set: bool = False) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(only_set=only_set), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> DecodingConfig:
        """Parse JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}:{e.lineno}: malformed JSON ({e.msg})") from None
        return cls.from_dict(data, source=source)

    def to_yaml(self, only_set: bool = False) -> str:
        """YAML text of :meth:`to_dict`."""
        return yaml.safe_dump(self.to_dict(only_set=only_set), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, source: str = "config") -> DecodingConfig:
        """Parse YAML text."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise UserError(f"{source}{where}: malformed YAML") from None
        return cls.from_dict(data or {}, source=source)

    @classmethod
    def load(cls, path: str | Path) -> DecodingConfig:
        """Load a ``.json``, ``.yaml`` or ``.yml`` file."""
        from decodetune.io import read_text

        text = read_text(path)
        if str(path).endswith((".yaml", ".yml")):
            return cls.from_yaml(text, source=str(path))
        return cls.from_json(text, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write JSON or YAML (by suffix) atomically."""
        from decodetune.io import atomic_write

        with atomic_write(path) as f:
            f.write(self.to_yaml() if str(path).endswith((".yaml", ".yml")) else self.to_json() + "\n")

    # ------------------------------------------------------------------ exporters
    def to_hf(self, strict: bool = True) -> dict[str, Any]:
        """kwargs for ``transformers.GenerationConfig`` / ``model.generate``."""
        from decodetune.export import to_hf

        return to_hf(self, strict=strict)

    def to_vllm(self, strict: bool = True) -> dict[str, Any]:
        """kwargs for ``vllm.SamplingParams``."""
        from decodetune.export import to_vllm

        return to_vllm(self, strict=strict)

    def to_llamacpp(self, strict: bool = True) -> list[str]:
        """llama.cpp CLI flags (``llama-cli`` / ``llama-server``)."""
        from decodetune.export import to_llamacpp

        return to_llamacpp(self, strict=strict)

    def to_openai(self, strict: bool = True) -> dict[str, Any]:
        """OpenAI-style chat/completions request parameters."""
        from decodetune.export import to_openai

        return to_openai(self, strict=strict)


def candidate_config(cfg: DecodingConfig) -> DecodingConfig:
    """What the engine runs for ``cfg``: for a candidate strategy, the same config with strategy ``sample``
    and ``num_return_sequences = num_candidates`` (the engines that share prefills decode a prompt's n
    sequences from one prefill); any other config unchanged."""
    if not cfg.is_candidate:
        return cfg
    return cfg.replace(strategy="sample", num_return_sequences=cfg.num_candidates, num_candidates=1,
                       mbr_utility=_DEFAULTS["mbr_utility"], rerank=_DEFAULTS["rerank"])


def stage_in_use(cfg: DecodingConfig, stage: str) -> bool:
    """Whether a sampler-order stage (``temperature``, ``top_k``, ..., ``xtc``) does anything in ``cfg``."""
    return any(_is_set(cfg, name) for name in SAMPLER_STAGE_FIELDS.get(stage, (stage,)))


def _is_set(cfg: DecodingConfig, name: str) -> bool:
    """Whether a field differs from its default (for the samplers: whether it is in use)."""
    return getattr(cfg, name) != _DEFAULTS[name]


def _field_kwargs(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` keyed by field names: aliases resolved, unknown keys and a field given twice refused."""
    names = [f.name for f in dataclasses.fields(DecodingConfig)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = ALIASES.get(key, key)
        if name not in names:
            raise ConfigError(key, f"unknown config key in {source}; known keys: {', '.join(sorted(names))}")
        if name in kwargs:
            raise ConfigError(key, f"given twice in {source} (beam_size is an alias of num_beams)")
        kwargs[name] = value
    return kwargs


_INT_FIELDS = {"max_new_tokens", "min_new_tokens", "top_k", "no_repeat_ngram_size", "num_beams",
               "num_return_sequences", "num_candidates", "seed", *config_checks.INT_FIELDS}
#: Strategies whose tokens are drawn at random when temperature > 0.
_SAMPLED = ("sample", "beam_sample", *CANDIDATE_STRATEGIES)
#: ``pkg.module:function`` (a dotted module path, a colon, a function name).
_FUNCTION_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
#: Fields where None is a value of its own (no seed: a fresh random one per call).
_OPTIONAL_FIELDS = {"seed"}
_FLOAT_FIELDS = {"temperature", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                 "repetition_penalty", "presence_penalty", "frequency_penalty", "length_penalty",
                 *config_checks.FLOAT_FIELDS}


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ConfigError(name, f"must be an integer, got {v!r}")
    if isinstance(v, int):
        return int(v)  # as is: a float round trip would round seeds above 2**53
    try:
        f = float(v)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ConfigError(name, f"must be an integer, got {v!r}")
    return int(f)


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ConfigError(name, f"must be a number, got {v!r}")
    try:
        f = float(v)
    except ValueError:
        raise ConfigError(name, f"must be a number, got {v!r}") from None
    if not math.isfinite(f):
        # no float field has a meaning at infinity, and inf * 0 or inf / inf turn logits into NaN
        raise ConfigError(name, f"must be a finite number, got {f}")
    return f


#: Default value of every field (the samplers' defaults are their neutral values).
_DEFAULTS: dict[str, Any] = {
    f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    for f in dataclasses.fields(DecodingConfig)}
