"""Shared helpers of test_contrastive and test_diverse_beam: the recorded transformers v4 references.

The reference is tests/data/reference_strategies.json, written by tests/data/make_reference_strategies.py
with transformers 4.55.4 (the last release with contrastive and group beam search in its core) on the
tiny random Llama saved in tests/data/tiny-llama/ (and, for two cases, smollm2-135m). Regenerate it as
that script's docstring says; ``run_v4_check`` runs it live when /tmp/tf4env exists.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from decodetune import DecodingConfig
from decodetune.decoding import generate

DATA = Path(__file__).resolve().parent / "data"
V4_PYTHON = Path("/tmp/tf4env/bin/python")


def cases(strategy: str, model: str = "tiny-llama") -> list[dict]:
    """The recorded cases of one strategy and model."""
    data = json.loads((DATA / "reference_strategies.json").read_text())
    return [c for c in data["cases"] if c["strategy"] == strategy and c["model"] == model]


def tiny_lm():
    """The saved tiny Llama as decodetune loads an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from decodetune.models.handle import LoadedModel

    path = DATA / "tiny-llama"
    return LoadedModel(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), name="tiny")


def mismatches(lm, case: dict, **generate_kwargs) -> list[str]:
    """Our engine on the case's prompts vs the recorded ids; one line per differing row (empty: exact).

    transformers pads a row that ended early with the pad id, and group beam search writes
    ``eos_token_id[0]`` in place of the EOS id that was generated; both are accepted, nothing else.
    """
    lm.eos_token_ids = list(case["eos"])
    assert [lm.encode(p) for p in case["prompts"]] == case["prompt_ids"]
    gens = generate(lm, case["prompts"], DecodingConfig.from_dict(case["config"]), **generate_kwargs)
    assert len(gens) == len(case["sequences"])
    bad = []
    for i, (g, ref) in enumerate(zip(gens, case["sequences"], strict=True)):
        ids = list(g.token_ids)
        if g.finish_reason == "eos":
            assert ids[-1] in case["eos"]
            if case["strategy"] == "diverse_beam":
                ids[-1] = case["eos"][0]
        else:
            assert g.finish_reason == "length" and len(ids) == case["config"]["max_new_tokens"]
        if ids != ref[:len(ids)] or any(t != case["pad"] for t in ref[len(ids):]):
            bad.append(f"{case['name']} row {i}: ours {ids} != v4 {ref}")
        scores = case.get("sequence_scores")
        if case["strategy"] == "diverse_beam" and scores and abs(g.score - scores[i]) > 1e-4:
            bad.append(f"{case['name']} row {i}: score {g.score} != v4 {scores[i]}")
    return bad


def run_v4_check() -> str:
    """The reference script's ``--check`` (a fresh v4 run on the tiny model compared with the file)."""
    out = subprocess.run([str(V4_PYTHON), str(DATA / "make_reference_strategies.py"), "--check"],
                         capture_output=True, text=True, timeout=600, check=True)
    return out.stdout
