"""Coercion and validation of the :class:`~decodetune.config.DecodingConfig` fields taken from llama.cpp and
vLLM (DRY, XTC, top-nσ, mirostat, dynamic temperature, logit bias, bad words, penalty windows, logprobs,
EOS handling) and of the torch-only strategies (contrastive search, diverse beam search).

The names, defaults and neutral values are llama.cpp's (``common/common.h``) or vLLM's
(``SamplingParams``), so a user's existing settings mean the same here:

- ``dry_multiplier`` 0 (off), ``dry_base`` 1.75, ``dry_allowed_length`` 2, ``dry_penalty_last_n`` -1 (the
  whole context; 0 disables DRY), ``dry_sequence_breakers`` ``["\\n", ":", "\\"", "*"]``;
- ``xtc_probability`` 0 (off), ``xtc_threshold`` 0.1;
- ``top_n_sigma`` -1 (off; any value <= 0 is off);
- ``mirostat`` 0 / 1 / 2, ``mirostat_tau`` 5, ``mirostat_eta`` 0.1;
- ``dynatemp_range`` 0 (off), ``dynatemp_exponent`` 1;
- ``adaptive_target`` -1 (off; any value < 0 is off) or a probability in [0, 1], ``adaptive_decay`` 0.9 in
  [0, 0.99] (llama.cpp's adaptive-p, the last stage of the chain: it draws the token itself, like mirostat);
- ``penalty_last_n`` -1: the repetition, presence and frequency penalties look at the last n tokens of
  what they look at (-1 = all of it, 0 = the penalties are off), llama.cpp's ``repeat_last_n``;
- ``logit_bias`` {token id: bias in [-100, 100]} (OpenAI's and vLLM's range), ``bad_words`` (vLLM),
  ``stop_token_ids`` (vLLM), ``ignore_eos`` (vLLM), ``top_logprobs`` (vLLM ``logprobs=N``);
- ``penalty_alpha`` in [0, 1] (contrastive search, with ``top_k >= 2``), ``num_beam_groups`` and
  ``diversity_penalty > 0`` (diverse beam search; ``num_beams`` divisible by ``num_beam_groups``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from decodetune.errors import ConfigError

if TYPE_CHECKING:
    from decodetune.config import DecodingConfig

#: llama.cpp's default DRY sequence breakers.
DEFAULT_DRY_BREAKERS = ("\n", ":", '"', "*")
#: The bound of ``logit_bias`` values (OpenAI, vLLM).
LOGIT_BIAS_BOUND = 100.0

INT_FIELDS = frozenset({"dry_allowed_length", "dry_penalty_last_n", "mirostat", "penalty_last_n", "top_logprobs",
                        "num_beam_groups"})
FLOAT_FIELDS = frozenset({"dry_multiplier", "dry_base", "xtc_threshold", "xtc_probability", "top_n_sigma",
                          "mirostat_tau", "mirostat_eta", "dynatemp_range", "dynatemp_exponent", "penalty_alpha",
                          "diversity_penalty", "adaptive_target", "adaptive_decay"})
#: Fields that only shape the sampling distribution (unread when the config does not sample).
SAMPLING_ONLY = frozenset({"xtc_threshold", "xtc_probability", "top_n_sigma", "mirostat", "mirostat_tau",
                           "mirostat_eta", "dynatemp_range", "dynatemp_exponent", "adaptive_target", "adaptive_decay"})
#: What mirostat replaces: llama.cpp's mirostat chains are temperature -> mirostat (+ logit bias), nothing else
#: (adaptive-p, the other token-selecting stage, included).
MIROSTAT_REPLACES = frozenset({"top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                               "xtc_threshold", "xtc_probability", "top_n_sigma", "dynatemp_range",
                               "dynatemp_exponent", "adaptive_target", "adaptive_decay"})
#: llama.cpp clamps adaptive-p's decay to this (its history is about 1 / (1 - decay) tokens).
ADAPTIVE_DECAY_MAX = 0.99
DRY_DETAILS = frozenset({"dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers"})


def coerce(cfg: DecodingConfig) -> None:
    """Normalise the container fields in place (JSON gives logit_bias keys as strings)."""
    cfg.dry_sequence_breakers = _strings(cfg.dry_sequence_breakers, "dry_sequence_breakers", allow_empty=False)
    cfg.bad_words = _strings(cfg.bad_words, "bad_words", allow_empty=False)
    cfg.stop_token_ids = _token_ids(cfg.stop_token_ids, "stop_token_ids")
    cfg.logit_bias = _logit_bias(cfg.logit_bias)
    if not isinstance(cfg.ignore_eos, bool):
        raise ConfigError("ignore_eos", f"must be true or false, got {cfg.ignore_eos!r}")
    if cfg.top_n_sigma <= 0:
        cfg.top_n_sigma = -1.0  # llama.cpp: any n <= 0 is off; one spelling of "off"
    if cfg.adaptive_target < 0:
        cfg.adaptive_target = -1.0  # llama.cpp: any negative target is off


def validate(cfg: DecodingConfig) -> None:
    """Raise :class:`ConfigError` naming the first invalid field."""
    _check_dry(cfg)
    for name in ("xtc_threshold", "xtc_probability"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(name, f"must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.mirostat not in (0, 1, 2):
        raise ConfigError("mirostat", f"must be 0 (off), 1 or 2, got {cfg.mirostat}")
    for name in ("mirostat_tau", "mirostat_eta"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(name, f"must be > 0, got {getattr(cfg, name)}")
    if cfg.dynatemp_range < 0:
        raise ConfigError("dynatemp_range", f"must be >= 0 (0 disables it), got {cfg.dynatemp_range}")
    if cfg.dynatemp_exponent <= 0:
        raise ConfigError("dynatemp_exponent", f"must be > 0, got {cfg.dynatemp_exponent}")
    if cfg.adaptive_target > 1:
        raise ConfigError("adaptive_target", f"must be a probability in [0, 1] (< 0 = off), got {cfg.adaptive_target}")
    if not 0 <= cfg.adaptive_decay <= ADAPTIVE_DECAY_MAX:
        # llama.cpp clamps silently; refusing says what the user would otherwise not get
        raise ConfigError("adaptive_decay", f"must be in [0, {ADAPTIVE_DECAY_MAX}], got {cfg.adaptive_decay}")
    if cfg.penalty_last_n < -1:
        raise ConfigError("penalty_last_n", f"must be -1 (all tokens), 0 (penalties off) or a window >= 1, "
                                            f"got {cfg.penalty_last_n}")
    if cfg.top_logprobs < 0:
        raise ConfigError("top_logprobs", f"must be >= 0 (0 disables it), got {cfg.top_logprobs}")
    _check_contrastive(cfg)
    _check_diverse_beam(cfg)


def unread_fields(cfg: DecodingConfig) -> set[str]:
    """The fields of this module (and the samplers mirostat replaces) that ``cfg`` never reads."""
    unread: set[str] = set()
    if not cfg.is_sampling:
        unread |= SAMPLING_ONLY
    if cfg.mirostat:
        unread |= MIROSTAT_REPLACES
    else:
        unread |= {"mirostat_tau", "mirostat_eta"}
    if cfg.dry_multiplier == 0:
        unread |= DRY_DETAILS
    if cfg.xtc_probability == 0:
        unread.add("xtc_threshold")
    if cfg.dynatemp_range == 0:
        unread.add("dynatemp_exponent")
    if cfg.adaptive_target < 0:
        unread.add("adaptive_decay")
    if cfg.strategy != "contrastive":
        unread.add("penalty_alpha")
    if cfg.strategy != "diverse_beam":
        unread |= {"num_beam_groups", "diversity_penalty"}
    return unread


def _check_dry(cfg: DecodingConfig) -> None:
    if cfg.dry_multiplier < 0:
        raise ConfigError("dry_multiplier", f"must be >= 0 (0 disables DRY), got {cfg.dry_multiplier}")
    if cfg.dry_base < 1:
        raise ConfigError("dry_base", f"must be >= 1, got {cfg.dry_base}")
    if cfg.dry_allowed_length < 1:
        raise ConfigError("dry_allowed_length", f"must be >= 1, got {cfg.dry_allowed_length}")
    if cfg.dry_penalty_last_n < -1:
        raise ConfigError("dry_penalty_last_n", f"must be -1 (the whole context), 0 (off) or a window >= 1, "
                                                f"got {cfg.dry_penalty_last_n}")


def _check_contrastive(cfg: DecodingConfig) -> None:
    if not 0 <= cfg.penalty_alpha <= 1:
        raise ConfigError("penalty_alpha", f"must be in [0, 1], got {cfg.penalty_alpha}")
    if cfg.strategy == "contrastive" and cfg.top_k < 2:
        raise ConfigError("top_k", f"must be >= 2 for strategy 'contrastive' (its candidate set), got {cfg.top_k}")


def _check_diverse_beam(cfg: DecodingConfig) -> None:
    if cfg.num_beam_groups < 1:
        raise ConfigError("num_beam_groups", f"must be >= 1, got {cfg.num_beam_groups}")
    if cfg.diversity_penalty < 0:
        raise ConfigError("diversity_penalty", f"must be >= 0, got {cfg.diversity_penalty}")
    if cfg.strategy != "diverse_beam":
        return
    if cfg.num_beam_groups < 2:
        raise ConfigError("num_beam_groups", f"must be >= 2 for strategy 'diverse_beam', got {cfg.num_beam_groups}")
    if cfg.num_beams % cfg.num_beam_groups:
        raise ConfigError("num_beam_groups", f"({cfg.num_beam_groups}) must divide num_beams ({cfg.num_beams})")
    if cfg.diversity_penalty <= 0:
        raise ConfigError("diversity_penalty", "must be > 0 for strategy 'diverse_beam' (at 0 every group "
                                               f"is the same beam search), got {cfg.diversity_penalty}")


def _strings(value: Any, name: str, allow_empty: bool) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(s, str) and (s or allow_empty) for s in value):
        raise ConfigError(name, f"must be a list of non-empty strings, got {value!r}")
    return list(value)


def _token_id(value: Any, name: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(name, f"token ids must be non-negative integers, got {value!r}")
    return value


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list | tuple):
        raise ConfigError(name, f"must be a list of token ids, got {value!r}")
    return [_token_id(v, name) for v in value]


def _logit_bias(value: Any) -> dict[int, float]:
    if not isinstance(value, dict):
        raise ConfigError("logit_bias", f"must be a mapping of token id to bias, got {value!r}")
    out: dict[int, float] = {}
    for key, bias in value.items():
        token = _token_id(key, "logit_bias")
        number = isinstance(bias, int | float) and not isinstance(bias, bool)
        if not number or not -LOGIT_BIAS_BOUND <= bias <= LOGIT_BIAS_BOUND:
            raise ConfigError("logit_bias", f"token {token}: bias must be a number in [-100, 100], got {bias!r}")
        out[token] = float(bias)
    return out
