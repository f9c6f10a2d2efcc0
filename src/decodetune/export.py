"""Export a DecodingConfig to the request parameters of other engines.

Each exporter works from what its target *supports*: an allow-list of the config fields it has an
equivalent for. Any other field that is *set* (in use: away from its neutral value and read by the
config's strategy, :func:`active`) raises :class:`ExportError` naming it; ``strict=False`` drops it with a
warning instead. So a field added to DecodingConfig later is refused by every exporter until one maps it,
never dropped in silence. Sampler order is part of the semantics: llama.cpp gets an explicit ``--samplers``
chain, and the engines whose order is fixed (vLLM, Ollama, transformers) are refused an order they cannot
reproduce.

The llama.cpp family (CLI flags, ``llama-server`` JSON, Ollama Modelfile) lives in
:mod:`decodetune.export_llama`; this module has the shared rules and transformers / vLLM / OpenAI.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from decodetune.config import SAMPLER_STAGE_FIELDS, TORCH_ONLY_STRATEGIES, DecodingConfig
from decodetune.config_checks import unread_fields
from decodetune.errors import UserError


class ExportError(UserError):
    """A set config field has no equivalent in the export target."""


#: Fields that shape the request itself rather than a sampler: never checked against an allow-list
#: (``strategy`` and ``sampler_order`` are checked on their own, ``num_beams`` belongs to the beam strategies).
STRUCTURAL = frozenset({"strategy", "max_new_tokens", "sampler_order", "num_beams", "num_candidates",
                        "mbr_utility", "rerank"})

#: The value of each optional field that means "off" (exporters and backends' capability checks share it).
#: Every field's default is its neutral value, so the table is every non-structural field with its default:
#: a field added to DecodingConfig is in it at once.
NEUTRAL: dict[str, Any] = {
    f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    for f in dataclasses.fields(DecodingConfig) if f.name not in STRUCTURAL}

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
BEAM_FIELDS = ("length_penalty", "early_stopping")
PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty")


def active(cfg: DecodingConfig, name: str) -> bool:
    """Whether field ``name`` changes what ``cfg`` generates (set away from neutral, and read by its strategy).

    ``penalty_last_n`` is the window of the three penalties, so it is in use only with one of them.
    """
    if name not in NEUTRAL:
        return False  # the structural fields: each exporter handles them itself
    if name in SAMPLING_FIELDS and not cfg.is_sampling:
        return False  # greedy/beam ignore the sampling fields
    if name in BEAM_FIELDS and not cfg.is_beam:
        return False
    if name in unread_fields(cfg):  # DRY details without DRY, the samplers mirostat replaces, ...
        return False
    if name == "penalty_last_n" and not any(getattr(cfg, p) != NEUTRAL[p] for p in PENALTIES):
        return False
    return getattr(cfg, name) != NEUTRAL[name]


def set_fields(cfg: DecodingConfig) -> list[str]:
    """The fields in use in ``cfg`` (see :func:`active`), in field order."""
    return [name for name in NEUTRAL if active(cfg, name)]


def unsupported_field(cfg: DecodingConfig, name: str, target: str, strict: bool, why: str = "") -> None:
    """Refuse field ``name`` for ``target`` (ExportError), or with ``strict=False`` warn that it is dropped."""
    value = getattr(cfg, name)
    shown = f"{value:.4g}" if isinstance(value, float) else repr(value)  # a tuned 0.635482199008357 reads 0.6355
    msg = f"{name}={shown} has no equivalent in {target}{why}"
    if strict:
        raise ExportError(f"{name}: {msg} (use strict=False to drop it)")
    warnings.warn(f"dropped {msg}", stacklevel=3)


def refuse_unsupported(cfg: DecodingConfig, target: str, supported: frozenset[str], strict: bool,
                       why: dict[str, str] | None = None) -> None:
    """Refuse (or drop) every field in use that ``target`` has no equivalent for: ``supported`` is its allow-list."""
    for name in set_fields(cfg):
        if name not in supported:
            unsupported_field(cfg, name, target, strict, (why or {}).get(name, ""))


def engine_strategy(cfg: DecodingConfig, target: str, strict: bool, beams: bool = False,
                    torch_only: bool = False) -> DecodingConfig:
    """The config an engine strategy of ``target`` runs, or ExportError naming ``strategy``.

    Candidate strategies are refused, or dropped to the sampling config their candidates are drawn with.
    contrastive / diverse_beam (torch only, unless ``torch_only``: transformers runs them with Hub code) are
    refused, or dropped to greedy / beam. Without ``beams``, beam
    strategies are refused, or dropped to what the rest of the config says (greedy, or sampling for
    beam_sample).
    """
    cfg = _drop_selection(cfg, target, strict)
    if cfg.strategy in TORCH_ONLY_STRATEGIES and not torch_only:
        unsupported_field(cfg, "strategy", target, strict, " (it runs on the torch engine only)")
        cfg = (cfg.replace(strategy="greedy", penalty_alpha=0.0) if cfg.strategy == "contrastive"
               else cfg.replace(strategy="beam", num_beam_groups=1, diversity_penalty=0.0))
    if cfg.is_beam and not beams:
        unsupported_field(cfg, "strategy", target, strict, " (it has no beam search)")
    return cfg


def _drop_selection(cfg: DecodingConfig, target: str, strict: bool) -> DecodingConfig:
    """A candidate strategy (self_consistency, mbr, best_of_n) has no engine equivalent: refused, or with
    ``strict=False`` dropped to the sampling config its candidates are drawn with (one sequence)."""
    if not cfg.is_candidate:
        return cfg
    unsupported_field(cfg, "strategy", target, strict, f" (it samples num_candidates={cfg.num_candidates} "
                                                       "and selects one; no engine does the selection)")
    return cfg.replace(strategy="sample", num_candidates=1)


def stage_active(cfg: DecodingConfig, stage: str) -> bool:
    """Whether a sampler-order stage (``temperature``, ``top_k``, ..., ``xtc``) is in use in ``cfg``."""
    return any(active(cfg, name) for name in SAMPLER_STAGE_FIELDS.get(stage, (stage,)))


def order_matters(cfg: DecodingConfig, fixed: tuple[str, ...]) -> bool:
    """True if the config's order of *active* samplers differs from a target's fixed order."""
    mine = [s for s in cfg.full_sampler_order if stage_active(cfg, s)]
    theirs = [s for s in fixed if stage_active(cfg, s)]
    if set(mine) != set(theirs):
        return False  # missing samplers are reported separately
    # temperature before/after a truncation only matters for truncations that read probabilities
    # of the *tempered* distribution (all but top_k); compare the order of the rest.
    return [s for s in mine if s != "top_k"] != [s for s in theirs if s != "top_k"]


# ---------------------------------------------------------------------------------------------- transformers
#: GenerationConfig has these (``logit_bias`` as single-token ``sequence_bias``). ``seed`` is accepted and
#: not written: transformers seeds through ``torch.manual_seed``, outside GenerationConfig.
HF_FIELDS = frozenset({"min_new_tokens", "stop", *SAMPLING_FIELDS, "repetition_penalty", "no_repeat_ngram_size",
                       *BEAM_FIELDS, "num_return_sequences", "seed", "logit_bias", "penalty_alpha",
                       "num_beam_groups", "diversity_penalty"})
_HF_WHY = {"presence_penalty": " (transformers has repetition_penalty only)",
           "frequency_penalty": " (transformers has repetition_penalty only)",
           "bad_words": " (its bad_words_ids are token ids; the strings need the model's tokenizer)",
           "stop_token_ids": " (its eos_token_id would replace the model's own EOS ids)",
           "top_logprobs": " (generate() returns scores with output_scores, not through GenerationConfig)"}
#: transformers 5 moved these strategies to Hub code that ``generate(..., trust_remote_code=True)`` loads.
HF_HUB_CODE = {"contrastive": "transformers-community/contrastive-search",
               "diverse_beam": "transformers-community/group-beam-search"}


def hf_requirements(cfg: DecodingConfig) -> list[str]:
    """What running ``to_hf(cfg)`` in transformers needs beyond the GenerationConfig (empty for most)."""
    repo = HF_HUB_CODE.get(cfg.strategy)
    if repo is None:
        return []
    return [f"strategy {cfg.strategy!r}: transformers runs it with Hub code ({repo}); "
            "call generate(..., trust_remote_code=True)"]


def to_hf(cfg: DecodingConfig, strict: bool = True) -> dict[str, Any]:
    """``transformers.GenerationConfig`` kwargs (transformers' order is our default order)."""
    cfg = engine_strategy(cfg, "transformers", strict, beams=True, torch_only=True)
    refuse_unsupported(cfg, "transformers", HF_FIELDS, strict, _HF_WHY)
    if order_matters(cfg, SAMPLING_FIELDS):
        unsupported_field(cfg, "sampler_order", "transformers", strict, " (its sampler order is fixed)")
    out: dict[str, Any] = {"do_sample": cfg.is_sampling, "num_beams": cfg.num_beams,
                           "max_new_tokens": cfg.max_new_tokens}
    if cfg.min_new_tokens:
        out["min_new_tokens"] = cfg.min_new_tokens
    if cfg.stop:
        out["stop_strings"] = list(cfg.stop)
    if cfg.is_sampling:
        out.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        out.update({name: getattr(cfg, name) for name in SAMPLING_FIELDS[3:] if active(cfg, name)})
    for name in ("repetition_penalty", "no_repeat_ngram_size"):
        if active(cfg, name):
            out[name] = getattr(cfg, name)
    if active(cfg, "logit_bias"):  # one-token sequences: an additive bias on that token's logit
        out["sequence_bias"] = [[[token], bias] for token, bias in sorted(cfg.logit_bias.items())]
    if cfg.is_beam:
        out.update(length_penalty=cfg.length_penalty, early_stopping=cfg.early_stopping)
    if cfg.strategy == "contrastive":
        out.update(penalty_alpha=cfg.penalty_alpha, top_k=cfg.top_k)
    if cfg.strategy == "diverse_beam":
        out.update(num_beam_groups=cfg.num_beam_groups, diversity_penalty=cfg.diversity_penalty)
    if cfg.num_return_sequences > 1:
        out["num_return_sequences"] = cfg.num_return_sequences
    return out


# ---------------------------------------------------------------------------------------------- vLLM
#: vLLM v1 applies penalties, then temperature, then min_p, then top_k/top_p.
_VLLM_ORDER = ("temperature", "min_p", "top_k", "top_p")
VLLM_FIELDS = frozenset({"min_new_tokens", "stop", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                         "presence_penalty", "frequency_penalty", "seed", "num_return_sequences", "logit_bias",
                         "bad_words", "stop_token_ids", "ignore_eos", "top_logprobs"})


def to_vllm(cfg: DecodingConfig, strict: bool = True) -> dict[str, Any]:
    """``vllm.SamplingParams`` kwargs. vLLM's SamplingParams has no beam search."""
    cfg = engine_strategy(cfg, "vLLM SamplingParams", strict)
    refuse_unsupported(cfg, "vLLM", VLLM_FIELDS, strict)
    if order_matters(cfg, _VLLM_ORDER + SAMPLING_FIELDS[4:]):
        unsupported_field(cfg, "sampler_order", "vLLM", strict, " (vLLM applies min_p before top_k/top_p)")
    out: dict[str, Any] = {"max_tokens": cfg.max_new_tokens, "n": cfg.num_return_sequences}
    if cfg.is_sampling:
        out.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k if cfg.top_k else -1,
                   min_p=cfg.min_p)
    else:
        out["temperature"] = 0.0
    if cfg.min_new_tokens:
        out["min_tokens"] = cfg.min_new_tokens
    if cfg.stop:
        out["stop"] = list(cfg.stop)
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "logit_bias", "bad_words",
                 "stop_token_ids", "ignore_eos"):
        if getattr(cfg, name) != NEUTRAL[name]:
            value = getattr(cfg, name)
            out[name] = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value
    if cfg.top_logprobs:
        out["logprobs"] = cfg.top_logprobs
    return out


