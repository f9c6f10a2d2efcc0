"""Exports of the llama.cpp / vLLM sampler fields (DRY, XTC, top-nσ, mirostat, dynatemp, logit_bias, bad_words,
penalty_last_n, stop_token_ids, ignore_eos, top_logprobs) and of the torch-only strategies, to every target.

Flag spellings follow llama.cpp's common/arg.cpp, server keys its tools/server params_from_json, Ollama's
keys its api/types.go Options. The last test sets every field, one at a time, and checks that each
exporter either carries it or names it when dropping it: nothing is dropped in silence.
"""

from __future__ import annotations

import json
import warnings

import pytest

from decodetune import export
from decodetune.config import DecodingConfig
from decodetune.export import NEUTRAL, ExportError
from decodetune.tuning.exports import write_exports

SAMPLE = {"strategy": "sample", "temperature": 0.8, "max_new_tokens": 8}


def cfg(**kw) -> DecodingConfig:
    return DecodingConfig(**{**SAMPLE, **kw})


def pairs(flags: list[str]) -> list[tuple[str, str]]:
    return [(flags[i], flags[i + 1]) for i in range(len(flags) - 1) if flags[i].startswith("--")]


# ------------------------------------------------------------------------------------------------ llama.cpp CLI
def test_llamacpp_flags_for_dry_xtc_top_n_sigma_dynatemp():
    c = cfg(dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=3, dry_penalty_last_n=128,
            dry_sequence_breakers=["\n", "."], xtc_probability=0.5, xtc_threshold=0.2, top_n_sigma=1.5,
            dynatemp_range=0.5, dynatemp_exponent=2.0)
    flags = c.to_llamacpp()
    p = pairs(flags)
    for flag, value in [("--dry-multiplier", "0.8"), ("--dry-base", "2"), ("--dry-allowed-length", "3"),
                        ("--dry-penalty-last-n", "128"), ("--xtc-probability", "0.5"), ("--xtc-threshold", "0.2"),
                        ("--top-nsigma", "1.5"), ("--dynatemp-range", "0.5"), ("--dynatemp-exp", "2")]:
        assert (flag, value) in p, flag
    # the first --dry-sequence-breaker clears llama.cpp's defaults: every breaker is written
    assert [v for f, v in p if f == "--dry-sequence-breaker"] == ["\n", "."]
    # dry after the (absent) penalties, top-nσ and xtc where the default order puts them
    assert dict(p)["--samplers"] == "dry;temperature;top_k;top_p;min_p;typ_p;top_n_sigma;xtc"


def test_llamacpp_dry_breakers_default_and_none():
    assert "--dry-sequence-breaker" not in cfg(dry_multiplier=0.8).to_llamacpp()  # llama.cpp's defaults
    assert pairs(cfg(dry_multiplier=0.8, dry_sequence_breakers=[]).to_llamacpp()).count(
        ("--dry-sequence-breaker", "none")) == 1
    with pytest.raises(ExportError, match="^dry_sequence_breakers"):
        cfg(dry_multiplier=0.8, dry_sequence_breakers=["none"]).to_llamacpp()


def test_llamacpp_mirostat_logit_bias_window_ignore_eos():
    flags = cfg(mirostat=2, mirostat_tau=4.0, mirostat_eta=0.2, logit_bias={15043: 1.0, 7: -100.0},
                ignore_eos=True).to_llamacpp()
    p = pairs(flags)
    assert ("--mirostat", "2") in p and ("--mirostat-ent", "4") in p and ("--mirostat-lr", "0.2") in p
    assert [v for f, v in p if f == "--logit-bias"] == ["7-100", "15043+1"]  # TOKEN(+/-)BIAS
    assert "--ignore-eos" in flags
    pen = pairs(cfg(repetition_penalty=1.1, penalty_last_n=64).to_llamacpp())
    assert ("--repeat-last-n", "64") in pen and ("--repeat-penalty", "1.1") in pen
    assert ("--repeat-last-n", "-1") in pairs(cfg(repetition_penalty=1.1).to_llamacpp())  # the whole context
    # the window alone is no penalty: nothing to write, nothing to refuse
    assert "--repeat-last-n" not in cfg(penalty_last_n=64).to_llamacpp()


