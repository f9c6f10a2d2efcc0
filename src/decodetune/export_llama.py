"""Exports to the llama.cpp family: ``llama-cli`` / ``llama-server`` flags, the ``llama-server`` JSON body and
Ollama Modelfiles. The rules (allow-lists, refusals naming the field) are :mod:`decodetune.export`'s.

Flag spellings are llama.cpp's ``common/arg.cpp``; the chain they build is ``common_sampler_init``
(``common/sampling.cpp``): ``logit_bias`` first, then the ``--samplers`` list, then ``dist(seed)``; with
``--mirostat 1|2`` the chain is ``logit_bias -> temperature -> mirostat`` and nothing else, so penalties and
DRY set beside mirostat are refused rather than exported as if llama.cpp applied them.
"""

from __future__ import annotations

from typing import Any

from decodetune.config import DecodingConfig
from decodetune.config_checks import DEFAULT_DRY_BREAKERS
from decodetune.export import (
    PENALTIES,
    active,
    engine_strategy,
    order_matters,
    refuse_unsupported,
    stage_active,
    unsupported_field,
)

#: The llama.cpp samplers DecodingConfig has (the CLI); the server also returns n sequences and top-N probs.
LLAMACPP_FIELDS = frozenset({"stop", "temperature", "top_k", "top_p", "min_p", "typical_p", *PENALTIES,
                             "penalty_last_n", "seed", "dry_multiplier", "dry_base", "dry_allowed_length",
                             "dry_penalty_last_n", "dry_sequence_breakers", "xtc_threshold", "xtc_probability",
                             "top_n_sigma", "mirostat", "mirostat_tau", "mirostat_eta", "dynatemp_range",
                             "dynatemp_exponent", "adaptive_target", "adaptive_decay", "logit_bias", "ignore_eos"})
LLAMACPP_SERVER_FIELDS = LLAMACPP_FIELDS | {"num_return_sequences", "top_logprobs"}
_WHY = {"bad_words": " (llama.cpp bans tokens by id with logit_bias, not strings)",
        "stop_token_ids": " (llama.cpp stops on the vocabulary's end-of-generation tokens only)",
        "min_new_tokens": " (llama.cpp has no minimum length)",
        "top_logprobs": " (llama-cli prints no probabilities; llama-server's n_probs does)",
        "num_return_sequences": " (llama-cli generates one sequence)"}
#: ``--samplers`` names of the config's sampler-order stages (``common_sampler_types_from_names``).
CHAIN_NAMES = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
               "typical_p": "typ_p", "top_n_sigma": "top_n_sigma", "xtc": "xtc"}
#: Stages always written (their values are explicit, neutral included); the others only when in use.
_ALWAYS = ("temperature", "top_k", "top_p", "min_p", "typical_p")


def _llama_checks(cfg: DecodingConfig, target: str, fields: frozenset[str], strict: bool) -> DecodingConfig:
    cfg = engine_strategy(cfg, target, strict)
    refuse_unsupported(cfg, target, fields, strict, _WHY)
    if cfg.mirostat and cfg.is_sampling:  # llama.cpp's mirostat chain: logit_bias -> temperature -> mirostat
        for name in (*PENALTIES, "dry_multiplier"):
            if active(cfg, name):
                unsupported_field(cfg, name, target, strict, " with mirostat (its mirostat chain has no penalties)")
    if active(cfg, "dry_sequence_breakers") and "none" in cfg.dry_sequence_breakers:
        unsupported_field(cfg, "dry_sequence_breakers", target, strict, " (llama.cpp reads 'none' as no breakers)")
    return cfg


def chain(cfg: DecodingConfig, always_penalties: bool = False) -> list[str]:
    """The ``--samplers`` / ``"samplers"`` list: penalties, DRY, the config's sampler order, then adaptive-p
    (llama.cpp puts it last in place of ``dist`` whenever the list names it)."""
    head = ["penalties"] if always_penalties or any(active(cfg, p) for p in PENALTIES) else []
    if active(cfg, "dry_multiplier"):
        head.append("dry")
    tail = ["adaptive_p"] if active(cfg, "adaptive_target") else []
    return head + [CHAIN_NAMES[s] for s in cfg.full_sampler_order
                   if s in CHAIN_NAMES and (s in _ALWAYS or stage_active(cfg, s))] + tail


def _bias_flag(token: int, bias: float) -> str:
    """llama.cpp's ``TOKEN(+/-)BIAS`` (``15043+1``, ``15043-100``)."""
    return f"{token}{'-' if bias < 0 else '+'}{abs(bias):g}"


