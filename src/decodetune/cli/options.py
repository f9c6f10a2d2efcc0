"""Shared CLI options: one flag per DecodingConfig field, plus ``--config FILE``.

``@config_options`` adds the flags to a typer command and passes the user's choices to the command as
one ``config_flags: dict`` argument; :func:`build_config` merges them over ``--config`` into a validated
:class:`~decodetune.config.DecodingConfig`. Every command that takes a config uses these two, so the
flags are spelled the same everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from pathlib import Path
from typing import Any, Optional

import typer

from decodetune.config import DecodingConfig
from decodetune.errors import UserError

PANEL = "Decoding config (overrides --config)"

_HELP = {
    "strategy": "greedy | beam | sample | beam_sample | contrastive | diverse_beam | self_consistency | mbr | "
                "best_of_n",
    "max_new_tokens": "maximum tokens to generate",
    "min_new_tokens": "EOS is blocked until this many tokens",
    "stop": "stop string (repeatable); the text is cut before it",
    "temperature": "softmax(logits / T); 0 with sample = greedy",
    "top_k": "keep the k most likely tokens (0 = off)",
    "top_p": "nucleus: smallest set with mass >= p",
    "min_p": "keep tokens with p >= min_p * p_max",
    "typical_p": "locally typical sampling mass",
    "epsilon_cutoff": "drop tokens with p < epsilon",
    "eta_cutoff": "eta sampling cutoff (Hewitt et al.)",
    "repetition_penalty": "divide logits of seen tokens (prompt + output)",
    "presence_penalty": "subtract for output tokens seen at least once",
    "frequency_penalty": "subtract per occurrence in the output",
    "no_repeat_ngram_size": "forbid repeating n-grams of this size",
    "penalty_last_n": "the penalties look at the last N tokens (-1 = all, 0 = off; llama.cpp --repeat-last-n)",
    "dry_multiplier": "DRY: penalise tokens that extend a repeat (0 = off)",
    "dry_base": "DRY: penalty = multiplier * base ** (repeat length - allowed length)",
    "dry_allowed_length": "DRY: repeats up to this many tokens go unpenalised",
    "dry_penalty_last_n": "DRY: look back N tokens (-1 = the whole context, 0 = off)",
    "dry_sequence_breakers": "DRY: a string that ends a repeat (repeatable; replaces the defaults newline : \" *; "
                             "type \\n for a newline)",
    "xtc_threshold": "XTC: tokens with p >= threshold may be excluded",
    "xtc_probability": "XTC: chance per step of dropping all those but the least likely (0 = off)",
    "top_n_sigma": "keep logits >= max - n * std of the logits (<= 0 = off)",
    "mirostat": "0 = off, 1 = Mirostat, 2 = Mirostat 2.0 (replaces top-k/top-p/min-p)",
    "mirostat_tau": "Mirostat: target surprise (cross-entropy)",
    "mirostat_eta": "Mirostat: learning rate",
    "dynatemp_range": "dynamic temperature: temperature +/- range, by the entropy (0 = off)",
    "dynatemp_exponent": "dynamic temperature: exponent of the entropy mapping",
    "adaptive_target": "adaptive-p: favour tokens near this probability, kept on target over time (< 0 = off)",
    "adaptive_decay": "adaptive-p: decay of its moving average (history ~ 1/(1-decay) tokens, at most 0.99)",
    "logit_bias": "TOKEN=BIAS added to a token's logit (repeatable; -100 bans it; llama.cpp's TOKEN+BIAS too)",
    "bad_words": "a word or phrase never generated (repeatable; vLLM's bad_words)",
    "stop_token_ids": "a token id that ends the sequence (repeatable)",
    "ignore_eos": "generate past EOS until max_new_tokens",
    "top_logprobs": "return the N most likely tokens' logprobs per step (0 = off; vLLM logprobs=N)",
    "penalty_alpha": "contrastive: degeneration penalty in [0, 1]",
    "num_beam_groups": "diverse_beam: number of beam groups",
    "diversity_penalty": "diverse_beam: penalty on tokens the other groups chose",
    "num_beams": "beam width (alias --beam-size)",
    "length_penalty": "beam score = logprob / length**length_penalty",
    "early_stopping": "true | false | never (transformers' meaning)",
    "num_return_sequences": "sequences returned per prompt",
    "num_candidates": "samples per prompt that self_consistency / mbr / best_of_n select from",
    "mbr_utility": "mbr: chrf | bleu | rouge_l | token_f1 | pkg.module:function",
    "rerank": "best_of_n: mean_logprob | pkg.module:function",
    "seed": "per-row seed (same seed, same tokens, whatever the batch)",
    "sampler_order": "comma-separated order, e.g. top_k,top_p,temperature",
}


#: container fields, given as repeatable flags
_STRING_LISTS = ("stop", "bad_words", "dry_sequence_breakers", "logit_bias")


def _option_type(field: dataclasses.Field) -> Any:
    if field.name in _STRING_LISTS:
        return Optional[list[str]]  # noqa: UP045 - typer needs typing.Optional here
    if field.name == "stop_token_ids":
        return Optional[list[int]]  # noqa: UP045
    if field.name == "ignore_eos":
        return Optional[bool]  # noqa: UP045
    if field.name in ("early_stopping", "sampler_order") or isinstance(field.default, str):
        return Optional[str]  # noqa: UP045
    if field.name in ("seed",) or isinstance(field.default, bool):
        return Optional[int]  # noqa: UP045
    if isinstance(field.default, int):
        return Optional[int]  # noqa: UP045
    return Optional[float]  # noqa: UP045


def _flag_names(name: str) -> list[str]:
    if name == "ignore_eos":
        return ["--ignore-eos/--no-ignore-eos"]
    flags = ["--" + name.replace("_", "-")]
    if name == "num_beams":
        flags.append("--beam-size")
    return flags


def config_options(func: Any = None, *, file_option: bool = True, skip: tuple[str, ...] = (),
                   panel: str = PANEL) -> Any:
    """Decorator: add ``--config`` and one flag per config field; call ``func(..., config_flags=dict)``.

    ``@config_options`` as is, or ``@config_options(file_option=False, skip=("seed",), panel=...)`` for a
    command with its own ``--config`` (``compare`` takes several) or its own flag for a field.
    """
    if func is None:
        return functools.partial(config_options, file_option=file_option, skip=skip, panel=panel)
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.name != "config_flags"]
    extra = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY,
                               default=typer.Option(None, "--config", "-c", help="DecodingConfig JSON/YAML file",
                                                    rich_help_panel=panel),
                               annotation=Optional[Path])] if file_option else []  # noqa: UP045
    names = []
    for f in dataclasses.fields(DecodingConfig):
        if f.name in skip:
            continue
        names.append(f.name)
        extra.append(inspect.Parameter(
            f"cfg_{f.name}", inspect.Parameter.KEYWORD_ONLY, annotation=_option_type(f),
            default=typer.Option(None, *_flag_names(f.name), help=_HELP.get(f.name, ""), rich_help_panel=panel)))

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags: dict[str, Any] = {"__file__": kwargs.pop("config", None)} if file_option else {}
        for name in names:
            value = kwargs.pop(f"cfg_{name}", None)
            if value is not None and value != []:
                flags[name] = value
        return func(*args, config_flags=flags, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
    return wrapper


def flag_fields(config_flags: dict[str, Any]) -> dict[str, Any]:
    """The config fields the flags set, as DecodingConfig takes them (``--early-stopping true`` -> True)."""
    flags = {k: v for k, v in config_flags.items() if k != "__file__"}
    if "early_stopping" in flags:
        flags["early_stopping"] = _parse_early_stopping(flags["early_stopping"])
    if "logit_bias" in flags:
        flags["logit_bias"] = parse_logit_bias(flags["logit_bias"])
    if "dry_sequence_breakers" in flags:  # a newline cannot be typed in a flag: \n and \t are read as escapes
        flags["dry_sequence_breakers"] = [b.replace("\\n", "\n").replace("\\t", "\t")
                                          for b in flags["dry_sequence_breakers"]]
    return flags


#: ``TOKEN=BIAS`` (BIAS signed), or llama.cpp's ``TOKEN+BIAS`` / ``TOKEN-BIAS``
_BIAS_RE = re.compile(r"\s*(\d+)\s*(?:=\s*([-+]?[^\s=]+)|([+-])\s*([^\s+-][^\s]*))\s*")


def parse_logit_bias(items: list[str]) -> dict[int, float]:
    """``--logit-bias`` values as ``{token: bias}``; a malformed one or a token given twice is a UserError."""
    out: dict[int, float] = {}
    for item in items:
        m = _BIAS_RE.fullmatch(item)
        try:
            if m is None:
                raise ValueError
            bias = float(m.group(2)) if m.group(2) is not None else float(m.group(3) + m.group(4))
        except ValueError:
            raise UserError(f"--logit-bias: {item!r} is not TOKEN=BIAS (e.g. 15043=-100; llama.cpp's 15043-100 "
                            "works too)") from None
        token = int(m.group(1))
        if token in out:
            raise UserError(f"--logit-bias: token {token} given twice")
        out[token] = bias
    return out


def build_config(config_flags: dict[str, Any]) -> DecodingConfig:
    """Merge flags over the ``--config`` file (if any) into a validated DecodingConfig.

    Prints ``warning: <field> is ignored by strategy <s>`` on stderr for each set field the strategy
    never reads (``--strategy greedy --temperature 0.7``): valid, but probably not what was meant.
    """
    path = config_flags.get("__file__")
    base = DecodingConfig.load(path).to_dict() if path else {}
    base.update(flag_fields(config_flags))
    config = DecodingConfig.from_dict(base, source=str(path) if path else "flags")
    for line in config.ignored_field_warnings():
        typer.echo(f"warning: {line}", err=True)
    return config


def _parse_early_stopping(value: str) -> bool | str:
    v = str(value).strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    return v  # "never", or an invalid value that DecodingConfig reports by name
