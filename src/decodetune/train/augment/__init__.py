"""Data augmentation for prompts and training data (``decodetune augment``).

Token-level ops in the EDA family (swap, delete, insert, synonym) that keep case, digits and punctuation;
LM-based ops (paraphrase, back-generation) that run through decodetune's engine; filters for duplicates,
near-duplicates, lengths and answer preservation. Other commands call :func:`augment_rows` (rows of a data
set), :func:`augment_texts` (plain prompts), :func:`augment_task` (a task split) or :func:`robustness`
(a task's metric on original against augmented prompts, per config).
"""

from __future__ import annotations

from decodetune.train.augment.filters import Filters, compile_preserve
from decodetune.train.augment.lm_ops import LM_OPS
from decodetune.train.augment.ops import TOKEN_OPS
from decodetune.train.augment.pipeline import (
    ALL_OPS,
    ANSWER_FIELDS,
    AugmentResult,
    augment,
    augment_rows,
    augment_texts,
    parse_ops,
    parse_rates,
    row_augmenter,
)
from decodetune.train.augment.robustness import Robustness, augment_task, paired_robustness, robustness
from decodetune.train.augment.synonyms import LMSuggestions, SynonymTable

__all__ = ["ALL_OPS", "ANSWER_FIELDS", "AugmentResult", "Filters", "LMSuggestions", "LM_OPS", "Robustness",
           "SynonymTable", "TOKEN_OPS", "augment", "augment_rows", "augment_task", "augment_texts",
           "compile_preserve", "paired_robustness", "parse_ops", "parse_rates", "robustness", "row_augmenter"]
