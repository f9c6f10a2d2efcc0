"""Record transformers v4's contrastive search and group (diverse) beam search outputs as the reference.

transformers 4.55.4 is the last release with both ``_contrastive_search`` and ``_group_beam_search``
(and ``HammingDiversityLogitsProcessor``) in its core; 4.56 moved contrastive search to the Hub and 5.x
dropped both. decodetune's engine must reproduce these token ids exactly
(tests/test_contrastive.py, tests/test_diverse_beam.py).

Regenerate (the tiny model in tests/data/tiny-llama/ is conftest's ``build_tiny_model`` with seed 0 and
its tokenizer, saved with safetensors)::

    python3 -m venv /tmp/tf4env
    /tmp/tf4env/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
        "transformers==4.55.4" safetensors
    /tmp/tf4env/bin/python tests/data/make_reference_strategies.py \
        [--smollm2 ~/.cache/decodetune/models/smollm2-135m-0.1.2-v2]

Each case holds the transformers ``generate`` kwargs, the equivalent decodetune config, the EOS ids,
the prompts (decoded as one left-padded batch) and the generated ids of every returned row (after the
prompt, with transformers' padding). ``--check`` prints whether a fresh run still matches the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "reference_strategies.json"
TINY = HERE / "tiny-llama"
PROMPTS = ["The quick brown fox", "Once upon a time there was a small robot", "Paris", "What is 12 plus"]
SMOL_PROMPTS = ["The capital of France is", "Write a short story about a robot who"]


def _contrastive(alpha: float, k: int, max_new: int, **extra: object) -> dict:
    hf = {"penalty_alpha": alpha, "top_k": k, "max_new_tokens": max_new, "do_sample": False, **extra}
    ours = {"strategy": "contrastive", "penalty_alpha": alpha, "top_k": k, "max_new_tokens": max_new, **extra}
    return {"strategy": "contrastive", "hf": hf, "config": ours}


def _diverse(beams: int, groups: int, penalty: float, max_new: int, **extra: object) -> dict:
    hf = {"num_beams": beams, "num_beam_groups": groups, "diversity_penalty": penalty, "max_new_tokens": max_new,
          "do_sample": False, **extra}
    ours = {"strategy": "diverse_beam", "num_beams": beams, "num_beam_groups": groups, "diversity_penalty": penalty,
            "max_new_tokens": max_new, **extra}
    return {"strategy": "diverse_beam", "hf": hf, "config": ours}


#: (name, case, EOS ids). A second, frequent EOS id (116) makes sequences end early.
TINY_CASES = [
    ("cs_a06_k4", _contrastive(0.6, 4, 20), [2]),
    ("cs_a03_k6_rep", _contrastive(0.3, 6, 16, repetition_penalty=1.3), [2, 116]),
    ("cs_a09_k2_ngram", _contrastive(0.9, 2, 24, no_repeat_ngram_size=2), [2]),
    ("cs_a05_k5_min", _contrastive(0.5, 5, 18, min_new_tokens=6), [2, 116]),
    ("db_4x2", _diverse(4, 2, 0.5, 16), [2]),
    ("db_6x3_ret3", _diverse(6, 3, 1.0, 14, num_return_sequences=3), [2, 116]),
    ("db_4x4_early", _diverse(4, 4, 2.0, 12, length_penalty=0.5, early_stopping=True), [2, 116]),
    ("db_4x2_never", _diverse(4, 2, 0.8, 12, length_penalty=1.5, early_stopping="never",
                              num_return_sequences=2), [2, 116]),
    ("db_6x2_rep", _diverse(6, 2, 0.3, 16, repetition_penalty=1.2, no_repeat_ngram_size=3,
                            num_return_sequences=4), [2]),
    ("db_4x2_lp_neg", _diverse(4, 2, 1.5, 10, length_penalty=-0.5, min_new_tokens=3), [2, 116]),
]
SMOL_CASES = [
    ("smol_cs", _contrastive(0.6, 4, 24), None),
    ("smol_db", _diverse(4, 2, 0.5, 16, num_return_sequences=2), None),
]


def run_case(model, tok, prompts: list[str], case: dict, eos: list[int]) -> dict:
    """transformers' generate; the generated ids of every returned row.

    Group beam search runs on the left-padded batch. Contrastive search runs one prompt at a time: on a
    padded batch, transformers v4 takes the cosine with the padding positions' hidden states, which are
    zero vectors (0/0 = NaN), so every candidate of a padded row scores NaN and the row silently decodes
    greedily; masking them (as decodetune does) is the method's definition, and unpadded runs agree.
    """
    if case["strategy"] == "contrastive" and len(prompts) > 1:
        parts = [run_case(model, tok, [p], case, eos) for p in prompts]
        return {**parts[0], "prompts": prompts, "prompt_ids": [i for r in parts for i in r["prompt_ids"]],
                "sequences": [row for r in parts for row in r["sequences"]], "one_at_a_time": True}
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", return_token_type_ids=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    with torch.no_grad():
        out = model.generate(**enc, eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True,
                             output_scores=True, **case["hf"])
    rows = out.sequences[:, enc.input_ids.shape[1]:].tolist()
    scores = out.sequences_scores.tolist() if getattr(out, "sequences_scores", None) is not None else None
    prompt_ids = [tok(p).input_ids for p in prompts]
    return {**case, "eos": eos, "pad": pad, "prompts": prompts, "prompt_ids": prompt_ids, "sequences": rows,
            "sequence_scores": scores}


def _v4_config(model_dir: Path):
    """The folder's config as v4 reads it, plus the RoPE base: transformers 5 writes it as
    ``rope_parameters.rope_theta``, which v4 ignores (it would silently use its default of 10000)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    return config


def record(model_dir: Path, name: str, cases: list, prompts: list[str]) -> list[dict]:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    # transformers 5 saves tokenizer_class "TokenizersBackend", which v4 lacks; the tokenizer.json is the same
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=_v4_config(model_dir),
                                                 torch_dtype=torch.float32).eval()
    out = []
    for case_name, case, eos in cases:
        eos = eos or list(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id,
                                                                                  list)
                           else [model.generation_config.eos_token_id])
        out.append({"name": case_name, "model": name, **run_case(model, tok, prompts, case, eos)})
        print(case_name, "done", file=sys.stderr)
    return out


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", type=Path, help="smollm2-135m as an HF folder (decodetune's cache)")
    ap.add_argument("--check", action="store_true", help="compare with the recorded file instead of writing it")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cases = record(TINY, "tiny-llama", TINY_CASES, PROMPTS)
    if args.smollm2:
        cases += record(args.smollm2, "smollm2-135m", SMOL_CASES, SMOL_PROMPTS)
    data = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}
    if args.check:
        old = {c["name"]: c["sequences"] for c in json.loads(OUT.read_text())["cases"]}
        for c in cases:
            print(c["name"], "same" if old.get(c["name"]) == c["sequences"] else "DIFFERENT")
        return
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT} ({len(cases)} cases, transformers {transformers.__version__})", file=sys.stderr)


if __name__ == "__main__":
    main()
