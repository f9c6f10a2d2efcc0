"""LM-based ops: paraphrase a prompt, or back-generate new prompts in the style of given ones.

Both run through decodetune's own engine (:func:`decodetune.decoding.generate`) with a
:class:`~decodetune.config.DecodingConfig`, so diversity is whatever the config says (temperature, top-p,
min-p...). Each variant is one prompt with its own seed; the engine guarantees that the same (prompt,
config, seed) gives the same tokens whatever else is in the batch, so output does not depend on ``n`` or on
the other rows. A deterministic config (greedy, beam) gives the same text for every seed: the duplicate
filter then keeps one variant per row.
"""

from __future__ import annotations

import re
from typing import Any

from decodetune.config import DecodingConfig

LM_OPS = ("paraphrase", "backgen")

#: Default decoding for LM ops: sampling, so that the ``n`` variants differ.
DEFAULT_LM_CONFIG = {"strategy": "sample", "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 96}

#: ``{text}`` is the prompt to rewrite. Ends with a label so that base (non-chat) models complete it too.
PARAPHRASE_TEMPLATE = (
    "Rewrite the following text in different words. Keep its meaning and every number in it. "
    "Reply with the rewritten text only.\n\nText: {text}\n\nRewritten text:"
)

#: Separator between examples in back-generation prompts; generation is cut at the first one.
SEPARATOR = "###"

BACKGEN_INSTRUCTION = (
    "Here are example prompts, separated by {sep}:\n\n{examples}\n\n"
    "Write one new prompt in the same style and format, with different content. "
    "Reply with the new prompt only."
)

_LABEL = re.compile(r"^\s*(?:rewritten text|rewrite|rewritten|paraphrase|new prompt|text)\s*:\s*", re.IGNORECASE)


def default_lm_config() -> DecodingConfig:
    """The decoding config LM ops use when none is given."""
    return DecodingConfig.from_dict(DEFAULT_LM_CONFIG)


def paraphrase_prompt(text: str, template: str = PARAPHRASE_TEMPLATE) -> str:
    """The instruction sent to the model to paraphrase ``text``."""
    return template.replace("{text}", text)


def backgen_prompt(examples: list[str], chat: bool) -> str:
    """The prompt asking for one more example like ``examples``.

    Chat models get an instruction. Base models get the examples as a list that they continue: the prompt
    ends with a separator, and what they write up to the next separator is the new prompt.
    """
    sep = f"\n{SEPARATOR}\n"
    joined = sep.join(e.strip() for e in examples)
    if chat:
        return BACKGEN_INSTRUCTION.format(sep=SEPARATOR, examples=joined)
    return joined + sep


def clean_generation(text: str, original: str = "") -> str:
    """The usable part of a generation: up to a separator (or a blank line, when the original has none),
    without a leading ``Rewritten text:``-style label or surrounding quotes."""
    out = text.split(SEPARATOR, 1)[0]
    if "\n\n" not in original.strip():
        out = out.strip().split("\n\n", 1)[0]
    out = _LABEL.sub("", out.strip()).strip()
    if len(out) >= 2 and out[0] == out[-1] and out[0] in "\"'\u201c\u201d`":
        out = out[1:-1].strip()
    return out


def run_generations(model: Any, prompts: list[str], seeds: list[int], config: DecodingConfig,
                    progress: bool = False) -> list[str]:
    """One generation per prompt, each with its own seed (``num_return_sequences`` is forced to 1)."""
    from decodetune.decoding import generate

    if not prompts:
        return []
    cfg = config.replace(num_return_sequences=1) if config.num_return_sequences != 1 else config
    gens = generate(model, prompts, cfg, seeds=seeds, progress=progress)
    return [g.text for g in gens]
