"""Greedy and beam search are token-for-token identical to transformers' ``model.generate()``."""

from __future__ import annotations

import pytest
import torch

from decodetune import DecodingConfig
from decodetune.decoding import generate
from decodetune.models.handle import LoadedModel

PROMPTS = ["The quick brown fox", "Once upon a time there was a small robot", "Paris", "What is 12 plus"]
# A second, frequent EOS id makes sequences end early (and exercises several EOS ids: beams keep 3k candidates).
from conftest import TINY_EOS as EOS  # noqa: E402


def hf_generate(lm: LoadedModel, prompts: list[str], **kwargs) -> tuple[list[list[int]], list[float] | None]:
    """transformers' generate on a left-padded batch: generated ids per returned row, and beam scores."""
    tok = lm.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = lm.model.generate(**enc, eos_token_id=lm.eos_token_ids, pad_token_id=tok.pad_token_id,
                                return_dict_in_generate=True, output_scores=True, **kwargs)
    rows = out.sequences[:, enc.input_ids.shape[1]:].tolist()
    scores = out.sequences_scores.tolist() if getattr(out, "sequences_scores", None) is not None else None
    return rows, scores


def assert_same(ours, theirs: list[list[int]], pad: int = 0) -> None:
    """Same tokens; transformers' padding after an early end may only hold ``pad``.

    (Its beam search pads with ``pad_token_id or eos_token_id[0]``: with pad id 0 that is the first EOS id.)
    """
    assert len(ours) == len(theirs)
    for g, ref in zip(ours, theirs, strict=True):
        n = len(g.token_ids)
        assert g.token_ids == ref[:n], (g.prompt_index, g.sequence_index)
        assert all(t in (pad, EOS[0]) for t in ref[n:]), (g.prompt_index, ref[n:])
        if g.finish_reason == "eos":
            assert g.token_ids[-1] in EOS
        else:
            assert g.finish_reason == "length"


@pytest.mark.parametrize("batched", [True, False])
def test_greedy_matches_transformers(lm, batched):
    prompts = PROMPTS if batched else PROMPTS[1:2]
    ours = generate(lm, prompts, DecodingConfig(max_new_tokens=24))
    theirs, _ = hf_generate(lm, prompts, do_sample=False, max_new_tokens=24)
    assert_same(ours, theirs)


def test_greedy_batch_has_early_and_late_finishers(lm):
    ours = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=24))
    reasons = [g.finish_reason for g in ours]
    assert "eos" in reasons and "length" in reasons  # the row dropping path is exercised


@pytest.mark.parametrize("extra", [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.8),
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=1),
    dict(min_new_tokens=10),
    dict(repetition_penalty=1.2, no_repeat_ngram_size=3, min_new_tokens=4),
])
def test_greedy_processors_match_transformers(lm, extra):
    ours = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=20, **extra))
    theirs, _ = hf_generate(lm, PROMPTS, do_sample=False, max_new_tokens=20, **extra)
    assert_same(ours, theirs)


BEAM_CASES = [
    dict(num_beams=4, num_return_sequences=1, length_penalty=1.0, early_stopping=False),
    dict(num_beams=4, num_return_sequences=3, length_penalty=1.0, early_stopping=False),
    dict(num_beams=3, num_return_sequences=2, length_penalty=2.0, early_stopping=True),
    dict(num_beams=4, num_return_sequences=2, length_penalty=-0.5, early_stopping="never"),
    dict(num_beams=4, num_return_sequences=4, length_penalty=0.7, early_stopping="never"),
    dict(num_beams=2, num_return_sequences=1, length_penalty=1.5, early_stopping=True),
    dict(num_beams=5, num_return_sequences=5, length_penalty=0.0, early_stopping=False),
]


@pytest.mark.parametrize("case", BEAM_CASES, ids=lambda c: "-".join(f"{k[:5]}{v}" for k, v in c.items()))
@pytest.mark.parametrize("batched", [True, False])
def test_beam_matches_transformers(lm, case, batched):
    prompts = PROMPTS if batched else PROMPTS[:1]
    ours = generate(lm, prompts, DecodingConfig(strategy="beam", max_new_tokens=16, **case))
    theirs, scores = hf_generate(lm, prompts, do_sample=False, max_new_tokens=16, **case)
    assert [(g.prompt_index, g.sequence_index) for g in ours] == [
        (i, j) for i in range(len(prompts)) for j in range(case["num_return_sequences"])]
    assert_same(ours, theirs)
    assert [g.score for g in ours] == pytest.approx(scores, rel=1e-5, abs=1e-6)


def test_beam_finishes_on_eos_somewhere(lm):
    ours = generate(lm, PROMPTS, DecodingConfig(strategy="beam", num_beams=4, num_return_sequences=4,
                                                max_new_tokens=16))
    assert "eos" in {g.finish_reason for g in ours}


@pytest.mark.parametrize("extra", [dict(repetition_penalty=1.4), dict(no_repeat_ngram_size=2),
                                   dict(min_new_tokens=8, repetition_penalty=0.9)])
