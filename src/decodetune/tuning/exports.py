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

from decodetune import export
from decodetune.config import DecodingConfig
from decodetune.export import active, hf_requirements
from decodetune.io import atomic_write, write_json

#: target -> (file name, engine label, the backend whose semantics it has)
TARGETS = {
    "hf": ("generation_config.json", "transformers generate()", "torch"),
    "vllm": ("vllm_sampling_params.json", "vLLM SamplingParams", "vllm"),
    "llamacpp": ("llamacpp_flags.txt", "llama.cpp (llama-cli / llama-server flags)", "llamacpp"),
    "openai": ("openai_params.json", "an OpenAI-compatible API", "openai"),
    "llamacpp_server": ("llamacpp_server_params.json", "llama-server (JSON request body)", "llamacpp"),
    "ollama": ("Modelfile", "Ollama (Modelfile PARAMETER lines)", "ollama"),
}

#: semantics per engine kind for the penalties (what tokens each counts)
_PROMPT_COUNTED = {"llamacpp": {"presence_penalty", "frequency_penalty", "repetition_penalty"},
                   "torch": {"repetition_penalty"}, "vllm": {"repetition_penalty"},
                   "openai": set(), "ollama": {"presence_penalty", "frequency_penalty", "repetition_penalty"}}
#: engines whose ignore_eos bans the end-of-generation tokens (llama.cpp's --ignore-eos); torch and vLLM
#: let them be generated and go on
_EOG_BANNED = {"llamacpp"}


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
    if active(cfg, "ignore_eos") and (study_backend in _EOG_BANNED) != (target_backend in _EOG_BANNED):
        there = "bans end-of-generation tokens" if target_backend in _EOG_BANNED else "generates past EOS"
        here = "bans them" if study_backend in _EOG_BANNED else "generates past EOS"
        out.append(f"ignore_eos {there} there; the study's engine {here}")
    return out


def export_one(cfg: DecodingConfig, target: str) -> tuple[Any, list[str]]:
    """The target's parameters (non-strict) and the exporter's list of dropped fields."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(export, f"to_{target}")(cfg, strict=False)
    return value, [str(w.message) for w in caught]


def write_exports(cfg: DecodingConfig, out_dir: Path, study_backend: str) -> dict[str, Any]:
    """Write every target's export; returns ``{target: {file, exact, engine, changes}}`` (also written).

    An entry may also have ``requires``: what running the export needs beyond the file (transformers' Hub
    code for contrastive / diverse_beam).
    """
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
        _write(path, target, value)
        table[target] = {"file": str(path), "exact": not changes, "engine": engine, "changes": changes}
        if target == "hf" and hf_requirements(cfg):
            table[target]["requires"] = hf_requirements(cfg)
    write_json(exports_dir / "changes.json", table)
    return table


def _write(path: Path, target: str, value: Any) -> None:
    """One export file: flags on one shell line, a Modelfile as is, generation_config.json through
    transformers' own ``save_pretrained``, the rest as JSON."""
    if isinstance(value, list):  # command-line flags
        with atomic_write(path) as f:
            f.write(" ".join(shlex.quote(x) for x in value) + "\n")
    elif isinstance(value, str):
        with atomic_write(path) as f:
            f.write(value)
    elif target == "hf":
        save_generation_config(value, path)
    else:
        write_json(path, value)


def save_generation_config(kwargs: dict[str, Any], path: Path) -> None:
    """``GenerationConfig(**kwargs)`` written to ``path`` (a ``generation_config.json``) by ``save_pretrained``.

    transformers' validation refuses ``top_k`` without ``do_sample``, yet its contrastive search reads it
    (``penalty_alpha`` with ``top_k``): such a config is written unvalidated, as ``from_pretrained`` loads it.
    """
    import tempfile

    from transformers import GenerationConfig

    gen = GenerationConfig(**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        try:
            gen.save_pretrained(tmp)
        except ValueError:
            gen.to_json_file(Path(tmp) / "generation_config.json")
        Path(tmp, "generation_config.json").replace(path)


def export_warnings(table: dict[str, Any]) -> list[str]:
    """One line per export that changes behaviour, for the CLI summary."""
    return [f"export to {e['engine']} changes behaviour: " + "; ".join(e["changes"])
            for e in table.values() if not e["exact"]]