def llamacpp_flags(cfg: DecodingConfig, strict: bool = True) -> list[str]:
    """llama.cpp flags. The sampler chain order is exported with ``--samplers``."""
    cfg = _llama_checks(cfg, "llama.cpp", LLAMACPP_FIELDS, strict)
    flags = ["-n", str(cfg.max_new_tokens)]
    if not cfg.is_sampling:
        flags += ["--temp", "0"]  # llama.cpp's default chain then keeps only the (penalised) argmax
    else:
        flags += ["--temp", f"{cfg.temperature:g}", "--top-k", str(cfg.top_k), "--top-p", f"{cfg.top_p:g}",
                  "--min-p", f"{cfg.min_p:g}", "--typical", f"{cfg.typical_p:g}"]
        # penalties and dry are samplers of the --samplers list: a chain without them applies neither
        flags += ["--samplers", ";".join(chain(cfg))]
    flags += _shaping_flags(cfg)
    if any(active(cfg, p) for p in PENALTIES):
        # -1: the whole context (llama.cpp's default is 64); the llamacpp backend uses cfg.penalty_last_n
        flags += ["--repeat-last-n", str(cfg.penalty_last_n)]
    for name, flag in (("repetition_penalty", "--repeat-penalty"), ("presence_penalty", "--presence-penalty"),
                       ("frequency_penalty", "--frequency-penalty")):
        if active(cfg, name):
            flags += [flag, f"{getattr(cfg, name):g}"]
    flags += _dry_flags(cfg)
    for token, bias in sorted(cfg.logit_bias.items()):
        flags += ["--logit-bias", _bias_flag(token, bias)]
    if cfg.ignore_eos:
        flags.append("--ignore-eos")
    for s in cfg.stop:
        flags += ["--reverse-prompt", s]
    if cfg.seed is not None:
        flags += ["--seed", str(cfg.seed)]
    return flags


def _shaping_flags(cfg: DecodingConfig) -> list[str]:
    """top-nσ, XTC, dynamic temperature, mirostat and adaptive-p (only those in use: llama.cpp's defaults are
    off)."""
    flags: list[str] = []
    if active(cfg, "top_n_sigma"):
        flags += ["--top-nsigma", f"{cfg.top_n_sigma:g}"]
    if active(cfg, "xtc_probability"):
        flags += ["--xtc-probability", f"{cfg.xtc_probability:g}", "--xtc-threshold", f"{cfg.xtc_threshold:g}"]
    if active(cfg, "dynatemp_range"):
        flags += ["--dynatemp-range", f"{cfg.dynatemp_range:g}", "--dynatemp-exp", f"{cfg.dynatemp_exponent:g}"]
    if active(cfg, "mirostat"):
        flags += ["--mirostat", str(cfg.mirostat), "--mirostat-ent", f"{cfg.mirostat_tau:g}",
                  "--mirostat-lr", f"{cfg.mirostat_eta:g}"]
    if active(cfg, "adaptive_target"):
        flags += ["--adaptive-target", f"{cfg.adaptive_target:g}", "--adaptive-decay", f"{cfg.adaptive_decay:g}"]
    return flags


def _dry_flags(cfg: DecodingConfig) -> list[str]:
    if not active(cfg, "dry_multiplier"):
        return []
    flags = ["--dry-multiplier", f"{cfg.dry_multiplier:g}", "--dry-base", f"{cfg.dry_base:g}",
             "--dry-allowed-length", str(cfg.dry_allowed_length), "--dry-penalty-last-n", str(cfg.dry_penalty_last_n)]
    if tuple(cfg.dry_sequence_breakers) != DEFAULT_DRY_BREAKERS:
        # the first --dry-sequence-breaker clears llama.cpp's defaults; "none" alone means no breakers
        for breaker in cfg.dry_sequence_breakers or ["none"]:
            flags += ["--dry-sequence-breaker", breaker]
    return flags


