"""The llamacpp backend against llama-cpp-python's own API on the embedded GGUF.

References: ``Llama`` (the bindings' high-level class: its own context, its chat formatter, one sequence
at a time) and sampler chains built with the bindings' ``LlamaSampler`` from the *exported llama.cpp
flags*, following llama.cpp's ``common_sampler_init`` (``--samplers`` order, ``-1`` = context size,
``dist(seed)`` last, ``--temp 0`` = argmax after penalties).
"""

from __future__ import annotations

import sys

import pytest

from decodetune.backends import BackendOptions, Request, check_config, open_backend
from decodetune.config import DecodingConfig
from decodetune.errors import UserError

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")

N_CTX = 1024
PROMPTS = ["What is the capital of France?", "Count to five.", "Name a colour.", "Write one word."]


@pytest.fixture(scope="module")
def backend():
    b = open_backend("smollm2-135m", BackendOptions(name="llamacpp", n_ctx=N_CTX, n_seq_max=4, n_threads=2))
    yield b
    b.close()


def reference_tokens(bare, prompt_ids: list[int], flags: list[str], n_new: int) -> list[int]:
    """Decode one sequence with a chain built from llama.cpp flags (the bindings' own samplers)."""
    from llama_cpp._internals import LlamaSampler

    opt = {flags[i]: flags[i + 1] for i in range(0, len(flags) - 1, 2) if flags[i].startswith("-")}
    temp = float(opt.get("--temp", 0.8))
    last_n = int(opt.get("--repeat-last-n", 64))
    last_n = bare.n_ctx() if last_n == -1 else last_n
    chain = LlamaSampler()
    penalties = (float(opt.get("--repeat-penalty", 1.0)), float(opt.get("--frequency-penalty", 0.0)),
                 float(opt.get("--presence-penalty", 0.0)))
    names = opt["--samplers"].split(";") if "--samplers" in opt else ["penalties"]
    for name in names:
        if name == "penalties":
            chain.add_penalties(bare.n_vocab(), last_n, *penalties)
        elif temp <= 0:
            continue  # --temp 0: only the argmax survives the chain
        elif name == "temperature":
            chain.add_temp(temp)
        elif name == "top_k" and int(opt["--top-k"]) > 0:
            chain.add_top_k(int(opt["--top-k"]))
        elif name == "top_p":
            chain.add_top_p(float(opt["--top-p"]), 1)
        elif name == "min_p":
            chain.add_min_p(float(opt["--min-p"]), 1)
        elif name == "typ_p":
            chain.add_typical(float(opt["--typical"]), 1)
    chain.add_greedy() if temp <= 0 else chain.add_dist(int(opt["--seed"]))
    return decode_with_chain(bare, chain, prompt_ids, n_new)


def decode_with_chain(bare, chain, prompt_ids: list[int], n_new: int) -> list[int]:
    """Bare llama-cpp-python: the prompt through ``chain`` (its penalties see it), then up to ``n_new`` draws."""
    bare.reset()
    bare._ctx.kv_cache_clear()
    bare.eval(prompt_ids)
    for tok in prompt_ids:
        chain.accept(tok)
    out: list[int] = []
    while len(out) < n_new:
        tok = chain.sample(bare._ctx, -1)
        out.append(tok)
        if llama_cpp.llama_vocab_is_eog(bare._model.vocab, tok):
            break
        bare.eval([tok])
    return out


def test_chat_prompt_is_what_llama_cpp_python_formats(backend, bare):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(bare.metadata["tokenizer.chat_template"],
                              eos_token=bare._model.token_get_text(bare.token_eos()),
                              bos_token=bare._model.token_get_text(bare.token_bos()))
    res = fmt(messages=[{"role": "user", "content": PROMPTS[0]}])
    assert backend.render(PROMPTS[0]) == bare.tokenize(res.prompt.encode(), add_bos=not res.added_special,
                                                       special=True)


def test_greedy_batched_equals_bare_llama_one_by_one(backend, bare):
    gens = backend.generate([Request(p, DecodingConfig(max_new_tokens=20)) for p in PROMPTS])
    for p, g in zip(PROMPTS, gens, strict=True):
        assert g.token_ids == reference_tokens(bare, backend.render(p), ["--temp", "0"], 20), p
        assert g.finish_reason in ("eos", "length") and g.text.strip()


@pytest.mark.parametrize("cfg", [
    DecodingConfig(strategy="sample", temperature=0.9, top_k=40, top_p=0.9, max_new_tokens=16, seed=7),
    DecodingConfig(strategy="sample", temperature=1.3, min_p=0.1, repetition_penalty=1.3, presence_penalty=0.5,
                   max_new_tokens=16, seed=11, sampler_order=["min_p", "temperature", "top_k", "top_p",
                                                              "typical_p", "epsilon_cutoff", "eta_cutoff"]),
    DecodingConfig(strategy="greedy", repetition_penalty=1.5, frequency_penalty=0.4, max_new_tokens=16),
])
def test_exported_flags_reproduce_the_backend_tokens(backend, bare, cfg):
    flags = cfg.to_llamacpp()  # strict: the config is exactly expressible
    gens = backend.generate([Request(PROMPTS[1], cfg, cfg.seed)])
    assert gens[0].token_ids == reference_tokens(bare, backend.render(PROMPTS[1]), flags, cfg.max_new_tokens)


