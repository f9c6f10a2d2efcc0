"""LM-based ops: paraphrase a prompt, or back-generate new prompts in the style of given ones.

Both run through decodetune's own engine (:func:`decodetune.decoding.generate`) with a
:class:`~decodetune.config.DecodingConfig`, so diversity is whatever the config says (temperature, top-p,
min-p...). Each variant is one prompt with its own seed; the engine guarantees that the same (prompt,
config, seed) gives the same tokens whatever else is in the batch, so output does not depend on ``n`` or on
the other rows. A deterministic config (greedy, beam) gives the same text for every seed: the duplicate
filter then keeps one variant per row.

The prompts are few-shot *completion* texts sent without the chat template, so they work the same on base
and chat models. On smollm2-135m this matters: asked through its chat template to "rewrite" a question,
it answers it instead (``"23 + 45 = 68"``); continuing a ``Text: ... / Paraphrase: ...`` list, it rewrites.
"""

from __future__ import annotations

import re
from typing import Any

from decodetune.config import DecodingConfig

LM_OPS = ("paraphrase", "backgen")

#: Default decoding for LM ops: sampling, so that the ``n`` variants differ.
DEFAULT_LM_CONFIG = {"strategy": "sample", "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 64}

#: Separator between few-shot examples; generation is cut at the first one.
SEPARATOR = "###"

#: ``{text}`` is the prompt to rewrite. The two demonstrations show "same meaning, same numbers".
PARAPHRASE_TEMPLATE = (
    "Paraphrase each text: same meaning and same numbers, different words.\n\n"
    "Text: What is the capital of Italy?\nParaphrase: Which city is the capital of Italy?\n###\n"
    "Text: Write a story about a dog that finds 3 bones.\n"
    "Paraphrase: Tell a short story in which a dog finds 3 bones.\n###\n"
    "Text: {text}\nParaphrase:"
)

_LABEL = re.compile(r"^\s*(?:paraphrase|rewritten text|rewrite|new prompt|prompt \d+|text)\s*:\s*", re.IGNORECASE)


def default_lm_config() -> DecodingConfig:
    """The decoding config LM ops use when none is given."""
    return DecodingConfig.from_dict(DEFAULT_LM_CONFIG)


def paraphrase_prompt(text: str, template: str = PARAPHRASE_TEMPLATE) -> str:
    """The few-shot text whose continuation is a paraphrase of ``text``."""
    return template.replace("{text}", text)


def backgen_prompt(examples: list[str]) -> str:
    """The text whose continuation is one more prompt like ``examples`` (the last is the row's own).

    Single-line examples are numbered (``Prompt 1: ...``) and the model writes the next number's line;
    multi-line ones are separated by ``###`` lines and the model writes up to the next separator.
    """
    if any("\n" in e.strip() for e in examples):
        sep = f"\n{SEPARATOR}\n"
        return sep.join(e.strip() for e in examples) + sep
    lines = "".join(f"Prompt {i}: {e.strip()}\n" for i, e in enumerate(examples, start=1))
    return f"Here are some example prompts.\n\n{lines}Prompt {len(examples) + 1}:"


def clean_generation(text: str, original: str = "") -> str:
    """The usable part of a generation: up to a ``###`` separator (and the end of the first line when the
    original is one line), without a leading ``Paraphrase:``-style label or surrounding quotes."""
    out = text.split(SEPARATOR, 1)[0].strip()
    if "\n" not in original.strip():
        out = out.split("\n", 1)[0]
    out = _LABEL.sub("", out.strip()).strip()
    if len(out) >= 2 and out[0] == out[-1] and out[0] in "\"'`":
        out = out[1:-1].strip()
    return out


def with_stops(config: DecodingConfig, original: str) -> DecodingConfig:
    """``config`` with the stop strings that :func:`clean_generation` would cut at anyway (saves tokens)."""
    stops = [SEPARATOR] if "\n" in original.strip() else [SEPARATOR, "\n"]
    extra = [s for s in stops if s not in config.stop]
    return config.replace(stop=[*config.stop, *extra], num_return_sequences=1)


def run_generations(model: Any, prompts: list[str], seeds: list[int], configs: list[DecodingConfig],
                    progress: bool = False) -> list[str]:
    """One generation per prompt, each with its own seed and config, in one engine call, without the
    chat template (see the module docstring)."""
    from decodetune.decoding import generate
    from decodetune.models import load_model

    if not prompts:
        return []
    gens = generate(load_model(model, raw=True), prompts, configs, seeds=seeds, progress=progress)
    return [g.text for g in gens]