def llamacpp_server_body(cfg: DecodingConfig, strict: bool = True) -> dict[str, Any]:
    """The sampling fields of a ``llama-server`` request (``/completion`` or ``/v1/chat/completions``).

    Every sampler is sent, neutral values included: the server's defaults are not neutral (top_k 40,
    top_p 0.95, min_p 0.05, repeat_last_n 64). Greedy is temperature 0 (the chain keeps the argmax).
    """
    cfg = _llama_checks(cfg, "llama-server", LLAMACPP_SERVER_FIELDS, strict)
    sampling = cfg.is_sampling
    body: dict[str, Any] = {
        "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature if sampling else 0.0,
        "top_k": cfg.top_k if sampling else 0, "top_p": cfg.top_p if sampling else 1.0,
        "min_p": cfg.min_p if sampling else 0.0, "typical_p": cfg.typical_p if sampling else 1.0,
        "repeat_penalty": cfg.repetition_penalty, "repeat_last_n": cfg.penalty_last_n,
        "presence_penalty": cfg.presence_penalty, "frequency_penalty": cfg.frequency_penalty,
        "samplers": chain(cfg, always_penalties=True)}
    if active(cfg, "dry_multiplier"):
        body.update(dry_multiplier=cfg.dry_multiplier, dry_base=cfg.dry_base,
                    dry_allowed_length=cfg.dry_allowed_length, dry_penalty_last_n=cfg.dry_penalty_last_n,
                    dry_sequence_breakers=list(cfg.dry_sequence_breakers))
    for name in ("top_n_sigma", "xtc_probability", "xtc_threshold", "mirostat", "mirostat_tau", "mirostat_eta",
                 "dynatemp_range", "dynatemp_exponent"):
        if active(cfg, name):
            body[name] = getattr(cfg, name)
    if active(cfg, "adaptive_target"):
        body.update(adaptive_target=cfg.adaptive_target, adaptive_decay=cfg.adaptive_decay)
    if cfg.logit_bias:
        body["logit_bias"] = [[token, bias] for token, bias in sorted(cfg.logit_bias.items())]
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.top_logprobs:
        body["n_probs"] = cfg.top_logprobs
    if cfg.stop:
        body["stop"] = list(cfg.stop)
    if cfg.num_return_sequences > 1:
        body["n"] = cfg.num_return_sequences
    if sampling and cfg.seed is not None:
        body["seed"] = cfg.seed
    return body


#: Ollama's Options (``api/types.go``) that DecodingConfig has; Ollama applies top_k, temperature, top_p,
#: min_p in that order, penalties before them over ``repeat_last_n`` tokens (its default: 64).
OLLAMA_FIELDS = frozenset({"stop", "temperature", "top_k", "top_p", "min_p", *PENALTIES, "penalty_last_n", "seed"})
_OLLAMA_ORDER = ("temperature", "top_k", "top_p", "min_p")
_OLLAMA_NAMES = {"repetition_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty"}


def ollama_modelfile(cfg: DecodingConfig, strict: bool = True, base: str = "MODEL") -> str:
    """An Ollama Modelfile: ``FROM base`` and one ``PARAMETER`` line per setting (``stop`` repeated).

    Ollama's defaults are not neutral (top_k 40, top_p 0.9, temperature 0.8), so the samplers are written
    explicitly; greedy is temperature 0.
    """
    cfg = engine_strategy(cfg, "Ollama", strict)
    refuse_unsupported(cfg, "Ollama", OLLAMA_FIELDS, strict, {**_WHY, "typical_p": " (its engine has no typical_p)"})
    if order_matters(cfg, _OLLAMA_ORDER):
        unsupported_field(cfg, "sampler_order", "Ollama", strict, " (it applies top_k, temperature, top_p, min_p)")
    sampling = cfg.is_sampling
    params: list[tuple[str, Any]] = [
        ("num_predict", cfg.max_new_tokens), ("temperature", cfg.temperature if sampling else 0.0),
        ("top_k", cfg.top_k if sampling else 0), ("top_p", cfg.top_p if sampling else 1.0),
        ("min_p", cfg.min_p if sampling else 0.0)]
    if any(active(cfg, p) for p in PENALTIES):
        params.append(("repeat_last_n", cfg.penalty_last_n))  # -1 = num_ctx
        params += [(_OLLAMA_NAMES[p], getattr(cfg, p)) for p in PENALTIES if active(cfg, p)]
    if sampling and cfg.seed is not None:
        params.append(("seed", cfg.seed))
    lines = [f"FROM {base}"] + [f"PARAMETER {k} {_ollama_value(v)}" for k, v in params]
    for s in cfg.stop:
        if '"""' in s:
            unsupported_field(cfg, "stop", "an Ollama Modelfile", strict, ' (a stop string with """ cannot be quoted)')
            continue
        lines.append(f"PARAMETER stop {_quote(s)}")
    return "\n".join(lines) + "\n"


def _ollama_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _quote(s: str) -> str:
    '''A Modelfile string: ``"s"``, or triple-quoted (taken literally, newlines included) when ``s`` has a quote
    or a line break.'''
    return f'"""{s}"""' if '"' in s or "\n" in s else f'"{s}"'
