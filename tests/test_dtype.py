"""Weight precision (issue 13): ``load_model(..., dtype=fp32 | bf16 | int8)``, ``--dtype``, the cache identity
and the study record. Exactness against transformers stays on fp32 (test_decoding_exact)."""

from __future__ import annotations

import difflib

import optuna
import pytest
import torch
from torch import nn

from decodetune.backends import BackendOptions, open_backend
from decodetune.cache import cache_key, model_fingerprint
from decodetune.config import DecodingConfig
from decodetune.decoding import generate
from decodetune.errors import UserError
from decodetune.models import load_model
from decodetune.models.precision import RowScaledInt8Linear, dtype_of
from decodetune.tasks.base import Task, TaskItem
from decodetune.tuning import tune
from decodetune.tuning.study import resolve_storage

PROMPTS = ["The quick brown", "Once upon a time"]


def _linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_tiny_model_loads_and_decodes(tiny_pair, dtype):
    model, _ = tiny_pair
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lm = load_model(tiny_pair, dtype=dtype)
    assert lm.dtype == dtype and dtype_of(lm.model) == dtype
    vocab = model.config.vocab_size
    for cfg in ({"max_new_tokens": 8}, {"strategy": "sample", "temperature": 0.8, "top_p": 0.9,
                                         "max_new_tokens": 8, "seed": 3}):
        for g in generate(lm, PROMPTS, cfg, logprobs=True):
            assert 1 <= len(g.token_ids) <= 8 and all(0 <= t < vocab for t in g.token_ids)
            assert all(lp <= 0 and lp == lp for lp in g.logprobs)  # float32 log-probs, no NaN
    # the caller's model is a different object and is left exactly as it was
    assert lm.model is not model and type(model.lm_head) is nn.Linear
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_bf16_casts_parameters_and_keeps_rotary_buffers_float32(tiny_pair):
    lm = load_model(tiny_pair, dtype="bf16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.model.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained(dtype=bf16) leaves it


def test_int8_quantises_every_linear_and_keeps_the_embedding(tiny_pair):
    model, _ = tiny_pair
    lm = load_model(tiny_pair, dtype="int8")
    wrapped = {n for n, m in lm.model.named_modules() if isinstance(m, RowScaledInt8Linear)}
    assert wrapped == _linear_names(model)  # every Linear, the LM head included
    assert not _linear_names(lm.model)  # no float Linear left
    assert lm.model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(lm.model.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_int8_tied_head_stays_the_embedding(tiny_tokenizer):
    from conftest import build_tiny_model

    tied = build_tiny_model(len(tiny_tokenizer), seed=2, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    lm = load_model((tied, tiny_tokenizer), dtype="int8")
    head = lm.model.lm_head.inner.weight().dequantize()  # the quantised copy of the (tied) embedding
    emb = lm.model.model.embed_tokens.weight
    assert torch.equal(emb, tied.model.embed_tokens.weight)
    assert (head - emb).abs().max() <= emb.abs().amax(dim=1).max() / 127 + 1e-6
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.inference_mode():
        ref, got = tied(ids).logits, lm.model(ids).logits
    assert torch.corrcoef(torch.stack([ref.flatten(), got.flatten()]))[0, 1] > 0.99


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated")
def test_row_scaling_gives_each_token_its_own_scale():
    """With one outlier token in the batch, the rescaled layer matches row-by-row calls (each its own
    scale); the bare kernel's shared scale is far off for the small rows."""
    import copy

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(6, 64)
    x[0] *= 500.0  # smollm2's first token has activations hundreds of times the others'
    bare = quantize_dynamic(copy.deepcopy(lin), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    scaled = RowScaledInt8Linear(copy.deepcopy(bare)[0])
    with torch.inference_mode():
        exact = lin(x)
        rows = torch.cat([bare(x[i:i + 1]) for i in range(len(x))])
        err_scaled = (scaled(x) - exact)[1:].abs().max()
        err_bare = (bare(x) - exact)[1:].abs().max()
        assert torch.allclose(scaled(x)[1:], rows[1:], atol=0.05)
    assert err_scaled * 10 < err_bare


def test_load_from_folder_each_dtype_is_its_own_model(model_dir):
    fp32, bf16, int8 = (load_model(str(model_dir), dtype=d) for d in ("fp32", "bf16", "int8"))
    assert (fp32.dtype, bf16.dtype, int8.dtype) == ("fp32", "bf16", "int8")
    assert load_model(str(model_dir)) is fp32 and load_model(str(model_dir), dtype="BF16") is bf16
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert generate(int8, PROMPTS[:1], {"max_new_tokens": 4})[0].token_ids


def test_cache_identity_differs_by_dtype(tiny_pair):
    fps = {d: model_fingerprint(load_model(tiny_pair, dtype=d)) for d in ("fp32", "bf16", "int8")}
    assert len(set(fps.values())) == 3
    name, digest = fps["fp32"].rsplit(":", 1)
    assert ":fp32" not in fps["fp32"]  # fp32 keys are what they were before dtypes existed
    assert fps["int8"] == f"{name}:int8:{digest}"  # the int8 model is identified by its fp32 source weights
    assert fps["bf16"].startswith(f"{name}:bf16:")
    cfg = DecodingConfig()
    assert len({cache_key(fp, [1, 2, 3], cfg, None) for fp in fps.values()}) == 3
    assert open_backend(tiny_pair, BackendOptions(dtype="int8")).identity() == fps["int8"]


def test_bad_dtype_and_backends_that_fix_the_precision():
    with pytest.raises(UserError, match=r"^dtype: must be one of fp32, bf16, int8, got 'fp16'"):
        load_model("smollm2-135m", dtype="fp16")
    with pytest.raises(UserError, match=r"^--dtype: must be one of"):
        BackendOptions(dtype="float32")
    for name, extra in (("llamacpp", {}), ("openai", {"base_url": "http://127.0.0.1:9/v1"})):
        with pytest.raises(UserError, match=rf"^--dtype: the {name} backend"):
            BackendOptions(name=name, dtype="fp32", **extra)
    with pytest.raises(UserError, match=r"^--dtype: the vllm backend takes fp32 or bf16"):
        BackendOptions(name="vllm", dtype="int8")
    assert BackendOptions(name="vllm", dtype="BF16").dtype == "bf16"
    assert BackendOptions(name="llamacpp").dtype is None


def test_study_records_the_dtype_and_refuses_another_on_resume(tiny_pair, tmp_path):
    items = [TaskItem(id=f"e{i}", prompt=p, references=["x"]) for i, p in enumerate(PROMPTS * 3)]
    task = Task(name="echo", kind="closed", metrics=["exact_match"], extract="none",
                splits={"dev": items[:4], "test": items[4:]}, defaults={"max_new_tokens": 3})
    kw = dict(search="random", n_trials=1, out_dir=tmp_path, prune=False, final_test=False)
    res = tune(load_model(tiny_pair, dtype="bf16"), task, **kw)
    assert res.study_name.endswith("-bf16-random") or "bf16" in res.study_name
    study = optuna.load_study(study_name=res.study_name, storage=resolve_storage(None, tmp_path).storage)
    assert study.user_attrs["dtype"] == "bf16"
    with pytest.raises(UserError, match="different dtype"):
        tune(load_model(tiny_pair), task, study_name=res.study_name, **kw)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_smollm2_reduced_precision_stays_close_to_fp32(smollm2, dtype):
    """Greedy text on a short prompt: bf16 nearly the same as fp32, int8 still on topic (not exact)."""
    prompt = ["What is the capital of France?"]
    ref = generate(smollm2, prompt, {"max_new_tokens": 12})[0]
    low = generate(load_model("smollm2-135m", dtype=dtype), prompt, {"max_new_tokens": 12})[0]
    assert "Paris" in ref.text and "Paris" in low.text
    if dtype == "bf16":
        assert difflib.SequenceMatcher(None, ref.token_ids, low.token_ids).ratio() >= 0.75