def test_llamacpp_greedy_keeps_dry_and_bias_without_a_samplers_chain():
    flags = DecodingConfig(dry_multiplier=0.8, logit_bias={3: -5.0}, max_new_tokens=4).to_llamacpp()
    assert "--samplers" not in flags and ("--temp", "0") in pairs(flags)
    assert ("--dry-multiplier", "0.8") in pairs(flags) and ("--logit-bias", "3-5") in pairs(flags)
    # sampling-only fields are not read by greedy, so not exported
    assert "--xtc-probability" not in DecodingConfig(xtc_probability=0.5).to_llamacpp()


@pytest.mark.parametrize("field,value", [("bad_words", ["foo"]), ("stop_token_ids", [5]), ("top_logprobs", 5),
                                         ("min_new_tokens", 2), ("epsilon_cutoff", 0.001)])
def test_llamacpp_refuses_what_it_lacks(field, value):
    with pytest.raises(ExportError, match=f"^{field}: .*llama.cpp"):
        cfg(**{field: value}).to_llamacpp()
    with pytest.warns(UserWarning, match=f"dropped {field}="):
        cfg(**{field: value}).to_llamacpp(strict=False)


@pytest.mark.parametrize("field,value", [("repetition_penalty", 1.1), ("presence_penalty", 0.3),
                                         ("dry_multiplier", 0.8)])
def test_llamacpp_mirostat_chain_has_no_penalties(field, value):
    with pytest.raises(ExportError, match=f"^{field}: .*with mirostat"):
        cfg(mirostat=1, **{field: value}).to_llamacpp()


# ------------------------------------------------------------------------------------------------ llama-server
def test_llamacpp_server_body():
    body = export.to_llamacpp_server(cfg(dry_multiplier=0.8, xtc_probability=0.5, top_n_sigma=1.5,
                                         dynatemp_range=0.5, logit_bias={7: -100.0}, ignore_eos=True,
                                         top_logprobs=3, repetition_penalty=1.1, penalty_last_n=32, seed=4))
    assert body["dry_multiplier"] == 0.8 and body["dry_sequence_breakers"] == ["\n", ":", '"', "*"]
    assert body["dry_base"] == 1.75 and body["dry_allowed_length"] == 2 and body["dry_penalty_last_n"] == -1
    assert body["xtc_probability"] == 0.5 and "xtc_threshold" not in body  # 0.1: the server's default too
    assert body["top_n_sigma"] == 1.5 and body["dynatemp_range"] == 0.5 and "mirostat" not in body
    assert body["logit_bias"] == [[7, -100.0]] and body["ignore_eos"] is True and body["n_probs"] == 3
    assert body["repeat_last_n"] == 32 and body["repeat_penalty"] == 1.1 and body["seed"] == 4
    assert body["samplers"] == ["penalties", "dry", "temperature", "top_k", "top_p", "min_p", "typ_p",
                                "top_n_sigma", "xtc"]
    miro = export.to_llamacpp_server(cfg(mirostat=1, mirostat_tau=3.0))
    assert (miro["mirostat"], miro["mirostat_tau"]) == (1, 3.0) and "mirostat_eta" not in miro
    for field, value in (("bad_words", ["x"]), ("stop_token_ids", [1])):
        with pytest.raises(ExportError, match=f"^{field}: .*llama-server"):
            export.to_llamacpp_server(cfg(**{field: value}))


def test_adaptive_p_goes_last_in_the_chain_in_place_of_dist():
    """llama.cpp adds adaptive-p last (instead of dist) when --samplers names it, with its two flags."""
    c = cfg(adaptive_target=0.3, adaptive_decay=0.8, min_p=0.05, sampler_order=["min_p", "temperature"])
    p = pairs(c.to_llamacpp())
    assert ("--adaptive-target", "0.3") in p and ("--adaptive-decay", "0.8") in p
    assert dict(p)["--samplers"].split(";")[-1] == "adaptive_p"
    body = export.to_llamacpp_server(c)
    assert body["samplers"][-1] == "adaptive_p" and (body["adaptive_target"], body["adaptive_decay"]) == (0.3, 0.8)
    off = cfg(adaptive_decay=0.5)  # target off: the decay is unread, nothing is written
    assert "--adaptive-decay" not in off.to_llamacpp() and "adaptive_decay" not in export.to_llamacpp_server(off)
    with_mirostat = cfg(mirostat=2, adaptive_target=0.3)  # llama.cpp's mirostat chain has no adaptive-p
    assert "--adaptive-target" not in with_mirostat.to_llamacpp()
    for target in ("vllm", "openai", "ollama", "hf"):
        with pytest.raises(ExportError, match="^adaptive_target: "):
            getattr(export, f"to_{target}")(cfg(adaptive_target=0.3))


