"""The llamacpp backend with llama.cpp's own samplers beyond transformers' (DRY, XTC, top-nσ, mirostat,
dynamic temperature, logit_bias, the penalty window, ignore_eos, stop_token_ids), on the embedded GGUF.

Each setting must change what is generated, and the tokens must equal those of a reference chain built
with llama-cpp-python's own ``LlamaSampler`` from the *exported llama.cpp flags*, the way llama.cpp's
``common_sampler_init`` builds it (logit_bias first; ``--samplers`` in order; ``--mirostat``: temperature and
mirostat only; ``dist(seed)`` last; ``--temp 0``: the argmax after the penalties and DRY). So a study on this
backend exports exactly. Then the refusals of every backend for what it cannot run.
"""

from __future__ import annotations

import pytest

from decodetune.backends import BackendOptions, Request, check_config, open_backend, unsupported
from decodetune.backends.capabilities import LLAMACPP, OPENAI_ANY, VLLM, static_capabilities
from decodetune.backends.openai_families import family_capabilities
from decodetune.config import DecodingConfig
from decodetune.errors import UserError

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
from test_backend_llamacpp import decode_with_chain  # noqa: E402

N_CTX = 512
FRANCE = "What is the capital of France?"
COPY = "Copy this text: one two three four five six seven eight nine ten"
DEFAULT_CHAIN = "penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature"  # llama.cpp's default


@pytest.fixture(scope="module")
def backend():
    b = open_backend("smollm2-135m", BackendOptions(name="llamacpp", n_ctx=N_CTX, n_seq_max=2, n_threads=2))
    yield b
    b.close()


def parse_flags(flags: list[str]) -> tuple[dict[str, str], dict[str, list[str]], set[str]]:
    """``(single-valued flags, repeated flags, switches)`` of a llama.cpp command line."""
    single: dict[str, str] = {}
    repeated: dict[str, list[str]] = {"--logit-bias": [], "--dry-sequence-breaker": [], "--reverse-prompt": []}
    switches: set[str] = set()
    i = 0
    while i < len(flags):
        if flags[i] in ("--ignore-eos",):
            switches.add(flags[i])
            i += 1
            continue
        (repeated[flags[i]].append if flags[i] in repeated else single.__setitem__)(
            *([flags[i + 1]] if flags[i] in repeated else [flags[i], flags[i + 1]]))
        i += 2
    return single, repeated, switches


def reference_chain(bare, flags: list[str]):
    """A LlamaSampler chain for llama.cpp ``flags``, as ``common_sampler_init`` builds it."""
    from llama_cpp._internals import LlamaSampler

    opt, rep, switches = parse_flags(flags)
    f = lambda k, d: float(opt.get(k, d))  # noqa: E731
    n_vocab, seed, temp = bare.n_vocab(), int(opt.get("--seed", 0)), f("--temp", 0.8)
    window = lambda k, d: bare.n_ctx() if int(opt.get(k, d)) == -1 else int(opt.get(k, d))  # noqa: E731
    chain = LlamaSampler()
    bias = {}
    for item in rep["--logit-bias"]:
        sign = "+" if "+" in item else "-"
        token, value = item.split(sign, 1)
        bias[int(token)] = float(value) * (-1 if sign == "-" else 1)
    if "--ignore-eos" in switches:
        bias.update({t: float("-inf") for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(bare._model.vocab, t)})
    if bias:
        chain.add_logit_bias(n_vocab, bias)
    mirostat = int(opt.get("--mirostat", 0))
    if mirostat and temp > 0:
        chain.add_temp(temp)
        tau, eta = f("--mirostat-ent", 5.0), f("--mirostat-lr", 0.1)
        chain.add_mirostat(n_vocab, seed, tau, eta, 100) if mirostat == 1 else chain.add_mirostat_v2(seed, tau, eta)
        return chain
    breakers = rep["--dry-sequence-breaker"] or ["\n", ":", '"', "*"]
    breakers = [] if breakers == ["none"] else breakers
    for name in opt.get("--samplers", DEFAULT_CHAIN).split(";"):
        if name == "penalties":
            chain.add_penalties(n_vocab, window("--repeat-last-n", 64), f("--repeat-penalty", 1.0),
                                f("--frequency-penalty", 0.0), f("--presence-penalty", 0.0))
        elif name == "dry" and f("--dry-multiplier", 0.0) > 0:
            chain.add_dry(bare._model, f("--dry-multiplier", 0.0), f("--dry-base", 1.75),
                          int(opt.get("--dry-allowed-length", 2)), window("--dry-penalty-last-n", -1), breakers)
        elif temp <= 0:
            continue  # --temp 0: only the argmax survives the chain
        elif name == "temperature":
            chain.add_temp_ext(temp, f("--dynatemp-range", 0.0), f("--dynatemp-exp", 1.0))
        elif name == "top_k" and int(opt.get("--top-k", 40)) > 0:
            chain.add_top_k(int(opt["--top-k"]))
        elif name == "top_p":
            chain.add_top_p(f("--top-p", 0.95), 1)
        elif name == "min_p":
            chain.add_min_p(f("--min-p", 0.05), 1)
        elif name == "typ_p":
            chain.add_typical(f("--typical", 1.0), 1)
        elif name == "top_n_sigma":
            chain.add_top_n_sigma(f("--top-nsigma", -1.0))
        elif name == "xtc":
            chain.add_xtc(f("--xtc-probability", 0.0), f("--xtc-threshold", 0.1), 1, seed)
    if temp <= 0:
        chain.add_greedy()
    elif "adaptive_p" in opt.get("--samplers", DEFAULT_CHAIN).split(";"):  # last, in place of dist
        llama_cpp.llama_sampler_chain_add(chain.sampler, llama_cpp.llama_sampler_init_adaptive_p(
            f("--adaptive-target", -1.0), f("--adaptive-decay", 0.9), seed))
    else:
        chain.add_dist(seed)
    return chain