# ---------------------------------------------------------------------------------------------- OpenAI
OPENAI_FIELDS = frozenset({"stop", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed",
                           "num_return_sequences", "logit_bias", "top_logprobs"})
#: the OpenAI API's limits
OPENAI_MAX_STOPS = 4
OPENAI_MAX_TOP_LOGPROBS = 20


def to_openai(cfg: DecodingConfig, strict: bool = True) -> dict[str, Any]:
    """OpenAI chat/completions request parameters (temperature 0 for greedy)."""
    cfg = engine_strategy(cfg, "the OpenAI API", strict)
    refuse_unsupported(cfg, "the OpenAI API", OPENAI_FIELDS, strict)
    if len(cfg.stop) > OPENAI_MAX_STOPS:
        unsupported_field(cfg, "stop", "the OpenAI API", strict, f" (at most {OPENAI_MAX_STOPS} stop strings)")
    if cfg.top_logprobs > OPENAI_MAX_TOP_LOGPROBS:
        unsupported_field(cfg, "top_logprobs", "the OpenAI API", strict, f" (at most {OPENAI_MAX_TOP_LOGPROBS})")
    out: dict[str, Any] = {"max_tokens": cfg.max_new_tokens}
    out["temperature"] = cfg.temperature if cfg.is_sampling else 0.0
    if cfg.is_sampling and cfg.top_p != 1.0:
        out["top_p"] = cfg.top_p
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(cfg, name):
            out[name] = getattr(cfg, name)
    if cfg.stop:
        out["stop"] = list(cfg.stop[:OPENAI_MAX_STOPS])
    if cfg.num_return_sequences > 1:
        out["n"] = cfg.num_return_sequences
    if cfg.seed is not None:
        out["seed"] = cfg.seed
    if cfg.logit_bias:  # the API's keys are token ids as strings
        out["logit_bias"] = {str(t): b for t, b in sorted(cfg.logit_bias.items())}
    if 0 < cfg.top_logprobs <= OPENAI_MAX_TOP_LOGPROBS:
        out.update(logprobs=True, top_logprobs=cfg.top_logprobs)
    return out


# ---------------------------------------------------------------------------------------------- llama.cpp family
def to_llamacpp(cfg: DecodingConfig, strict: bool = True) -> list[str]:
    """llama.cpp flags (``llama-cli`` / ``llama-server``); see :mod:`decodetune.export_llama`."""
    from decodetune.export_llama import llamacpp_flags

    return llamacpp_flags(cfg, strict)


def to_llamacpp_server(cfg: DecodingConfig, strict: bool = True) -> dict[str, Any]:
    """The sampling fields of a ``llama-server`` request body; see :mod:`decodetune.export_llama`."""
    from decodetune.export_llama import llamacpp_server_body

    return llamacpp_server_body(cfg, strict)


def to_ollama(cfg: DecodingConfig, strict: bool = True, base: str = "MODEL") -> str:
    """An Ollama Modelfile (``FROM base`` and ``PARAMETER`` lines); see :mod:`decodetune.export_llama`."""
    from decodetune.export_llama import ollama_modelfile

    return ollama_modelfile(cfg, strict, base)
