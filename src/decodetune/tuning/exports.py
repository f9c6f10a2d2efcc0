"""The winner's exports: exact for the engine the study ran on, flagged for every other engine.

An export that would change behaviour (a dropped field, a different sampler order, different penalty
semantics) is never written as if it were the same config: it goes to
``exports/approximate/`` and ``exports/changes.json`` names what changes; the CLI summary and the report
print it. Exports that reproduce the study's config go to ``exports/``.
"""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from typing import Any

from decodetune.backends.base import active
from decodetune.config import DecodingConfig
from decodetune.io import atomic_write, write_json

#: target -> (file name, engine label, the backend whose semantics it has)
TARGETS = {
    "hf": ("generation_config.json", "transformers generate()", "torch"),
    "vllm": ("vllm_sampling_params.json", "vLLM SamplingParams", "vllm"),
    "llamacpp": ("llamacpp_flags.txt", "llama.cpp (llama-cli / llama-server flags)", "llamacpp"),
    "openai": ("openai_params.json", "an OpenAI-compatible API", "openai"),
}

#: semantics per engine kind for the penalties (what tokens each counts)
_PROMPT_COUNTED = {"llamacpp": {"presence_penalty", "frequency_penalty", "repetition_penalty"},
                   "torch": {"repetition_penalty"}, "vllm": {"repetition_penalty"},
                   "openai": set()}


def semantic_changes(cfg: DecodingConfig, study_backend: str, target_backend: str) -> list[str]:
    """What behaves differently when ``cfg`` tuned on ``study_backend`` runs on ``target_backend``."""
    if study_backend == target_backend:
        return []
    out = []
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        if not active(cfg, name):
            continue
        here = name in _PROMPT_COUNTED.get(study_backend, set())
        there = name in _PROMPT_COUNTED.get(target_backend, set())
        if here != there:
            out.append(f"{name} counts {'prompt and output' if there else 'output'} tokens there, "
                       f"{'prompt and output' if here else 'output'} tokens in the study's engine")
    return out


def export_one(cfg: DecodingConfig, target: str) -> tuple[Any, list[str]]:
    """The target's parameters (non-strict) and the exporter's list of dropped fields."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(cfg, f"to_{target}")(strict=False)
    return value, [str(w.message) for w in caught]


def write_exports(cfg: DecodingConfig, out_dir: Path, study_backend: str) -> dict[str, Any]:
    """Write every target's export; returns ``{target: {file, exact, engine, changes}}`` (also written)."""
    exports_dir = Path(out_dir) / "exports"
    table: dict[str, Any] = {}
    for target, (fname, engine, kind) in TARGETS.items():
        try:
            value, dropped = export_one(cfg, target)
        except Exception as e:  # an exporter that refuses even non-strict
            table[target] = {"file": None, "exact": False, "engine": engine, "changes": [f"export failed: {e}"]}
            continue
        changes = dropped + semantic_changes(cfg, study_backend, kind)
        path = (exports_dir if not changes else exports_dir / "approximate") / fname
        if isinstance(value, list):  # command-line flags
            with atomic_write(path) as f:
                f.write(" ".join(shlex.quote(x) for x in value) + "\n")
        else:
            write_json(path, value)
        table[target] = {"file": str(path), "exact": not changes, "engine": engine, "changes": changes}
    write_json(exports_dir / "changes.json", table)
    return table


def export_warnings(table: dict[str, Any]) -> list[str]:
    """One line per export that changes behaviour, for the CLI summary."""
    return [f"export to {e['engine']} changes behaviour: " + "; ".join(e["changes"])
            for e in table.values() if not e["exact"]]
