"""The vllm backend (vLLM's offline ``LLM``).

Two parts:

* Everywhere: the pure pieces of :mod:`decodetune.backends.vllm` (the ``SamplingParams`` mapping, finish
  reasons, timings, prompt rendering, model resolution, the missing-vllm error) and the request plumbing
  of ``generate`` on a stand-in engine object. None of them imports vLLM.
* On a GPU machine with vLLM installed: generate, evaluate and a tiny tune on the builtin model through a
  real ``vllm.LLM``. Elsewhere these are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest

from decodetune.backends import BackendOptions, Request, open_backend, unsupported
from decodetune.backends.capabilities import VLLM, VLLM_ORDER
from decodetune.backends.vllm import (
    MISSING,
    VLLMBackend,
    finish_reason,
    folder_fingerprint,
    import_vllm,
    render_ids,
    resolve_model,
    sampling_kwargs,
    timings_of,
    to_generation,
)
from decodetune.config import DecodingConfig
from decodetune.errors import UserError
from decodetune.export import ExportError

GREEDY = DecodingConfig(strategy="greedy", max_new_tokens=8)
SAMPLE = DecodingConfig(strategy="sample", temperature=0.7, top_k=20, min_p=0.05, max_new_tokens=8,
                        sampler_order=list(VLLM_ORDER))


# ---------------------------------------------------------------------------------------------- pure pieces
def test_greedy_maps_to_temperature_zero_without_seed():
    kw, copies = sampling_kwargs(GREEDY, seed=123)
    assert kw == {"max_tokens": 8, "n": 1, "temperature": 0.0} and copies == 1
    kw, _ = sampling_kwargs(GREEDY.replace(repetition_penalty=1.2, stop=["\n"], min_new_tokens=2), seed=1,
                            logprobs=True)
    assert kw == {"max_tokens": 8, "n": 1, "temperature": 0.0, "repetition_penalty": 1.2, "stop": ["\n"],
                  "min_tokens": 2, "logprobs": 1}


def test_sample_maps_every_sampler_and_the_row_seed():
    cfg = SAMPLE.replace(top_p=0.9, presence_penalty=0.5, frequency_penalty=0.25, num_return_sequences=3,
                         seed=5)
    kw, copies = sampling_kwargs(cfg, seed=77, logprobs=True)
    assert kw == {"max_tokens": 8, "n": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                  "presence_penalty": 0.5, "frequency_penalty": 0.25, "seed": 77, "logprobs": 1}
    assert copies == 1  # vLLM's own n draws the candidates, seeded from the one row seed
    kw, _ = sampling_kwargs(SAMPLE.replace(top_k=0), seed=0)
    assert kw["top_k"] == -1 and kw["seed"] == 0  # -1: vLLM's "no top_k"


def test_temperature_zero_candidates_are_one_sequence_repeated():
    cfg = DecodingConfig(strategy="sample", temperature=0.0, num_return_sequences=2, max_new_tokens=4)
    kw, copies = sampling_kwargs(cfg, seed=9)
    assert kw["n"] == 1 and "seed" not in kw and copies == 2  # vLLM refuses n > 1 at temperature 0


def test_capabilities_refuse_what_vllm_cannot_run():
    for field, cfg in {"typical_p": DecodingConfig(strategy="sample", typical_p=0.5),
                       "strategy": DecodingConfig(strategy="beam", num_beams=2),
                       "no_repeat_ngram_size": DecodingConfig(no_repeat_ngram_size=3),
                       # transformers' default order applies top_p before min_p; vLLM does min_p first
                       "sampler_order": DecodingConfig(strategy="sample", top_p=0.9, min_p=0.1)}.items():
        assert field in [name for name, _ in unsupported(cfg, VLLM)]
    assert unsupported(SAMPLE, VLLM) == []
    with pytest.raises(ExportError, match="typical_p"):  # strict: never dropped silently
        sampling_kwargs(DecodingConfig(strategy="sample", typical_p=0.5), seed=0)


def test_finish_reason_mapping():
    assert finish_reason("length", None) == "length"
    assert finish_reason("stop", None) == "eos"  # the EOS token
    assert finish_reason("stop", 2) == "eos"  # a stop token id (an end-of-turn token)
    assert finish_reason("stop", 2, stop_token_ids=[2]) == "stop"  # the config's stop_token_ids: as in torch
    assert finish_reason("stop", "\n") == "stop"  # a stop string
    for odd in ("abort", None):
        with pytest.raises(UserError, match="finish_reason"):
            finish_reason(odd, None)


def test_timings_from_metrics_or_the_batch():
    v1 = SimpleNamespace(scheduled_ts=10.0, first_token_ts=10.5, last_token_ts=12.0)
    assert timings_of(v1, 9.0) == ({"prefill_s": 0.5, "decode_s": 1.5, "total_s": 2.0}, "vllm")
    v0 = SimpleNamespace(first_scheduled_time=1.0, first_token_time=1.25, last_token_time=2.0)
    assert timings_of(v0, 9.0)[0]["total_s"] == 1.0
    off = SimpleNamespace(scheduled_ts=0.0, first_token_ts=0.0, last_token_ts=0.0)  # stats logging off
    assert timings_of(off, 3.0) == timings_of(None, 3.0) == ({"total_s": 3.0}, "batch")


def _completion(ids, text="hi", reason="stop", stop_reason=None, logprobs=None, index=0):
    return SimpleNamespace(index=index, text=text, token_ids=ids, finish_reason=reason, stop_reason=stop_reason,
                           cumulative_logprob=None, logprobs=logprobs)


def test_completion_output_to_generation():
    lps = [{5: SimpleNamespace(logprob=-0.5), 9: SimpleNamespace(logprob=-0.1)}, {2: SimpleNamespace(logprob=-1.0)}]
    g = to_generation(_completion([5, 2], logprobs=lps), index=3, sequence=1, seed=7, num_prompt_tokens=11,
                      timings={"total_s": 1.0}, logprobs=True)
    assert (g.text, g.token_ids, g.finish_reason, g.prompt_index, g.sequence_index) == ("hi", [5, 2], "eos", 3, 1)
    assert g.logprobs == [-0.5, -1.0] and g.score == -1.5 and g.seed == 7 and g.num_prompt_tokens == 11
    g = to_generation(_completion([5], reason="length"), index=0, sequence=0, seed=None, num_prompt_tokens=1,
                      timings={}, logprobs=False)
    assert g.logprobs is None and g.finish_reason == "length" and g.num_tokens == 1


def test_render_matches_the_torch_engine(tiny_pair):
    from conftest import build_tiny_tokenizer
    from decodetune.models.handle import LoadedModel

    model, _ = tiny_pair
    tok = build_tiny_tokenizer()
    chat = [{"role": "user", "content": "What is 12 plus 7?"}]
    for use_chat in (False, True):
        if use_chat:
            tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
        lm = LoadedModel(model, tok, chat=use_chat)
        for prompt in ("The quick brown fox", chat):
            assert render_ids(tok, prompt, use_chat) == lm.encode(prompt)


def test_missing_vllm_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(UserError) as e:
        import_vllm()
    assert str(e.value) == MISSING and "pip install vllm" in MISSING and "\n" not in MISSING
    with pytest.raises(UserError, match="pip install vllm"):  # before any model is resolved or converted
        open_backend("smollm2-135m", BackendOptions(name="vllm"))


def test_resolve_model_forms(tmp_path, monkeypatch):
    import decodetune.models.builtin as builtin

    monkeypatch.setattr(builtin, "ensure_builtin", lambda name, progress=True: tmp_path)
    assert resolve_model("smollm2-135m") == (str(tmp_path), "smollm2-135m", tmp_path)
    assert resolve_model(tmp_path) == (str(tmp_path.resolve()), str(tmp_path.resolve()), tmp_path.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")[2] is None  # a hub id: vLLM fetches it
    with pytest.raises(UserError, match="llamacpp"):
        resolve_model(str(tmp_path / "m.gguf"))
    with pytest.raises(UserError, match="not a model folder"):
        resolve_model(str(tmp_path / "missing"))


def test_folder_fingerprint_sees_config_and_weight_changes(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 3_000_000)
    (tmp_path / "README.md").write_text("ignored")
    first = folder_fingerprint(tmp_path)
    (tmp_path / "README.md").write_text("still ignored")
    assert folder_fingerprint(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"x" * 2_999_999 + b"y")  # last byte of the weights
    second = folder_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert len({first, second, folder_fingerprint(tmp_path)}) == 3


# ---------------------------------------------------------------------------------------------- plumbing
class _StandInLLM:
    """Just enough of ``vllm.LLM`` to check what the backend sends: records calls, answers by echo."""

    def __init__(self, tokenizer, max_model_len=64):
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len,
                                                                       dtype="torch.bfloat16"),
                                          engine_core=SimpleNamespace(shutdown=self._shutdown))
        self._tok, self.calls, self.shut = tokenizer, [], 0

    def _shutdown(self):
        self.shut += 1

    def get_tokenizer(self):
        return self._tok

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        outs = []
        for p, kw in zip(prompts, params, strict=True):
            n = kw["n"]
            outs.append(SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], metrics=None, outputs=[
                _completion([7, 2], text=f"s{j}", index=j) for j in reversed(range(n))]))
        return outs


def _stand_in(tok, tmp_path=None, **kw):
    vllm = SimpleNamespace(__version__="0.0.test", SamplingParams=lambda **params: params)
    return VLLMBackend(_StandInLLM(tok, **kw), vllm, model_name="m", folder=tmp_path)


def test_generate_sends_one_call_and_keeps_request_order(tiny_tokenizer):
    b = _stand_in(tiny_tokenizer)
    zero = DecodingConfig(strategy="sample", temperature=0.0, num_return_sequences=2, max_new_tokens=4)
    reqs = [Request("The quick", GREEDY, None), Request("brown fox", SAMPLE.replace(num_return_sequences=2), 7),
            Request("sea shells", zero, 3)]
    out = b.generate(reqs, logprobs=False)
    ((prompts, params),) = b.llm.calls  # the whole batch in one llm.generate call
    assert [p["prompt_token_ids"] for p in prompts] == [b.render(r.prompt) for r in reqs]
    assert "seed" not in params[0] and params[1]["seed"] == 7 and params[1]["n"] == 2 and params[2]["n"] == 1
    assert [(g.prompt_index, g.sequence_index, g.text) for g in out] == [
        (0, 0, "s0"), (1, 0, "s0"), (1, 1, "s1"), (2, 0, "s0"), (2, 1, "s0")]
    assert out[1].seed == out[2].seed == 7 and isinstance(out[0].seed, int)  # a fresh seed is recorded
    assert all(g.finish_reason == "eos" and g.num_prompt_tokens == len(prompts[g.prompt_index]["prompt_token_ids"])
               and g.extra == {"timings_from": "batch"} for g in out)
    assert b.generate([]) == [] and len(b.llm.calls) == 1


def test_too_long_prompt_and_refused_params_are_user_errors(tiny_tokenizer):
    b = _stand_in(tiny_tokenizer, max_model_len=10)
    with pytest.raises(UserError, match=r"prompt #0: .* max_model_len of 10"):
        b.generate([Request("The quick brown fox", GREEDY, 0)])

    def refuse(**kw):
        raise ValueError("temperature must be in [0, 2], got 3.0.")

    b = _stand_in(tiny_tokenizer)
    b._vllm.SamplingParams = refuse
    with pytest.raises(UserError, match=r"request #0: vLLM refused .*temperature must be in \[0, 2\]"):
        b.generate([Request("fox", SAMPLE.replace(temperature=3.0), 0)])
    assert b.llm.calls == []


def test_identity_default_config_and_close(tiny_tokenizer, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    b = _stand_in(tiny_tokenizer, tmp_path)
    ident = b.identity()
    assert ident == f"vllm:0.0.test:m:{folder_fingerprint(tmp_path)}:bfloat16:raw" and b.capabilities() is VLLM
    assert b.default_config() is None  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6,
                                                                 "top_p": 0.9}))
    assert b.default_config() == DecodingConfig(strategy="sample", temperature=0.6, top_p=0.9)
    llm = b.llm
    b.close()
    b.close()
    assert llm.shut == 1 and b.llm is None


# ---------------------------------------------------------------------------------------------- real vLLM, GPU
def _gpu_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "vLLM offline backend needs a GPU; no GPU on this machine"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM offline backend needs vllm: pip install vllm"
    return None


gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=_gpu_reason() or "")


@pytest.fixture(scope="module")
def backend():
    """The builtin smollm2-135m in a real vllm.LLM (one per module: it holds most of the GPU's memory)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # a broken install (e.g. a torch it was not built for)
        pytest.skip(f"vllm does not import here ({type(e).__name__}: {e})")
    b = open_backend("smollm2-135m", BackendOptions(name="vllm", n_ctx=2048))
    yield b
    b.close()


@gpu
def test_gpu_greedy_generates_and_repeats(backend):
    import vllm

    assert backend.identity().startswith(f"vllm:{vllm.__version__}:smollm2-135m:")
    prompts = [f"What is {a} plus {a}? Answer with just the number." for a in (1, 4, 7)]
    reqs = [Request(p, GREEDY, None) for p in prompts]
    first, second = backend.generate(reqs, logprobs=True), backend.generate(reqs[::-1])
    assert [g.prompt_index for g in first] == [0, 1, 2]
    assert [g.token_ids for g in first] == [g.token_ids for g in second[::-1]]
    for g, p in zip(first, prompts, strict=True):
        assert g.text.strip() and g.finish_reason in ("eos", "length") and 0 < g.num_tokens <= 8
        assert g.num_prompt_tokens == len(backend.render(p)) and len(g.logprobs) == len(g.token_ids)
        assert all(lp <= 0 for lp in g.logprobs) and g.timings["total_s"] > 0


@gpu
def test_gpu_seeds_candidates_stop_and_length(backend):
    cfg = SAMPLE.replace(num_return_sequences=2, max_new_tokens=12)
    a = backend.generate([Request("Tell me a story.", cfg, 7)])
    b = backend.generate([Request("Say something.", GREEDY, 0), Request("Tell me a story.", cfg, 7)])
    assert [g.sequence_index for g in a] == [0, 1] and all(g.seed == 7 for g in a)
    assert [g.token_ids for g in a] == [g.token_ids for g in b[1:]]  # the row seed reproduces, any batch
    question = "What is the capital of France?"
    stop, length = backend.generate([Request(question, GREEDY.replace(stop=[" "], max_new_tokens=16), 0),
                                     Request(question, GREEDY.replace(max_new_tokens=3), 0)])
    assert stop.finish_reason == "stop" and stop.text.strip() and " " not in stop.text
    assert length.finish_reason == "length" and length.num_tokens == 3


@gpu
def test_gpu_evaluate_and_tiny_tune(backend, tmp_path):
    from decodetune.evaluation import evaluate
    from decodetune.tuning import tune

    res = evaluate(backend, "arith", limit=4)
    assert res.backend == "vllm" and len(res.rows) == 4 and res.num_tokens > 0
    assert 0.0 <= res.metrics["numeric_match"].value <= 1.0
    out = tune(backend, "arith", search="random", n_trials=3, limit=4, out_dir=tmp_path, prune=False)
    assert len([t for t in out.study.trials if t.state.name == "COMPLETE"]) == 3
