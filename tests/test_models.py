"""Model loading: pairs, HF folders, clear errors, and the embedded model."""

from __future__ import annotations

import pytest

from decodetune.errors import UserError
from decodetune.models import LoadedModel, load_model
from decodetune.models.builtin import BUILTIN_MODELS, is_cached


def test_pair_is_wrapped(tiny_pair):
    model, tok = tiny_pair
    lm = load_model((model, tok))
    assert isinstance(lm, LoadedModel)
    assert lm.eos_token_ids == [2]
    assert not lm.chat  # the tiny tokenizer has no chat template
    assert lm.encode("The quick brown fox") == tok("The quick brown fox")["input_ids"]
    # identity is stable for the same weights and differs for other weights
    assert load_model((model, tok)).name == lm.name
    from conftest import build_tiny_model

    assert load_model((build_tiny_model(len(tok), seed=1), tok)).name != lm.name


def test_hf_folder_round_trip(tmp_path, tiny_pair):
    model, tok = tiny_pair
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), reuse=False)
    assert lm.name == str((tmp_path / "m").resolve())
    import torch

    ids = torch.tensor([tok("Paris is")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, model(ids).logits, atol=1e-5)


def test_chat_template_and_raw(tiny_pair):
    model, base = tiny_pair
    import copy

    chat_tok = copy.deepcopy(base)
    chat_tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    lm = load_model((model, chat_tok))
    assert lm.chat
    assert lm.encode("Paris") == chat_tok.apply_chat_template([{"role": "user", "content": "Paris"}],
                                                              add_generation_prompt=True, tokenize=True)["input_ids"]
    raw = load_model((model, chat_tok), raw=True)
    assert not raw.chat and raw.encode("Paris") == chat_tok("Paris")["input_ids"]


@pytest.mark.parametrize("spec, expected", [
    ("no-such-model", "not a builtin"),
    ("owner/definitely-not-cached-xyz", "not in the local hub cache"),
    ("", "expected a name"),
])
def test_unresolvable_spec_names_what_was_tried(spec, expected, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=expected) as e:
        load_model(spec)
    assert "\n" not in str(e.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))


def test_cli_reports_unresolvable_model(capsys, monkeypatch):
    from decodetune.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--model", "nope/nope", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'nope/nope' could not be resolved") and err.count("\n") == 1


@pytest.mark.slow
def test_embedded_model_loads_from_cache(smollm2):
    assert is_cached("smollm2-135m")
    assert smollm2.chat and smollm2.eos_token_ids == [2]
    assert smollm2.model.config.num_hidden_layers == 30
    assert BUILTIN_MODELS["smollm2-135m"].license == "Apache-2.0"
    # the cached copy is plain fp32 safetensors: no GGUF quantization config left behind
    assert getattr(smollm2.model.config, "quantization_config", None) is None