# ------------------------------------------------------------------------------------------------ vLLM / OpenAI
def test_vllm_token_controls_and_refusals():
    kw = cfg(logit_bias={5: -100.0}, bad_words=["foo bar"], stop_token_ids=[2, 3], ignore_eos=True,
             top_logprobs=5).to_vllm()
    assert kw["logit_bias"] == {5: -100.0} and kw["bad_words"] == ["foo bar"]
    assert kw["stop_token_ids"] == [2, 3] and kw["ignore_eos"] is True and kw["logprobs"] == 5
    for field, value in (("dry_multiplier", 0.8), ("xtc_probability", 0.5), ("top_n_sigma", 1.0),
                         ("mirostat", 2), ("dynatemp_range", 0.5)):
        with pytest.raises(ExportError, match=f"^{field}: .*vLLM"):
            cfg(**{field: value}).to_vllm()
    with pytest.raises(ExportError, match="^penalty_last_n"):
        cfg(frequency_penalty=0.5, penalty_last_n=16).to_vllm()


def test_openai_params():
    params = cfg(logit_bias={5: -100.0, 12: 3.0}, top_logprobs=4).to_openai()
    assert params["logit_bias"] == {"5": -100.0, "12": 3.0}
    assert params["logprobs"] is True and params["top_logprobs"] == 4
    for field, value in (("ignore_eos", True), ("bad_words", ["a"]), ("stop_token_ids", [1]),
                         ("dry_multiplier", 0.5), ("mirostat", 1)):
        with pytest.raises(ExportError, match=f"^{field}: .*OpenAI"):
            cfg(**{field: value}).to_openai()
    with pytest.raises(ExportError, match="^top_logprobs: .*at most 20"):
        cfg(top_logprobs=21).to_openai()


# ------------------------------------------------------------------------------------------------ Ollama
def test_ollama_modelfile():
    text = export.to_ollama(cfg(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                penalty_last_n=128, seed=3, stop=["</s>", "a\nb"], max_new_tokens=32), base="llama3.2")
    assert text == ('FROM llama3.2\n'
                    'PARAMETER num_predict 32\nPARAMETER temperature 0.7\nPARAMETER top_k 40\nPARAMETER top_p 0.9\n'
                    'PARAMETER min_p 0.05\nPARAMETER repeat_last_n 128\nPARAMETER repeat_penalty 1.1\n'
                    'PARAMETER seed 3\nPARAMETER stop "</s>"\nPARAMETER stop """a\nb"""\n')
    # greedy: temperature 0, neutral samplers written over Ollama's non-neutral defaults
    assert "PARAMETER temperature 0\nPARAMETER top_k 0\nPARAMETER top_p 1\nPARAMETER min_p 0\n" in \
        export.to_ollama(DecodingConfig())
    for field, value in (("typical_p", 0.9), ("dry_multiplier", 0.8), ("logit_bias", {1: 2.0}),
                         ("mirostat", 2), ("num_return_sequences", 2)):
        with pytest.raises(ExportError, match=f"^{field}: .*Ollama"):
            export.to_ollama(cfg(**{field: value}))
    with pytest.raises(ExportError, match="^sampler_order"):  # Ollama: top_k, temperature, top_p, min_p
        export.to_ollama(cfg(top_p=0.9, sampler_order=["top_p", "temperature"]))


# ------------------------------------------------------------------------------------------------ transformers
def test_generation_config_round_trip(tmp_path):
    from transformers import GenerationConfig

    c = cfg(temperature=0.7, top_p=0.9, logit_bias={5: -100.0, 9: 2.5}, repetition_penalty=1.2, stop=["\n"])
    table = write_exports(c, tmp_path, "torch")
    assert table["hf"]["exact"], table["hf"]
    gen = GenerationConfig.from_pretrained(tmp_path / "exports")
    assert gen.do_sample is True and gen.temperature == 0.7 and gen.top_p == 0.9 and gen.repetition_penalty == 1.2
    assert gen.stop_strings == ["\n"]
    assert {tuple(ids): bias for ids, bias in gen.sequence_bias} == {(5,): -100.0, (9,): 2.5}


