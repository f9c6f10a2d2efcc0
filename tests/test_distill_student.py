"""Student construction, norms (BatchNorm over real tokens only), saving and loading."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model
from decodetune.errors import UserError
from decodetune.models.norms import MaskedBatchNorm
from decodetune.train.distill.student import (
    StudentSpec,
    build_student,
    load_student,
    maybe_patch_norm,
    save_student,
)


def test_masked_batchnorm_statistics_come_from_real_tokens_only() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    garbage = x.clone()
    garbage[0, 3:] = 1e6  # what sits at padded positions must not matter
    bn_a, bn_b = MaskedBatchNorm(4), MaskedBatchNorm(4)
    bn_a.train(), bn_b.train()
    bn_a.token_mask, bn_b.token_mask = mask, mask
    ya, yb = bn_a(x), bn_b(garbage)
    real = mask.bool()
    assert torch.allclose(ya[real], yb[real], atol=1e-6)
    assert torch.allclose(bn_a.running_mean, bn_b.running_mean) and torch.allclose(bn_a.running_var, bn_b.running_var)
    tokens = x[real]  # (8, 4): the reference statistics
    mean, var = tokens.mean(0), tokens.var(0, unbiased=False)
    assert torch.allclose(ya[real], (tokens - mean) / torch.sqrt(var + bn_a.eps), atol=1e-5)
    assert torch.allclose(bn_a.running_mean, 0.1 * mean, atol=1e-6)
    assert torch.allclose(bn_a.running_var, 0.9 + 0.1 * tokens.var(0, unbiased=True), atol=1e-6)
    bn_a.eval()  # eval mode: running statistics, whatever the batch
    assert torch.allclose(bn_a(x)[0], bn_a(x[:1])[0], atol=1e-6)


def test_padding_never_changes_batchnorm_statistics_in_a_model(tiny_tokenizer) -> None:
    teacher = build_tiny_model(len(tiny_tokenizer), num_hidden_layers=2)
    student, _ = build_student(teacher, StudentSpec(num_hidden_layers=2, norm="batchnorm"), seed=0)
    ids = torch.tensor([[1, 5, 6, 7, 0, 0], [1, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    wide_ids = torch.cat([ids, torch.full((2, 3), 17)], dim=1)  # 3 more padded columns, non-pad ids
    wide_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    bns = [m for m in student.modules() if isinstance(m, MaskedBatchNorm)]
    assert len(bns) == 2 * 2 + 1
    student.train()
    a = student(input_ids=ids, attention_mask=mask).logits
    stats_a = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]
    for b in bns:  # reset so that the second pass starts from the same running statistics
        b.running_mean.zero_(), b.running_var.fill_(1.0)
    b_out = student(input_ids=wide_ids, attention_mask=wide_mask).logits
    real = mask.bool()
    assert torch.allclose(a[real], b_out[:, :6][real], atol=1e-4)
    for (m, v), bn in zip(stats_a, bns, strict=True):
        assert torch.allclose(m, bn.running_mean, atol=1e-5) and torch.allclose(v, bn.running_var, atol=1e-5)
    assert all(b.token_mask is None for b in bns)  # the hook clears the mask after each forward


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "batchnorm"])
def test_save_and_load_round_trip(tmp_path, tiny_tokenizer, norm: str) -> None:
    teacher = build_tiny_model(len(tiny_tokenizer), num_hidden_layers=4)
    student, info = build_student(teacher, StudentSpec(num_hidden_layers=2, norm=norm), seed=0)
    assert info["init"] == "extract" and info["teacher_layers"] == [0, 3]
    student.train()
    student(input_ids=torch.tensor([[1, 5, 6, 7]]))  # moves BatchNorm running statistics off their init
    student.eval()
    out = save_student(student, tiny_tokenizer, tmp_path / "student")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("decodetune_norm", "rmsnorm") == norm
    assert not list(tmp_path.glob(".student.*"))  # no temp dir left behind
    loaded, tok = load_student(out)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    assert torch.allclose(loaded(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)
    from decodetune import generate, load_model
    from decodetune.config import DecodingConfig

    lm = load_model(str(out), reuse=False)  # what every other command (tune, eval...) does
    assert torch.allclose(lm.model(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)
    greedy = generate(lm, ["The quick brown"], DecodingConfig(max_new_tokens=5))[0].token_ids
    want = student.generate(torch.tensor([lm.encode("The quick brown")]), max_new_tokens=5, do_sample=False,
                            eos_token_id=2, pad_token_id=0)[0, len(lm.encode("The quick brown")):].tolist()
    assert greedy == want[: len(greedy)] and greedy
    if norm == "rmsnorm":  # a stock Llama: plain transformers loads it, no remote code
        from transformers import LlamaForCausalLM

        stock = LlamaForCausalLM.from_pretrained(str(out)).eval()
        assert torch.allclose(stock(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)
        assert maybe_patch_norm(stock, out) is stock


def test_layer_extraction_copies_teacher_layers(tiny_tokenizer) -> None:
    teacher = build_tiny_model(len(tiny_tokenizer), num_hidden_layers=4)
    student, info = build_student(teacher, StudentSpec(num_hidden_layers=2, teacher_layers=[1, 2]))
    t_layers, s_layers = teacher.model.layers, student.model.layers
    assert torch.equal(s_layers[0].mlp.up_proj.weight, t_layers[1].mlp.up_proj.weight)
    assert torch.equal(s_layers[1].self_attn.q_proj.weight, t_layers[2].self_attn.q_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert info["non_embedding_params"] * 2 == pytest.approx(info["teacher_non_embedding_params"], rel=0.01)


def test_random_init_with_other_sizes_and_bad_specs(tiny_tokenizer) -> None:
    teacher = build_tiny_model(len(tiny_tokenizer), num_hidden_layers=2)
    small, info = build_student(teacher, StudentSpec(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                                     num_attention_heads=2, num_key_value_heads=1))
    assert info["init"] == "random" and info["copied"] == []
    assert small.config.hidden_size == 32 and small.config.head_dim == 16
    with pytest.raises(UserError, match="init: extract copies whole layers, so hidden_size"):
        build_student(teacher, StudentSpec(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                           init="extract"))
    with pytest.raises(UserError, match="out of range"):
        build_student(teacher, StudentSpec(num_hidden_layers=1, teacher_layers=[5]))
    with pytest.raises(UserError, match="unknown field 'hiden_size'"):
        StudentSpec.from_dict({"num_layers": 1, "hiden_size": 3}, source="s.yaml")
    with pytest.raises(UserError, match="s.yaml: norm must be one of"):
        StudentSpec.from_dict({"num_layers": 1, "norm": "groupnorm"}, source="s.yaml")
