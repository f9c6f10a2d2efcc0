"""The fast CPU Linear paths (decoding/fast_linear.py: split float32, packed bf16): equal to F.linear, used only
where bit-exact and faster, and the model left as it was. The token-level proof is tests/test_decoding_exact.py
(greedy and beam against transformers' generate() on the tiny Llama and on smollm2), which runs through it."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from decodetune import DecodingConfig
from decodetune.decoding import fast_linear, generate
from decodetune.decoding.fast_linear import fast_linears, split_linear


@pytest.fixture(autouse=True)
def two_threads():
    """The split runs with 2 or more torch threads; an earlier test may have left 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_split_linear_equals_f_linear(shape, rows):
    weight = torch.randn(*shape)
    x = torch.randn(rows, shape[1])
    for parts in fast_linear.PARTS:
        torch.testing.assert_close(split_linear(x, weight, None, parts), nn.functional.linear(x, weight),
                                   rtol=1e-5, atol=1e-5)
    bias = torch.randn(shape[0])
    torch.testing.assert_close(split_linear(x, weight, bias, 2), nn.functional.linear(x, weight, bias),
                               rtol=1e-5, atol=1e-5)


def test_split_path_runs_only_where_bit_exact(lm, monkeypatch):
    calls = {"split": 0}
    real = fast_linear.split_linear

    def counting(*args):
        calls["split"] += 1
        return real(*args)

    monkeypatch.setattr(fast_linear, "split_linear", counting)
    monkeypatch.setattr(fast_linear, "_exact", {})
    monkeypatch.setattr(fast_linear, "_is_faster", lambda *a: True)  # whatever this CPU's timing says
    prompts = ["hello there", "the cat sat"]
    ours = generate(lm, prompts, DecodingConfig(max_new_tokens=6))
    checked = fast_linear.exactness_checked()
    assert checked, "no linear went through the split check"
    assert calls["split"] > len(checked), "the split path never ran"
    # a machine where a split is not bit-exact keeps F.linear there: the tokens do not depend on it
    monkeypatch.setattr(fast_linear, "_exact", {key: False for key in checked})
    calls["split"] = 0
    plain = generate(lm, prompts, DecodingConfig(max_new_tokens=6))
    assert calls["split"] == 0 and [g.token_ids for g in plain] == [g.token_ids for g in ours]
    # ... and so does a CPU where the split is exact but slower
    monkeypatch.setattr(fast_linear, "_exact", {key: True for key in checked})
    monkeypatch.setattr(fast_linear, "_is_faster", lambda *a: False)
    slower = generate(lm, prompts, DecodingConfig(max_new_tokens=6))
    assert calls["split"] == 0 and [g.token_ids for g in slower] == [g.token_ids for g in ours]


def _slowed(fn):
    def slow(*args, **kwargs):
        time.sleep(0.002)
        return fn(*args, **kwargs)
    return slow


def test_a_path_is_chosen_only_where_it_times_faster(monkeypatch):
    layers = fast_linear.LayerKind([nn.Linear(64, 64) for _ in range(4)])
    real_split, real_linear = fast_linear.split_linear, nn.functional.linear
    monkeypatch.setattr(fast_linear, "_faster", {})
    monkeypatch.setattr(fast_linear, "split_linear", _slowed(real_split))
    assert not fast_linear._is_faster("split", layers, 1)
    monkeypatch.setattr(fast_linear, "_faster", {})
    monkeypatch.setattr(fast_linear, "split_linear", real_split)
    monkeypatch.setattr(nn.functional, "linear", _slowed(real_linear))
    assert fast_linear._is_faster("split", layers, 1) and fast_linear._is_faster("split", layers, 1)
    monkeypatch.setattr(nn.functional, "linear", real_linear)
    assert fast_linear._is_faster("split", layers, 1)  # timed once per rows bucket: 1 row is decided
    fast_linear._is_faster("split", layers, 3)  # 2-3 rows: a bucket of its own, timed afresh (either answer)
    assert [key[1] for key in fast_linear.paths_timed()] == [1, 2]


def test_the_model_is_left_as_it_was(lm):
    linears = [m for m in lm.model.modules() if type(m) is nn.Linear]
    with fast_linears(lm.model):
        on = sum("forward" in m.__dict__ for m in linears)
    assert on == len(linears)
    assert not any("forward" in m.__dict__ for m in linears)
    with pytest.raises(RuntimeError), fast_linears(lm.model):
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in linears)


def test_many_rows_and_autograd_keep_f_linear(monkeypatch):
    layer = nn.Linear(64, 32)
    seen = []
    monkeypatch.setattr(fast_linear, "split_linear", lambda *a: seen.append(a) or nn.functional.linear(*a[:3]))
    with fast_linears(layer):
        layer(torch.randn(fast_linear.MAX_ROWS + 1, 64))  # more rows than MAX_ROWS on a small weight
        layer(torch.randn(1, 64))  # grad enabled and the weight requires grad: training is left alone
    assert seen == []


needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_mkldnn
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_packed_bf16_equals_f_linear_and_follows_weight_changes(rows):
    layer = nn.Linear(576, 1536).to(torch.bfloat16)
    x = torch.randn(2, rows, 576).to(torch.bfloat16)
    with torch.inference_mode():
        for _ in range(2):
            reference = nn.functional.linear(x, layer.weight, layer.bias)
            torch.testing.assert_close(fast_linear.packed_linear(x, layer), reference, rtol=1e-2, atol=1e-2)
            layer.weight.mul_(2)  # in place: the cached packing must not be reused


@needs_mkldnn
def test_bf16_model_tokens_do_not_depend_on_the_packed_path(tiny_pair, monkeypatch):
    from decodetune.models.handle import LoadedModel

    model, tok = tiny_pair
    half = LoadedModel(__import__("copy").deepcopy(model).to(torch.bfloat16), tok, name="tiny-bf16")
    monkeypatch.setattr(fast_linear, "_exact", {})
    monkeypatch.setattr(fast_linear, "_is_faster", lambda *a: True)
    cfg = DecodingConfig(max_new_tokens=8)
    fast = generate(half, ["hello there", "the cat sat"], cfg)
    checked = fast_linear.exactness_checked()
    assert any(key[0] == "packed" for key in checked), checked
    monkeypatch.setattr(fast_linear, "_exact", {key: False for key in checked})
    plain = generate(half, ["hello there", "the cat sat"], cfg)
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]


@needs_mkldnn
def test_packed_weights_live_only_within_the_block_and_big_models_are_not_packed(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64)).to(torch.bfloat16)
    x = torch.randn(1, 64).to(torch.bfloat16)
    with torch.inference_mode():
        with fast_linears(model):
            model(x)
            assert len(fast_linear._packed) == 2
        assert len(fast_linear._packed) == 0
        monkeypatch.setattr(fast_linear, "PACK_MAX_BYTES", 64 * 32 * 2)  # smaller than the two weights
        with fast_linears(model):
            assert not any("forward" in m.__dict__ for m in model)