def test_generation_config_torch_only_strategies(tmp_path):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import GenerationMode

    con = DecodingConfig(strategy="contrastive", top_k=4, penalty_alpha=0.6, max_new_tokens=8)
    table = write_exports(con, tmp_path / "c", "torch")
    assert table["hf"]["exact"] and "contrastive-search" in table["hf"]["requires"][0]
    gen = GenerationConfig.from_pretrained(tmp_path / "c" / "exports")
    assert (gen.penalty_alpha, gen.top_k) == (0.6, 4)
    assert gen.get_generation_mode() == GenerationMode.CONTRASTIVE_SEARCH
    for target in ("vllm", "llamacpp", "openai", "llamacpp_server", "ollama"):  # refused, named
        assert not table[target]["exact"]
        assert any("strategy='contrastive'" in c and "torch engine only" in c for c in table[target]["changes"])
    div = DecodingConfig(strategy="diverse_beam", num_beams=4, num_beam_groups=2, diversity_penalty=0.5)
    write_exports(div, tmp_path / "d", "torch")
    gen = GenerationConfig.from_pretrained(tmp_path / "d" / "exports")
    assert (gen.num_beams, gen.num_beam_groups, gen.diversity_penalty) == (4, 2, 0.5)
    assert gen.get_generation_mode() == GenerationMode.GROUP_BEAM_SEARCH
    with pytest.raises(ExportError, match="^strategy: .*torch engine only"):
        div.to_vllm()


@pytest.mark.parametrize("field,value", [("dry_multiplier", 0.8), ("xtc_probability", 0.5), ("top_n_sigma", 1.0),
                                         ("mirostat", 2), ("dynatemp_range", 0.5), ("bad_words", ["x"]),
                                         ("stop_token_ids", [2]), ("ignore_eos", True), ("top_logprobs", 2)])
def test_hf_refuses_what_transformers_lacks(field, value):
    with pytest.raises(ExportError, match=f"^{field}: .*transformers"):
        cfg(**{field: value}).to_hf()


def test_ignore_eos_semantics_flagged_between_engines(tmp_path):
    table = write_exports(cfg(ignore_eos=True), tmp_path, "torch")
    assert table["vllm"]["exact"]  # vLLM's ignore_eos is the torch engine's: generate past EOS
    assert any("ignore_eos bans end-of-generation tokens there" in c for c in table["llamacpp"]["changes"])
    assert json.loads((tmp_path / "exports" / "vllm_sampling_params.json").read_text())["ignore_eos"] is True


# ------------------------------------------------------------------------------------------------ nothing silent
#: one valid non-neutral value per field (with what must be on for it to be read), on a sampling config
CHANGES: dict[str, tuple[dict, dict]] = {
    "min_new_tokens": ({}, {"min_new_tokens": 2}), "stop": ({}, {"stop": ["\n"]}),
    "temperature": ({}, {"temperature": 0.6}), "top_k": ({}, {"top_k": 40}), "top_p": ({}, {"top_p": 0.9}),
    "min_p": ({}, {"min_p": 0.05}), "typical_p": ({}, {"typical_p": 0.9}),
    "epsilon_cutoff": ({}, {"epsilon_cutoff": 0.001}), "eta_cutoff": ({}, {"eta_cutoff": 0.001}),
    "repetition_penalty": ({}, {"repetition_penalty": 1.2}), "presence_penalty": ({}, {"presence_penalty": 0.5}),
    "frequency_penalty": ({}, {"frequency_penalty": 0.5}), "no_repeat_ngram_size": ({}, {"no_repeat_ngram_size": 3}),
    "penalty_last_n": ({"repetition_penalty": 1.2}, {"penalty_last_n": 16}),
    "dry_multiplier": ({}, {"dry_multiplier": 0.8}),
    "dry_base": ({"dry_multiplier": 0.8}, {"dry_base": 2.0}),
    "dry_allowed_length": ({"dry_multiplier": 0.8}, {"dry_allowed_length": 3}),
    "dry_penalty_last_n": ({"dry_multiplier": 0.8}, {"dry_penalty_last_n": 64}),
    "dry_sequence_breakers": ({"dry_multiplier": 0.8}, {"dry_sequence_breakers": ["."]}),
    "xtc_probability": ({}, {"xtc_probability": 0.5}),
    "xtc_threshold": ({"xtc_probability": 0.5}, {"xtc_threshold": 0.2}),
    "top_n_sigma": ({}, {"top_n_sigma": 1.5}), "mirostat": ({}, {"mirostat": 2}),
    "mirostat_tau": ({"mirostat": 2}, {"mirostat_tau": 4.0}), "mirostat_eta": ({"mirostat": 2}, {"mirostat_eta": 0.2}),
    "dynatemp_range": ({}, {"dynatemp_range": 0.5}),
    "dynatemp_exponent": ({"dynatemp_range": 0.5}, {"dynatemp_exponent": 2.0}),
    "adaptive_target": ({}, {"adaptive_target": 0.3}),
    "adaptive_decay": ({"adaptive_target": 0.3}, {"adaptive_decay": 0.5}),
    "logit_bias": ({}, {"logit_bias": {5: -100.0}}), "bad_words": ({}, {"bad_words": ["foo"]}),
    "stop_token_ids": ({}, {"stop_token_ids": [5]}), "ignore_eos": ({}, {"ignore_eos": True}),
    "top_logprobs": ({}, {"top_logprobs": 5}), "num_return_sequences": ({}, {"num_return_sequences": 2}),
    "seed": ({}, {"seed": 3}),
}
#: fields of a strategy of their own (beams, contrastive, diverse beams): the strategy is refused first
STRATEGY_FIELDS = {"length_penalty", "early_stopping", "penalty_alpha", "num_beam_groups", "diversity_penalty"}
#: transformers seeds through torch.manual_seed, outside GenerationConfig (accepted, not written)
SILENT = {("hf", "seed")}
TARGETS = ("hf", "vllm", "llamacpp", "openai", "llamacpp_server", "ollama")


