"""Contrastive search is token-exact against transformers v4's ``_contrastive_search``.

The reference ids are recorded in tests/data/reference_strategies.json by
tests/data/make_reference_strategies.py (transformers 4.55.4, on the tiny Llama in tests/data/tiny-llama/;
regenerate with ``/tmp/tf4env/bin/python tests/data/make_reference_strategies.py`` after creating that venv
as the script's docstring says). ``test_reference_is_live_v4`` reruns v4 when /tmp/tf4env exists.
"""

from __future__ import annotations

import pytest
import torch

from decodetune import DecodingConfig
from decodetune.decoding import generate
from decodetune.decoding.contrastive import degeneration_choice
from decodetune.errors import UserError
from strategy_refs import V4_PYTHON, cases, mismatches, run_v4_check, tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.mark.parametrize("case", cases("contrastive"), ids=lambda c: c["name"])
def test_matches_transformers_v4(lm, case):
    assert mismatches(lm, case) == []


@pytest.mark.parametrize("case", cases("contrastive")[:2], ids=lambda c: c["name"])
def test_batch_size_does_not_change_tokens(lm, case):
    """Rows one at a time (batch_size=top_k) give the recorded batched ids too."""
    assert mismatches(lm, case, batch_size=case["config"]["top_k"]) == []


def test_alpha_zero_is_greedy(lm):
    prompts = ["The quick brown fox", "Paris"]
    lm.eos_token_ids = [2]
    greedy = generate(lm, prompts, DecodingConfig(max_new_tokens=16))
    contrastive = generate(lm, prompts, DecodingConfig(strategy="contrastive", penalty_alpha=0.0, top_k=4,
                                                       max_new_tokens=16))
    assert [g.token_ids for g in contrastive] == [g.token_ids for g in greedy]
    # the same logprobs summed, from forwards of other batch shapes: equal to float32 rounding (on an Intel
    # Xeon the 16-token sums differ by 1e-5 of 36; on an AMD EPYC they were equal to 1e-5)
    assert [c.score for c in contrastive] == pytest.approx([g.score for g in greedy], rel=5e-6)


def test_penalty_picks_least_similar_candidate():
    """alpha = 1: the candidate whose hidden state is least like any earlier one wins; padding is ignored."""
    context = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # the last position is padding
    mask = torch.tensor([[1, 1, 0]])
    candidates = torch.tensor([[[1.0, 0.1]], [[1.0, 1.0]], [[0.1, 1.0]]])  # cos max: ~0.995, ~0.707, ~0.995
    probs = torch.tensor([[0.8, 0.1, 0.1]])
    one = torch.tensor([[0.0]])
    assert degeneration_choice(context, mask, candidates, probs, one, torch.tensor([[1.0]])).tolist() == [1]
    # alpha = 0: the model's most likely candidate
    assert degeneration_choice(context, mask, candidates, probs, torch.tensor([[1.0]]), one).tolist() == [0]


def test_stop_string_and_max_new_tokens(lm):
    lm.eos_token_ids = [2]
    free = generate(lm, ["Once upon a time"], DecodingConfig(strategy="contrastive", penalty_alpha=0.5, top_k=3,
                                                             max_new_tokens=12))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop = free.text[3:6]
    cut = generate(lm, ["Once upon a time"], DecodingConfig(strategy="contrastive", penalty_alpha=0.5, top_k=3,
                                                            max_new_tokens=12, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)]
    assert stop not in cut.text and free.text.startswith(cut.text)


def test_diverse_beam_refuses_the_token_controls_contrastive_has(lm):
    out = generate(lm, ["Paris"], DecodingConfig(strategy="contrastive", penalty_alpha=0.5, top_k=3, top_logprobs=2,
                                                 max_new_tokens=3))
    assert len(out[0].top_logprobs) == len(out[0].token_ids)
    with pytest.raises(UserError, match="top_logprobs"):
        generate(lm, ["Paris"], DecodingConfig(strategy="diverse_beam", num_beams=4, num_beam_groups=2,
                                               diversity_penalty=0.5, top_logprobs=2))


@pytest.mark.slow
@pytest.mark.parametrize("case", cases("contrastive", "smollm2-135m"), ids=lambda c: c["name"])
def test_smollm2_matches_transformers_v4(smollm2, case):
    from decodetune.models.handle import LoadedModel

    raw = LoadedModel(smollm2.model, smollm2.tokenizer, name="smollm2", chat=False)  # the recorded raw prompts
    assert mismatches(raw, case) == []


@pytest.mark.skipif(not V4_PYTHON.exists(), reason="no transformers v4 venv at /tmp/tf4env (see strategy_refs.py)")
def test_reference_is_live_v4():
    """The recorded file is what transformers v4 outputs today (all strategies, tiny model)."""
    out = run_v4_check()
    assert "DIFFERENT" not in out and out.count("same") == len(cases("contrastive")) + len(cases("diverse_beam"))
