"""Model folders we write carry exactly the tensor names ``save_pretrained`` writes (issue 10: vLLM does not
re-tie a tied embedding, so a folder holding only ``lm_head.weight`` serves nothing but end-of-text)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import build_tiny_model
from decodetune.errors import UserError
from decodetune.models.layout import pretrained_state_dict, save_model_folder

EMB = "model.embed_tokens.weight"


def _names(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def _reference(model, tmp_path) -> set[str]:
    ref = tmp_path / "reference"
    model.save_pretrained(str(ref), safe_serialization=True)
    return _names(ref)


@pytest.fixture
def tied(tiny_tokenizer):
    return build_tiny_model(len(tiny_tokenizer), tie_word_embeddings=True)


@pytest.mark.parametrize("tie", [True, False])
def test_folder_names_equal_save_pretrained(tiny_tokenizer, tmp_path, tie):
    model = build_tiny_model(len(tiny_tokenizer), tie_word_embeddings=tie)
    out = save_model_folder(model, tmp_path / "ours", tiny_tokenizer)
    assert _names(out) == _reference(model, tmp_path)
    assert EMB in _names(out) and ("lm_head.weight" in _names(out)) == (not tie)
    assert (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_written_by_hand_when_save_pretrained_refuses(tied, tmp_path, monkeypatch):
    """The fallback writes the same names, config and generation config (and reloads to the same model)."""
    want = _reference(tied, tmp_path)

    def refuse(*a, **k):
        raise ValueError("The model is quantized with gguf and is not serializable")

    monkeypatch.setattr(tied, "save_pretrained", refuse)
    out = save_model_folder(tied, tmp_path / "ours")
    assert _names(out) == want
    assert {"config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(str(out))
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.model.embed_tokens.weight, tied.model.embed_tokens.weight)


def test_tie_removal_without_transformers_helper(tied, tmp_path, monkeypatch):
    """Our own tie removal (for transformers without the helper) keeps the name save_pretrained keeps."""
    import transformers.modeling_utils as mu

    want = _reference(tied, tmp_path)
    monkeypatch.delattr(mu, "remove_tied_weights_from_state_dict")
    assert set(pretrained_state_dict(tied)) == want


def test_quantizer_of_a_dequantized_model_is_cleared(tied, tmp_path):
    """A GGUF-loaded model keeps a quantizer that save_pretrained refuses; once it is cleared the folder is a
    plain one (no quantization_config in config.json)."""
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    quantizer = GgufHfQuantizer(GgufConfig(gguf_file="m.gguf", dequantize=True))
    tied.hf_quantizer, tied.config.quantization_config = quantizer, quantizer.quantization_config
    with pytest.raises(ValueError, match="not serializable"):
        tied.save_pretrained(str(tmp_path / "refused"))
    out = save_model_folder(tied, tmp_path / "ours")
    assert EMB in _names(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    packed = build_tiny_model(16, tie_word_embeddings=True)
    packed.hf_quantizer = GgufHfQuantizer(GgufConfig(gguf_file="m.gguf"))
    packed.hf_quantizer.packed_modules = {"model.layers.0.mlp.up_proj": object()}
    with pytest.raises(UserError, match="still quantized"):
        save_model_folder(packed, tmp_path / "packed")


def test_students_are_written_the_same_way(tied, tiny_tokenizer, tmp_path):
    """A distilled student (from a GGUF-loaded teacher too) is a save_pretrained folder without GGUF config."""
    from transformers import GgufConfig

    from decodetune.train.distill.student import StudentSpec, build_student, save_student

    tied.config.quantization_config = GgufConfig(gguf_file="m.gguf")
    student, _ = build_student(tied, StudentSpec(num_hidden_layers=1))
    assert not hasattr(student.config, "quantization_config")
    out = save_student(student, tiny_tokenizer, tmp_path / "student")
    assert _names(out) == _reference(student, tmp_path) and EMB in _names(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def _greedy(folder) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = []
    for q in ("What is 12 plus 7?", "The capital of France is"):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


@pytest.mark.slow
def test_builtin_folder_is_a_save_pretrained_folder():
    """The converted smollm2 holds model.embed_tokens.weight (what vLLM reads) and answers as before."""
    from decodetune.models.builtin import BUILTIN_MODELS, ensure_builtin, gguf_path, model_dir

    spec = BUILTIN_MODELS["smollm2-135m"]
    folder = ensure_builtin("smollm2-135m", progress=False)
    assert folder == model_dir("smollm2-135m") and gguf_path("smollm2-135m").exists()
    names = _names(folder)
    assert EMB in names and "lm_head.weight" not in names and len(names) == 272
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    got = _greedy(folder)
    assert all(len(g) > 0 for g in got) and got[0][0] != 2  # answers, not end-of-text at once
    old = folder.parent / f"smollm2-135m-{spec.version}"  # the layout-v1 folder, if an older cache has one
    if (old / ".decodetune-complete").exists():
        assert got == _greedy(old)