def _export(target: str, c: DecodingConfig) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(export, f"to_{target}")(c, strict=False)
    return value, [str(w.message) for w in caught]


def test_the_table_covers_every_field():
    assert set(CHANGES) | STRATEGY_FIELDS == set(NEUTRAL)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("field", sorted(CHANGES))
def test_every_set_field_is_exported_or_named(target, field):
    enable, change = CHANGES[field]
    base, _ = _export(target, cfg(**enable))
    value, dropped = _export(target, cfg(**enable, **change))
    named = any(w.startswith(f"dropped {field}=") for w in dropped)
    if (target, field) in SILENT:
        assert value == base and not named
    else:
        assert named != (value != base), (target, field, dropped)  # carried, or dropped by name: never both


# ------------------------------------------------------------------------------------------------ CLI flags
def test_cli_flags_for_container_and_bool_fields():
    import typer
    from typer.testing import CliRunner

    from decodetune.cli.options import build_config, config_options

    app = typer.Typer()

    @app.command()
    @config_options
    def show(config_flags: dict) -> None:
        typer.echo(build_config(config_flags).to_json())

    args = ["--strategy", "sample", "--logit-bias", "15043=-100", "--logit-bias", "7+2.5", "--logit-bias", "9-1",
            "--bad-words", "foo bar", "--bad-words", "baz", "--stop-token-ids", "2", "--stop-token-ids", "3",
            "--dry-multiplier", "0.8", "--dry-sequence-breakers", "\\n", "--dry-sequence-breakers", ".",
            "--ignore-eos", "--mirostat", "2", "--top-logprobs", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    c = DecodingConfig.from_json(result.output[result.output.index("{"):])
    assert c.logit_bias == {15043: -100.0, 7: 2.5, 9: -1.0} and c.bad_words == ["foo bar", "baz"]
    assert c.stop_token_ids == [2, 3] and c.dry_sequence_breakers == ["\n", "."] and c.ignore_eos is True
    assert (c.mirostat, c.top_logprobs, c.dry_multiplier) == (2, 4, 0.8)
    off = CliRunner().invoke(app, ["--no-ignore-eos"])
    assert off.exit_code == 0 and DecodingConfig.from_json(off.output[off.output.index("{"):]).ignore_eos is False


def test_vllm_backend_sampling_params_carry_the_token_controls():
    from decodetune.backends.vllm import sampling_kwargs

    kw, copies = sampling_kwargs(cfg(logit_bias={5: -100.0}, bad_words=["foo"], stop_token_ids=[2], ignore_eos=True),
                                 seed=5)
    assert (kw["logit_bias"], kw["bad_words"], kw["stop_token_ids"], kw["ignore_eos"]) == ({5: -100.0}, ["foo"],
                                                                                          [2], True)
    assert kw["seed"] == 5 and copies == 1
