"""TokenState for rows at different steps: rebuilt from (prompt, output so far), it must give every processor
the same result as the state each row grew step by step alone; the in-place stages never touch the input."""

from __future__ import annotations

import pytest
import torch

from decodetune import DecodingConfig
from decodetune.decoding.processors import RowParams, TokenState, apply_processors

VOCAB = 60
EOS = [2]
PROMPTS = [[5, 6, 7, 5, 6], [9], [3, 4, 3, 4, 3, 4, 8, 9, 10]]
OUTPUTS = [[7, 5, 6, 11, 7, 5], [], [3, 4, 12]]  # three rows at three different steps
CONFIGS = [
    DecodingConfig(repetition_penalty=1.5, penalty_last_n=4, presence_penalty=0.7, frequency_penalty=0.3,
                   min_new_tokens=8, stop_token_ids=[11, 40]),
    DecodingConfig(no_repeat_ngram_size=2, min_new_tokens=1, logit_bias={4: 2.0}, dry_multiplier=0.8,
                   dry_allowed_length=1),
    DecodingConfig(no_repeat_ngram_size=3, frequency_penalty=0.5, penalty_last_n=5, dry_multiplier=1.2,
                   dry_allowed_length=1, dry_penalty_last_n=4, min_new_tokens=4, stop_token_ids=[3]),
]


class Chars:
    """A tokenizer of one token per character (ids = code points), enough for DRY's breakers."""

    def __len__(self) -> int:
        return VOCAB

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [chr(i + 65) for i in ids]

    def decode(self, ids: list[int], **kwargs) -> str:
        return "".join(chr(i + 65) for i in ids)


def params(configs):
    return RowParams.from_configs(configs, "cpu", tokenizer=Chars())


def grown(configs, i: int) -> TokenState:
    """Row ``i`` alone, its outputs appended one step at a time."""
    state = TokenState([PROMPTS[i]], 10, VOCAB, params([configs[i]]), EOS, "cpu")
    for tok in OUTPUTS[i]:
        state.append(torch.tensor([tok]))
    return state


@pytest.mark.parametrize("windowed", [True, False])  # penalty tables from the window, or kept up to date
def test_a_state_rebuilt_from_outputs_equals_each_row_grown_alone(windowed):
    configs = CONFIGS if windowed else [c.replace(penalty_last_n=-1) for c in CONFIGS]
    rebuilt = TokenState(PROMPTS, 10, VOCAB, params(configs), EOS, "cpu", outputs=OUTPUTS)
    assert rebuilt.windowed == windowed and (rebuilt.counts is None) == windowed
    assert rebuilt.generated.tolist() == [6, 0, 3] == rebuilt.generated_counts()
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    for step in range(3):  # and it stays equal as every row takes the same new tokens
        ours = apply_processors(logits, rebuilt)
        for i in range(3):
            alone = grown(configs, i)
            for tok in [13, 5, 6][:step]:
                alone.append(torch.tensor([tok]))
            assert torch.equal(ours[i], apply_processors(logits[i:i + 1], alone)[0]), (step, i)
        rebuilt.append(torch.tensor([[13, 5, 6][step]] * 3))
        assert rebuilt.generated_counts() == [len(o) + step + 1 for o in OUTPUTS]


def test_min_new_tokens_bans_eos_and_each_rows_stop_ids_by_its_own_count():
    configs = [DecodingConfig(min_new_tokens=3, stop_token_ids=[11, 40]), DecodingConfig(min_new_tokens=3),
               DecodingConfig(min_new_tokens=1, stop_token_ids=[7])]
    state = TokenState([[1], [1], [1]], 5, VOCAB, params(configs), EOS, "cpu", outputs=[[4, 4], [], [4]])
    logits = torch.zeros(3, VOCAB)
    out = apply_processors(logits, state)
    banned = [torch.isinf(r).nonzero().flatten().tolist() for r in out]
    assert banned == [[2, 11, 40], [2], []]  # row 2 has its one token already
    assert not torch.isinf(logits).any()  # the input is never written
    state.append(torch.tensor([4, 4, 4]))
    assert not apply_processors(logits, state)[0].isinf().any()
    assert apply_processors(logits, state)[1].isinf().nonzero().flatten().tolist() == [2]


def test_in_place_stages_leave_the_callers_logits_alone():
    configs = [DecodingConfig(no_repeat_ngram_size=2, min_new_tokens=2)] * 2
    state = TokenState([[5, 6, 5], [1, 2]], 4, VOCAB, params(configs), EOS, "cpu")
    logits = torch.randn(2, 3, VOCAB)[:, -1]  # a non-contiguous view, as the model's last position is
    before = logits.clone()
    out = apply_processors(logits, state)
    assert torch.equal(logits, before)
    assert out[0].isinf().nonzero().flatten().tolist() == [2, 6] and out[1].isinf().nonzero().flatten().tolist() == [2]
    finite = ~out.isinf()
    assert torch.equal(out[finite], before[finite])  # every other score exactly as it was


def test_carry_from_copies_mirostat_mu_for_the_rows_that_ran():
    cfg = DecodingConfig(strategy="sample", mirostat=2, mirostat_tau=3.0)
    old = TokenState([[1], [2]], 4, VOCAB, params([cfg, cfg]), EOS, "cpu")
    old.per_row["mirostat_mu"] = torch.tensor([4.5, 5.5])
    new = TokenState([[1], [2], [3]], 4, VOCAB, params([cfg] * 3), EOS, "cpu", outputs=[[7], [8], []])
    new.carry_from(old, [0, 1])
    assert new.per_row["mirostat_mu"].tolist() == [4.5, 5.5, 6.0]  # the joining row starts at 2 tau


def test_carry_from_copies_adaptive_p_average_for_the_rows_that_ran():
    cfg = DecodingConfig(strategy="sample", adaptive_target=0.25, adaptive_decay=0.5)
    old = TokenState([[1], [2]], 4, VOCAB, params([cfg, cfg]), EOS, "cpu")
    old.per_row["adaptive_weighted_sum"] = torch.tensor([0.75, 1.0])
    old.per_row["adaptive_total_weight"] = torch.tensor([1.5, 2.0])
    new = TokenState([[1], [2], [3]], 4, VOCAB, params([cfg] * 3), EOS, "cpu", outputs=[[7], [8], []])
    new.carry_from(old, [0, 1])
    # the joining row starts as llama.cpp's sampler does: target / (1 - decay) over 1 / (1 - decay)
    assert new.per_row["adaptive_weighted_sum"].tolist() == [0.75, 1.0, 0.5]
    assert new.per_row["adaptive_total_weight"].tolist() == [1.5, 2.0, 2.0]
