"""LM-based ops (paraphrase, back-generation) through decodetune's engine, on a tiny random model."""

from __future__ import annotations

import pytest

from decodetune.config import DecodingConfig
from decodetune.train.augment import Filters, augment, augment_rows
from decodetune.train.augment.lm_ops import (
    SEPARATOR,
    backgen_prompt,
    clean_generation,
    default_lm_config,
    paraphrase_prompt,
    with_stops,
)
from decodetune.train.augment.pipeline import variant_rng, variant_seed

ROWS = [
    {"id": "a", "prompt": "What is 12 plus 7?", "answer": "19", "topic": "math"},
    {"id": "b", "prompt": "Name the capital of France.", "references": ["Paris"], "topic": "geo"},
    {"id": "c", "prompt": "Count from 1 to 5.", "answer": "1 2 3 4 5", "topic": "math"},
]
CFG = DecodingConfig(strategy="sample", temperature=1.0, max_new_tokens=12)


def test_clean_generation():
    assert clean_generation(' Paraphrase: "How much is 12 plus 7?"\nText: junk', "one line") == "How much is 12 plus 7?"
    assert clean_generation(f"New one here\n{SEPARATOR}\nanother", "a\nb") == "New one here"
    assert clean_generation("line one\nline two\n###", original="a\nb") == "line one\nline two"
    assert clean_generation("   ") == ""


def test_prompts_and_stops():
    assert paraphrase_prompt("Hi {there}", "Say: {text}") == "Say: Hi {there}"
    assert paraphrase_prompt("What is 2 plus 2?").endswith("Text: What is 2 plus 2?\nParaphrase:")
    numbered = backgen_prompt(["one", "two "])
    assert numbered.endswith("Prompt 1: one\nPrompt 2: two\nPrompt 3:")
    multi = backgen_prompt(["one\nmore", "two"])
    assert multi == f"one\nmore\n{SEPARATOR}\ntwo\n{SEPARATOR}\n"
    cfg = with_stops(DecodingConfig(strategy="sample", stop=["END"], num_return_sequences=3), "one line")
    assert cfg.stop == ["END", SEPARATOR, "\n"] and cfg.num_return_sequences == 1
    assert with_stops(DecodingConfig(), "two\nlines").stop == [SEPARATOR]


def test_paraphrase_variants_are_the_engines_seeded_generations(tiny_pair):
    from decodetune.decoding import generate

    res = augment(ROWS, "paraphrase", n=3, seed=7, model=tiny_pair, config=CFG, keep_original=False,
                  filters=Filters())
    assert res.counts["paraphrase"]["candidates"] == 9
    # independent reference: generate() called directly, one prompt per variant with the documented seed
    kept_total = 0
    for i, row in enumerate(ROWS):
        prompts = [paraphrase_prompt(row["prompt"])] * 3
        seeds = [variant_seed(7, "paraphrase", i, k) for k in (1, 2, 3)]
        gens = generate(tiny_pair, prompts, with_stops(CFG, row["prompt"]), seeds=seeds)
        expected = [clean_generation(g.text, row["prompt"]) for g in gens]
        kept = {r["id"]: r["prompt"] for r in res.rows if r["aug_source"] == i}
        for k, text in enumerate(expected, start=1):
            if f"{row['id']}~paraphrase{k}" in kept:
                assert kept[f"{row['id']}~paraphrase{k}"] == text
                kept_total += 1
    assert kept_total == res.counts["paraphrase"]["kept"] > 0
    for r in res.rows:
        src = ROWS[r["aug_source"]]
        assert r["aug_op"] == "paraphrase" and r["topic"] == src["topic"]
        assert r.get("answer") == src.get("answer") and r.get("references") == src.get("references")


def test_lm_ops_are_deterministic_and_backgen_drops_answers(tiny_pair):
    a = augment_rows(ROWS, "paraphrase,backgen", n=2, seed=1, model=tiny_pair, config=CFG)
    b = augment_rows(ROWS, "paraphrase,backgen", n=2, seed=1, model=tiny_pair, config=CFG)
    assert a == b
    back = [r for r in a if r["aug_op"] == "backgen"]
    for r in back:
        assert "answer" not in r and "references" not in r
        assert r["topic"] == ROWS[r["aug_source"]]["topic"]


def test_backgen_prompt_shows_the_row_last_and_other_rows_before(tiny_pair, monkeypatch):
    import decodetune.train.augment.pipeline as pipeline

    seen: list[tuple[list[str], list[int]]] = []

    def fake_run(model, prompts, seeds, configs, progress=False):
        seen.append((list(prompts), list(seeds)))
        return ["New prompt " + str(j) for j in range(len(prompts))]

    monkeypatch.setattr(pipeline, "run_generations", fake_run)
    out = augment_rows(ROWS, "backgen", n=2, seed=5, model=tiny_pair, backgen_examples=2, keep_original=False)
    prompts, seeds = seen[0]
    assert len(prompts) == 6 and seeds == [variant_seed(5, "backgen", i, k) for i in range(3) for k in (1, 2)]
    for j, p in enumerate(prompts):
        i, k = divmod(j, 2)
        assert p.endswith("Prompt 3:")
        examples = [line.split(": ", 1)[1] for line in p.splitlines()[:-1] if line.startswith("Prompt ")]
        assert examples[-1] == ROWS[i]["prompt"] and len(examples) == 2
        rng = variant_rng(5, "backgen", i, k + 1)
        other = rng.sample([x for x in range(3) if x != i], 1)[0]
        assert examples[0] == ROWS[other]["prompt"]
    assert [r["prompt"] for r in out] == [f"New prompt {j}" for j in range(6)]


def test_default_config_samples():
    cfg = default_lm_config()
    assert cfg.is_sampling and cfg.max_new_tokens > 0


@pytest.mark.slow
def test_paraphrase_with_smollm2_keeps_numbers(smollm2):
    from decodetune.train.augment import compile_preserve

    rows = [{"id": "q", "prompt": "What is 23 plus 45? Answer with a number.", "answer": "68"}]
    res = augment(rows, "paraphrase", n=4, seed=0, model=smollm2,
                  config=DecodingConfig(strategy="sample", temperature=0.7, top_p=0.9, max_new_tokens=40),
                  filters=Filters(preserve=compile_preserve("numbers"), max_len_ratio=3.0), keep_original=False)
    assert res.counts["paraphrase"]["candidates"] == 4
    for r in res.rows:
        assert "23" in r["prompt"] and "45" in r["prompt"] and r["answer"] == "68"
