"""Diverse (group) beam search is token-exact against transformers v4's ``_group_beam_search``.

The reference ids and scores are recorded in tests/data/reference_strategies.json by
tests/data/make_reference_strategies.py (transformers 4.55.4, on the tiny Llama in tests/data/tiny-llama/;
regenerate with ``/tmp/tf4env/bin/python tests/data/make_reference_strategies.py`` after creating that venv
as the script's docstring says); test_contrastive.py reruns v4 live when /tmp/tf4env exists.
"""

from __future__ import annotations

import pytest

from decodetune import DecodingConfig
from decodetune.decoding import generate
from decodetune.decoding.diverse_beam import GroupHypotheses
from strategy_refs import cases, mismatches, tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.mark.parametrize("case", cases("diverse_beam"), ids=lambda c: c["name"])
def test_matches_transformers_v4(lm, case):
    assert mismatches(lm, case) == []


def test_one_prompt_at_a_time_gives_the_batched_ids(lm):
    case = cases("diverse_beam")[1]
    assert mismatches(lm, case, batch_size=case["config"]["num_beams"]) == []


def test_hypotheses_keep_the_best_and_stop_by_rule():
    h = GroupHypotheses(2, length_penalty=1.0, early_stopping=False, max_new_tokens=10)
    for sum_lp, length, name in ((-4.0, 2, "a"), (-9.0, 3, "b"), (-3.0, 3, "c")):
        h.add(sum_lp, length, ([], [], name, None))
    assert sorted(item[2] for _, item in h.beams) == ["a", "c"]  # -2 and -1 kept, -3 dropped
    assert h.worst_score == -2.0
    assert h.is_done(-7.0, 3)  # early_stopping False: best attainable -7/3 cannot beat the worst kept (-2)
    assert not h.is_done(-5.0, 3)  # -5/3 could
    never = GroupHypotheses(1, length_penalty=1.0, early_stopping="never", max_new_tokens=10)
    never.add(-2.0, 2, ([], [], "x", None))  # score -1
    assert not never.is_done(-8.0, 4)  # "never" looks at length 10: -0.8 > -1, keep going
    false = GroupHypotheses(1, length_penalty=1.0, early_stopping=False, max_new_tokens=10)
    false.add(-2.0, 2, ([], [], "x", None))
    assert false.is_done(-8.0, 4)  # False looks at the current length: -2 <= -1
    assert GroupHypotheses(1, 1.0, True, 10).is_done(0.0, 1) is False  # nothing finished yet


def test_groups_differ_where_plain_beams_agree(lm):
    """With a large penalty, the first tokens of the groups' best beams differ."""
    lm.eos_token_ids = [2]
    cfg = DecodingConfig(strategy="diverse_beam", num_beams=4, num_beam_groups=4, diversity_penalty=50.0,
                         max_new_tokens=6, num_return_sequences=4)
    gens = generate(lm, ["Paris"], cfg)
    assert len({g.token_ids[0] for g in gens}) == 4
    assert [g.sequence_index for g in gens] == [0, 1, 2, 3]
    assert gens[0].score >= gens[-1].score


def test_stop_string_ends_a_hypothesis(lm):
    lm.eos_token_ids = [2]
    base = dict(strategy="diverse_beam", num_beams=4, num_beam_groups=2, diversity_penalty=0.5, max_new_tokens=10)
    free = generate(lm, ["Once upon a time"], DecodingConfig(**base))[0]
    stop = free.text[2:5]
    cut = generate(lm, ["Once upon a time"], DecodingConfig(**base, stop=[stop]))[0]
    assert stop not in cut.text
    assert cut.finish_reason in ("stop", "eos", "length")
    assert any(g.finish_reason == "stop" for g in generate(
        lm, ["Once upon a time"], DecodingConfig(**{**base, "num_return_sequences": 4}, stop=[stop])))


@pytest.mark.slow
@pytest.mark.parametrize("case", cases("diverse_beam", "smollm2-135m"), ids=lambda c: c["name"])
def test_smollm2_matches_transformers_v4(smollm2, case):
    from decodetune.models.handle import LoadedModel

    raw = LoadedModel(smollm2.model, smollm2.tokenizer, name="smollm2", chat=False)  # the recorded raw prompts
    assert mismatches(raw, case) == []
