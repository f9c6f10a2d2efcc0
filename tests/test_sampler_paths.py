"""The samplers' cheaper paths keep exactly what the plain computation keeps: top-k ranks only the rows that
truncate, top-p's full-sort path (the one CUDA takes, without a host sync) equals its depth shortcut."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as hf

from decodetune import DecodingConfig
from decodetune.decoding import sampler as S
from decodetune.decoding.processors import RowParams


def rows_of(**per_row) -> RowParams:
    n = len(next(iter(per_row.values())))
    return RowParams.from_configs([DecodingConfig(strategy="sample", **{k: v[i] for k, v in per_row.items()})
                                   for i in range(n)], "cpu")


@pytest.mark.parametrize("min_keep", [1, 3])
def test_top_k_with_rows_at_zero_ranks_only_the_others(monkeypatch, min_keep):
    logits = torch.randn(5, 3000, generator=torch.Generator().manual_seed(3)) * 2
    logits[1, 10] = logits[1, 11] = logits[1].max() + 1  # a tie at the top
    ks = [0, 2, 50, 0, 1]
    depths = []
    real = torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, k, **kw: depths.append((x.shape[0], k)) or real(x, k, **kw))
    ours = S.top_k(logits, rows_of(top_k=ks), min_keep)
    assert depths == [(3, max(50, min_keep))]  # the two rows at 0 are not ranked, nothing full-vocabulary
    for i, k in enumerate(ks):
        ref = logits[i:i + 1] if k == 0 else hf.TopKLogitsWarper(k, min_tokens_to_keep=min_keep)(None, logits[i:i + 1])
        assert torch.equal(ours[i:i + 1], ref)
    assert S.top_k(logits, rows_of(top_k=[0, 5000]), min_keep) is logits  # nothing to cut: no copy either


@pytest.mark.parametrize("scale", [8.0, 0.05])
def test_top_p_full_sort_path_equals_the_depth_shortcut_on_every_row_mix(scale):
    logits = torch.randn(4, 6000, generator=torch.Generator().manual_seed(1)) * scale
    rows = rows_of(top_p=[0.3, 0.9, 1.0, 0.99])
    probs = logits.softmax(dim=1)
    shortcut = S._top_p_keep(probs, rows, 1, S.TOP_P_DEPTHS)
    assert torch.equal(S._top_p_keep(probs, rows, 1, ()), shortcut)
    # rows the shortcut leaves to the full sort go through the same no-sync branch as a subset
    mixed = torch.cat([logits[:1] * 40, logits[1:]])
    probs = mixed.softmax(dim=1)
    assert torch.equal(S._top_p_keep(probs, rows, 1, (256,)), S._top_p_keep(probs, rows, 1, ()))