def reference_tokens(bare, prompt_ids: list[int], flags: list[str], n_new: int) -> list[int]:
    """Decode one sequence with the reference chain for ``flags``."""
    return decode_with_chain(bare, reference_chain(bare, flags), prompt_ids, n_new)


def run(backend, prompt: str, **fields) -> list[int]:
    cfg = DecodingConfig(**{"max_new_tokens": 16, **fields})
    check_config(cfg, backend)
    return backend.generate([Request(prompt, cfg, fields.get("seed"))])[0].token_ids


def assert_matches_reference(backend, bare, prompt: str, **fields) -> list[int]:
    cfg = DecodingConfig(**{"max_new_tokens": 16, **fields})
    ours = run(backend, prompt, **fields)
    assert ours == reference_tokens(bare, backend.render(prompt), cfg.to_llamacpp(), cfg.max_new_tokens)
    return ours


def test_logit_bias_moves_the_greedy_token(backend, bare):
    plain = run(backend, FRANCE)
    banned = assert_matches_reference(backend, bare, FRANCE, logit_bias={plain[0]: -100.0})
    assert banned[0] != plain[0]
    forced = run(backend, FRANCE, logit_bias={plain[3]: 100.0})
    assert forced[0] == plain[3]


def test_dry_changes_a_repetitive_greedy_output(backend, bare):
    # greedy repeats the prompt's sequence word for word; DRY (which, as in llama.cpp, sees the prompt too)
    # penalises the token that would extend a repeat longer than dry_allowed_length
    cfg = DecodingConfig(max_new_tokens=24)
    plain = backend.generate([Request(COPY, cfg)])[0]
    assert "five six seven eight nine" in plain.text.lower()
    dry = assert_matches_reference(backend, bare, COPY, max_new_tokens=24, dry_multiplier=0.8)
    assert dry != plain.token_ids
    text = backend.generate([Request(COPY, cfg.replace(dry_multiplier=0.8))])[0].text.lower()
    assert "five six seven eight nine" not in text


@pytest.mark.parametrize("fields", [
    {"xtc_probability": 1.0, "xtc_threshold": 0.05},
    {"top_n_sigma": 0.5},
    {"mirostat": 2, "mirostat_tau": 2.0},
    {"mirostat": 1, "mirostat_tau": 3.0, "mirostat_eta": 0.2},
    {"dynatemp_range": 0.7, "dynatemp_exponent": 1.5},
    {"dry_multiplier": 1.0, "dry_sequence_breakers": ["."], "repetition_penalty": 1.3, "penalty_last_n": 8},
    {"adaptive_target": 0.2, "adaptive_decay": 0.8, "min_p": 0.02},
], ids=["xtc", "top_n_sigma", "mirostat2", "mirostat1", "dynatemp", "dry_window", "adaptive_p"])
def test_sampler_matches_reference_and_changes_the_draw(backend, bare, fields):
    base = {"strategy": "sample", "temperature": 1.2, "seed": 11, "max_new_tokens": 16}
    plain = run(backend, FRANCE, **base)
    tuned = assert_matches_reference(backend, bare, FRANCE, **base, **fields)
    assert tuned != plain, fields


