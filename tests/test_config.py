"""DecodingConfig: validation names the field, JSON/YAML round-trip, aliases, exporters."""

from __future__ import annotations

import json

import pytest

from decodetune.config import DEFAULT_SAMPLER_ORDER, DecodingConfig
from decodetune.errors import ConfigError, UserError
from decodetune.export import ExportError


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"strategy": "beam", "num_beams": 0}, "num_beams"),
        ({"strategy": "beam", "num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"strategy": "nucleus"}, "strategy"),
        ({"min_p": 1.5}, "min_p"),
        ({"typical_p": 0}, "typical_p"),
        ({"epsilon_cutoff": 1.0}, "epsilon_cutoff"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": 100, "max_new_tokens": 10}, "min_new_tokens"),
        ({"early_stopping": "sometimes", "strategy": "beam", "num_beams": 2}, "early_stopping"),
        ({"sampler_order": ["top_k", "mirostat"]}, "sampler_order"),
        ({"top_k": 2.5}, "top_k"),
        ({"temperature": "hot"}, "temperature"),
        ({"num_beams": 4}, "num_beams"),  # greedy has no beams
        ({"adaptive_target": 1.5}, "adaptive_target"),
        ({"adaptive_decay": 1.0}, "adaptive_decay"),  # llama.cpp would clamp it to 0.99 in silence
        ({"adaptive_decay": -0.1}, "adaptive_decay"),
    ],
)
def test_invalid_field_is_named(kwargs, field):
    with pytest.raises(ConfigError) as e:
        DecodingConfig(**kwargs)
    assert e.value.field == field
    assert str(e.value).startswith(field)
    assert "\n" not in str(e.value)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as e:
        DecodingConfig.from_dict({"temprature": 0.5})
    assert e.value.field == "temprature"


def test_beam_size_alias_and_duplicates():
    assert DecodingConfig.from_dict({"strategy": "beam", "beam_size": 4}).num_beams == 4
    with pytest.raises(ConfigError):
        DecodingConfig.from_dict({"strategy": "beam", "beam_size": 4, "num_beams": 4})


def test_json_and_yaml_round_trip(tmp_path):
    cfg = DecodingConfig(strategy="beam_sample", num_beams=3, temperature=0.7, top_k=40, stop=["\n\n"],
                         early_stopping="never", seed=7, sampler_order=["top_k", "temperature"])
    assert DecodingConfig.from_json(cfg.to_json()) == cfg
    assert DecodingConfig.from_yaml(cfg.to_yaml()) == cfg
    for suffix in ("json", "yaml"):
        path = tmp_path / f"c.{suffix}"
        cfg.save(path)
        assert DecodingConfig.load(path) == cfg
    assert json.loads(cfg.to_json(only_set=True))["top_k"] == 40
    assert "top_p" not in json.loads(cfg.to_json(only_set=True))


def test_sampler_order_is_completed_in_default_order():
    cfg = DecodingConfig(strategy="sample", sampler_order="top_p;temperature")
    assert cfg.full_sampler_order[:2] == ["top_p", "temperature"]
    assert sorted(cfg.full_sampler_order) == sorted(DEFAULT_SAMPLER_ORDER)


def test_malformed_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"temperature": 0.5,')
    with pytest.raises(UserError, match="bad.json"):
        DecodingConfig.load(bad)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("temperature: 0.5 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin.yaml:1: not valid UTF-8"):
        DecodingConfig.load(latin)


def test_temperature_zero_sampling_is_greedy():
    assert not DecodingConfig(strategy="sample", temperature=0).is_sampling
    assert DecodingConfig(strategy="sample", temperature=0.5).is_sampling


# ---------------------------------------------------------------- exporters

def test_to_hf_maps_fields():
    cfg = DecodingConfig(strategy="beam", num_beams=4, length_penalty=0.8, early_stopping=True,
                         num_return_sequences=2, no_repeat_ngram_size=3, max_new_tokens=20)
    hf = cfg.to_hf()
    assert hf == {"do_sample": False, "num_beams": 4, "max_new_tokens": 20, "no_repeat_ngram_size": 3,
                  "length_penalty": 0.8, "early_stopping": True, "num_return_sequences": 2}
    from transformers import GenerationConfig

    GenerationConfig(**hf).validate()
    sample = DecodingConfig(strategy="sample", temperature=0.7, top_p=0.9, min_p=0.05).to_hf()
    assert sample["do_sample"] and sample["temperature"] == 0.7 and sample["min_p"] == 0.05


def test_exporters_refuse_unsupported_fields_by_name():
    cfg = DecodingConfig(strategy="sample", presence_penalty=0.5)
    with pytest.raises(ExportError, match="^presence_penalty"):
        cfg.to_hf()
    with pytest.warns(UserWarning, match="presence_penalty"):
        assert "presence_penalty" not in cfg.to_hf(strict=False)
    assert cfg.to_vllm()["presence_penalty"] == 0.5
    with pytest.raises(ExportError, match="^strategy"):
        DecodingConfig(strategy="beam", num_beams=2).to_vllm()
    with pytest.raises(ExportError, match="^top_k"):
        DecodingConfig(strategy="sample", top_k=40).to_openai()
    with pytest.raises(ExportError, match="^eta_cutoff"):
        DecodingConfig(strategy="sample", eta_cutoff=0.001).to_llamacpp()


def test_sampling_fields_do_not_matter_for_greedy_exports():
    # top_k is ignored by greedy decoding, so it is not "set" for the purpose of export
    assert DecodingConfig(strategy="greedy", top_k=40).to_openai()["temperature"] == 0.0


def test_llamacpp_exports_sampler_chain_order():
    flags = DecodingConfig(strategy="sample", temperature=0.8, top_k=40, top_p=0.9,
                           sampler_order=["top_k", "top_p", "temperature"]).to_llamacpp()
    chain = flags[flags.index("--samplers") + 1]
    assert chain.split(";")[:3] == ["top_k", "top_p", "temperature"]
    assert flags[flags.index("--temp") + 1] == "0.8"


def test_vllm_refuses_an_order_it_cannot_reproduce():
    cfg = DecodingConfig(strategy="sample", top_p=0.9, min_p=0.1)  # ours: top_p then min_p
    with pytest.raises(ExportError, match="^sampler_order"):
        cfg.to_vllm()
    ok = DecodingConfig(strategy="sample", top_p=0.9, min_p=0.1,
                        sampler_order=["temperature", "min_p", "top_k", "top_p"]).to_vllm()
    assert ok["min_p"] == 0.1 and ok["top_k"] == -1


def test_adaptive_target_below_zero_is_off_and_its_decay_then_unread():
    from decodetune.config_checks import unread_fields

    cfg = DecodingConfig(strategy="sample", adaptive_target=-0.5, adaptive_decay=0.5)
    assert cfg.adaptive_target == -1.0 and "adaptive_decay" in unread_fields(cfg)
    on = DecodingConfig(strategy="sample", adaptive_target=0.0)  # 0 is a target (llama.cpp: < 0 is off)
    assert on.adaptive_target == 0.0 and "adaptive_decay" not in unread_fields(on)
    assert {"adaptive_target", "adaptive_decay"} <= unread_fields(on.replace(mirostat=2))