def test_beam_processors_match_transformers(lm, extra):
    case = dict(num_beams=3, num_return_sequences=2, **extra)
    ours = generate(lm, PROMPTS, DecodingConfig(strategy="beam", max_new_tokens=14, **case))
    theirs, scores = hf_generate(lm, PROMPTS, do_sample=False, max_new_tokens=14, **case)
    assert_same(ours, theirs)
    assert [g.score for g in ours] == pytest.approx(scores, rel=1e-5, abs=1e-6)


def test_mixed_call_matches_separate_references(lm):
    """Greedy, beam and per-prompt beam parameters in one call each equal their own reference."""
    configs = [DecodingConfig(max_new_tokens=12),
               DecodingConfig(strategy="beam", num_beams=3, length_penalty=2.0, max_new_tokens=12),
               DecodingConfig(strategy="beam", num_beams=3, length_penalty=0.5, early_stopping=True,
                              num_return_sequences=2, max_new_tokens=9),
               DecodingConfig(max_new_tokens=7, repetition_penalty=1.5)]
    ours = generate(lm, PROMPTS, configs)
    at = 0
    for prompt, cfg in zip(PROMPTS, configs, strict=True):
        kwargs = dict(do_sample=False, max_new_tokens=cfg.max_new_tokens, repetition_penalty=cfg.repetition_penalty)
        if cfg.is_beam:
            kwargs.update(num_beams=cfg.num_beams, length_penalty=cfg.length_penalty,
                          early_stopping=cfg.early_stopping, num_return_sequences=cfg.num_return_sequences)
        theirs, _ = hf_generate(lm, [prompt], **kwargs)
        assert_same(ours[at:at + len(theirs)], theirs)
        at += len(theirs)
    assert at == len(ours)


def test_batch_size_chunks_give_same_tokens(lm):
    cfg = DecodingConfig(max_new_tokens=12)
    whole = generate(lm, PROMPTS, cfg)
    chunked = generate(lm, PROMPTS, cfg, batch_size=1)
    assert [g.token_ids for g in whole] == [g.token_ids for g in chunked]
    beam = DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=12)
    assert [g.token_ids for g in generate(lm, PROMPTS, beam)] == \
        [g.token_ids for g in generate(lm, PROMPTS, beam, batch_size=4)]


@pytest.mark.slow
def test_smollm2_greedy_and_beam_match_transformers(smollm2):
    prompts = ["The capital of France is", "def fibonacci(n):"]
    lm = LoadedModel(smollm2.model, smollm2.tokenizer, name=smollm2.name, chat=False)
    tok = lm.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    for cfg, kwargs in [(DecodingConfig(max_new_tokens=16), dict(do_sample=False)),
                        (DecodingConfig(strategy="beam", num_beams=4, num_return_sequences=2, max_new_tokens=16),
                         dict(do_sample=False, num_beams=4, num_return_sequences=2))]:
        ours = generate(lm, prompts, cfg)
        with torch.no_grad():
            out = lm.model.generate(**enc, max_new_tokens=16, eos_token_id=lm.eos_token_ids,
                                    pad_token_id=tok.pad_token_id, **kwargs)
        theirs = out[:, enc.input_ids.shape[1]:].tolist()
        for g, ref in zip(ours, theirs, strict=True):
            assert g.token_ids == ref[:len(g.token_ids)]
            assert all(t == tok.pad_token_id for t in ref[len(g.token_ids):])


def test_masking_finished_rows_gives_the_same_tokens(lm, monkeypatch):
    """Finished rows are dropped from the batch; the masked alternative (kept for the benchmark) agrees."""
    from decodetune.decoding import engine

    configs = [DecodingConfig(max_new_tokens=n) for n in (3, 20, 9, 14)]
    configs[2] = DecodingConfig(strategy="sample", seed=4, max_new_tokens=9, top_k=30)
    dropped = generate(lm, PROMPTS, configs)
    monkeypatch.setattr(engine, "COMPACT_FINISHED_ROWS", False)
    masked = generate(lm, PROMPTS, configs)
    assert [g.token_ids for g in dropped] == [g.token_ids for g in masked]
    assert [len(g.token_ids) for g in dropped] != [20] * 4


def test_other_architecture_gpt2(tiny_tokenizer):
    """Nothing Llama-specific: a tiny random GPT-2 (learned positions) matches too, batched."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=1, eos_token_id=2, initializer_range=0.2)).eval()
    gpt2 = LoadedModel(model, tiny_tokenizer)
    gpt2.eos_token_ids = list(EOS)
    for cfg, kwargs in [(DecodingConfig(max_new_tokens=12), dict(do_sample=False)),
                        (DecodingConfig(strategy="beam", num_beams=3, num_return_sequences=2, max_new_tokens=12),
                         dict(do_sample=False, num_beams=3, num_return_sequences=2))]:
        theirs, _ = hf_generate(gpt2, PROMPTS, max_new_tokens=12, **kwargs)
        assert_same(generate(gpt2, PROMPTS, cfg), theirs)