def test_ignore_eos_and_stop_token_ids(backend):
    short = DecodingConfig(max_new_tokens=24)
    plain = backend.generate([Request(COPY, short)])[0]
    assert plain.finish_reason == "eos", "greedy should end on EOS for this prompt"
    on = backend.generate([Request(COPY, short.replace(ignore_eos=True))])[0]
    assert on.finish_reason == "length" and len(on.token_ids) == 24
    assert not any(llama_cpp.llama_vocab_is_eog(backend._model.vocab, t) for t in on.token_ids)
    stop_at = plain.token_ids[1]
    stopped = backend.generate([Request(COPY, short.replace(stop_token_ids=[stop_at]))])[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == plain.token_ids[:2]
    with pytest.raises(UserError, match="logit_bias: token 999999 is not in the model's vocabulary"):
        backend.generate([Request(COPY, short.replace(logit_bias={999999: 1.0}))])


# ------------------------------------------------------------------------------------------------ refusals
def _first(cfg: DecodingConfig, caps) -> str:
    return unsupported(cfg, caps)[0][0]


def test_llamacpp_refuses_what_its_chain_lacks(backend):
    for cfg, name in [(DecodingConfig(bad_words=["x"]), "bad_words"), (DecodingConfig(top_logprobs=2), "top_logprobs"),
                      (DecodingConfig(strategy="sample", mirostat=2, repetition_penalty=1.2), "repetition_penalty"),
                      (DecodingConfig(strategy="sample", mirostat=1, dry_multiplier=0.5), "dry_multiplier"),
                      (DecodingConfig(strategy="contrastive", top_k=4, penalty_alpha=0.6), "strategy"),
                      (DecodingConfig(strategy="diverse_beam", num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
                       "strategy")]:
        with pytest.raises(UserError, match=f"^config: {name}: backend 'llamacpp' cannot run this config"):
            check_config(cfg, backend)
    with pytest.raises(UserError, match="strategy 'contrastive' is not available \\(it runs on the torch engine only"):
        check_config(DecodingConfig(strategy="contrastive", top_k=4, penalty_alpha=0.6), backend)


def test_capability_tables_know_every_new_field():
    torch = static_capabilities("torch")
    everything = DecodingConfig(strategy="sample", dry_multiplier=0.5, xtc_probability=0.5, top_n_sigma=1.0,
                                dynatemp_range=0.5, logit_bias={1: 1.0}, bad_words=["x"], stop_token_ids=[1],
                                ignore_eos=True, top_logprobs=2, repetition_penalty=1.1, penalty_last_n=8)
    assert unsupported(everything, torch) == []
    assert {"contrastive", "diverse_beam"} <= torch.strategies
    assert not {"contrastive", "diverse_beam"} & (LLAMACPP.strategies | VLLM.strategies | OPENAI_ANY.strategies)
    assert {n for n, _ in unsupported(everything, LLAMACPP)} == {"bad_words", "top_logprobs"}
    vllm = {n for n, _ in unsupported(everything, VLLM)}
    assert vllm == {"dry_multiplier", "xtc_probability", "top_n_sigma", "dynatemp_range", "penalty_last_n",
                    "top_logprobs"}
    server = {n for n, _ in unsupported(everything, family_capabilities("llama.cpp"))}
    assert server == {"bad_words", "stop_token_ids", "top_logprobs"}
    assert {n for n, _ in unsupported(everything, family_capabilities("vllm"))} == vllm
    assert _first(DecodingConfig(logit_bias={1: 1.0}), family_capabilities("ollama")) == "logit_bias"
    # a field the config never reads is no refusal: DRY details without DRY, XTC's threshold without XTC
    assert unsupported(DecodingConfig(strategy="sample", dry_base=3.0, xtc_threshold=0.3), VLLM) == []
