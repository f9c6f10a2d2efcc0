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
from pathlib import Path
from typing import Any, Optional

import typer

from decodetune.config import DecodingConfig

PANEL = "Decoding config (overrides --config)"

_HELP = {
    "strategy": "greedy | beam | sample | beam_sample | self_consistency | mbr | best_of_n",
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


def _option_type(field: dataclasses.Field) -> Any:
    if field.name in ("stop",):
        return Optional[list[str]]  # noqa: UP045 - typer needs typing.Optional here
    if field.name in ("early_stopping", "sampler_order") or isinstance(field.default, str):
        return Optional[str]  # noqa: UP045
    if field.name in ("seed",) or isinstance(field.default, bool):
        return Optional[int]  # noqa: UP045
    if isinstance(field.default, int):
        return Optional[int]  # noqa: UP045
    return Optional[float]  # noqa: UP045


def _flag_names(name: str) -> list[str]:
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
    return flags


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