def test_seeded_rows_do_not_depend_on_the_batch(backend):
    target = Request(PROMPTS[2], DecodingConfig(strategy="sample", temperature=1.0, top_p=0.95, max_new_tokens=16),
                     seed=123)
    alone = backend.generate([target])[0]
    others = [Request(p, DecodingConfig(strategy="sample", temperature=0.7, top_k=20, max_new_tokens=24), seed=i)
              for i, p in enumerate(PROMPTS)]
    mixed = backend.generate(others[:2] + [target] + others[2:] + [Request(PROMPTS[0], DecodingConfig())])
    assert mixed[2].token_ids == alone.token_ids and mixed[2].seed == 123


def test_candidates_share_a_prefill_and_equal_their_own(backend):
    from decodetune.backends.llamacpp import sequence_seed

    cfg = DecodingConfig(strategy="sample", temperature=1.0, max_new_tokens=12, num_return_sequences=3)
    three = backend.generate([Request(PROMPTS[3], cfg, seed=5)])
    assert [g.sequence_index for g in three] == [0, 1, 2]
    single = cfg.replace(num_return_sequences=1)
    for j in range(3):  # sequence j of seed 5 is sequence 0 of seed sequence_seed(5, j)
        own = backend.generate([Request(PROMPTS[3], single, seed=sequence_seed(5, j))])[0]
        assert own.token_ids == three[j].token_ids


def test_stop_strings_and_logprobs(backend):
    cfg = DecodingConfig(max_new_tokens=40, stop=[","])
    g = backend.generate([Request(PROMPTS[0], cfg)], logprobs=True)[0]
    assert g.finish_reason in ("stop", "eos", "length")
    if g.finish_reason == "stop":
        assert "," not in g.text
    assert len(g.logprobs) == len(g.token_ids) and all(lp <= 0 for lp in g.logprobs)


def test_capabilities_refuse_what_llama_cpp_lacks(backend):
    for cfg, field in ((DecodingConfig(strategy="beam", num_beams=4), "strategy"),
                       (DecodingConfig(strategy="sample", epsilon_cutoff=0.01), "epsilon_cutoff"),
                       (DecodingConfig(no_repeat_ngram_size=3), "no_repeat_ngram_size")):
        with pytest.raises(UserError, match=f"{field}: backend 'llamacpp'"):
            check_config(cfg, backend)


def test_evaluate_and_tune_on_llamacpp(backend, tmp_path):
    from decodetune.eval import evaluate
    from decodetune.tuning import tune

    res = evaluate(backend, "arith", limit=4, bootstrap=0)
    assert res.backend == "llamacpp" and len(res.rows) == 4 and all(r["num_tokens"] > 0 for r in res.rows)
    out = tune(backend, "arith", search="random", n_trials=3, limit=4, out_dir=tmp_path, prune=False)
    assert out.study.user_attrs["backend"] == "llamacpp"
    assert all(t.user_attrs["config"]["strategy"] in ("greedy", "sample") for t in out.study.trials
               if t.state.name == "COMPLETE")  # the default space is cut down: no beams
    exports = out.study.user_attrs["exports"]["targets"]
    assert exports["llamacpp"]["exact"] and "approximate" not in exports["llamacpp"]["file"]


def test_cli_refuses_a_beam_space_before_loading(tmp_path, capsys):
    from decodetune.cli.main import main

    space = tmp_path / "s.yaml"
    space.write_text("strategy: [greedy, beam]\nnum_beams: [2, 4]\n")
    code = main(["tune", "--backend", "llamacpp", "--task", "arith", "--space", str(space), "--out",
                 str(tmp_path / "o"), "--trials", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "strategy" in err[0] and "llamacpp" in err[0], err


def test_missing_bindings_name_the_extra(monkeypatch):
    from decodetune.backends import llamacpp as mod

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(UserError, match=r'pip install -e "\.\[llamacpp\]"'):
        mod._import_llama()


def test_verify_pairs_the_same_items_in_two_engines(backend):
    from decodetune.backends import as_backend
    from decodetune.evaluation.portability import verify
    from decodetune.models import load_model

    torch_engine = as_backend(load_model("smollm2-135m"))
    res = verify({"strategy": "greedy"}, "arith", torch_engine, backend, limit=6, bootstrap=200)
    assert res.reference.backend == "torch" and res.target.backend == "llamacpp"
    assert res.reference.item_ids == res.target.item_ids
    d = next(p for p in res.differences if p.metric == "numeric_match")
    assert d.diff == pytest.approx(res.target.score - res.reference.score) and d.n_items == 6
    assert "tuned in torch, served by llamacpp: numeric_match" in res.sentence()


def test_verify_cli_refuses_a_config_the_target_cannot_run(capsys):
    from decodetune.cli.main import main

    code = main(["verify", "--config", '{"strategy": "beam", "num_beams": 4}', "--task", "arith",
                 "--backend", "llamacpp", "--limit", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "strategy: backend 'llamacpp'" in err[0], err
