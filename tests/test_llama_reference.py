"""Our llama.cpp-family samplers and processors against llama.cpp's own code (llama-cpp-python's bindings).

Each test feeds the same logits and the same token history to llama.cpp's sampler (``llama_sampler_apply``
on a ``llama_token_data_array``, histories through ``llama_sampler_accept``) and to ours, and asserts the
same kept set and the same probabilities (or, for the processors, the same logits) to float tolerance.
Where we deliberately differ from llama.cpp, a test says so and shows the difference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")

from decodetune import DecodingConfig  # noqa: E402
from llama_ref import (  # noqa: E402
    ctx_floats,
    free,
    llama_apply,
    llama_full_logits,
    ours_processors,
    ours_result,
    ours_samplers,
)

L = llama_cpp
RTOL = 2e-5
ATOL = 2e-6


@pytest.fixture(scope="module", autouse=True)
def backend():
    L.llama_backend_init()


def sample_cfg(**kw) -> DecodingConfig:
    return DecodingConfig(strategy="sample", **kw)


def logits_of(kind: str, vocab: int = 256, seed: int = 0) -> np.ndarray:
    """Test distributions: peaked, flat, with ties, with -inf entries, or a heavy tail."""
    rng = np.random.default_rng(seed)
    if kind == "peaked":
        z = rng.normal(size=vocab) * 4.0
    elif kind == "flat":
        z = rng.normal(size=vocab) * 0.05
    elif kind == "ties":
        z = np.round(rng.normal(size=vocab) * 2.0, 0)
    elif kind == "neginf":
        z = rng.normal(size=vocab) * 2.0
        z[rng.choice(vocab, vocab // 4, replace=False)] = -np.inf
    else:  # zipf-like tail
        z = -1.1 * np.log(np.arange(1, vocab + 1)) + rng.normal(size=vocab) * 0.3
        z = rng.permutation(z)
    return z.astype(np.float32)


def assert_same(ours, ref, rtol=RTOL, atol=ATOL):
    assert ours.ids == ref.ids
    o, r = ours.probs, ref.probs
    np.testing.assert_allclose([o[i] for i in ours.ids], [r[i] for i in ref.ids], rtol=rtol, atol=atol)


def as_row(z: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(z.copy()).unsqueeze(0)


# ---------------------------------------------------------------- processors: penalties, logit bias
@pytest.mark.parametrize("last_n", [-1, 0, 1, 5, 17, 200])
def test_penalties_with_window_match_llama(last_n):
    vocab = 64
    rng = np.random.default_rng(1)
    history = rng.integers(0, 20, size=60).tolist()
    z = logits_of("peaked", vocab)
    # llama.cpp's -1 means the context size (common_sampler); its init treats -1 as 0
    s = L.llama_sampler_init_penalties(vocab, len(history) if last_n == -1 else last_n, 1.3, 0.2, 0.5)
    ref = llama_full_logits([s], z, history)
    free(s)
    cfg = sample_cfg(repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.5, penalty_last_n=last_n)
    out = ours_processors([cfg], as_row(z), prompts=[[]], outputs=[history])
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-6, atol=1e-6)
    if last_n == 0:
        np.testing.assert_array_equal(ref, z)  # 0 = penalties off, in both


@pytest.mark.parametrize("last_n", [-1, 7, 45])
def test_repetition_penalty_window_covers_the_prompt_as_llama(last_n):
    """llama.cpp's server accepts the prompt into its samplers; our repetition penalty looks at it too."""
    vocab = 64
    history = np.random.default_rng(2).integers(0, 30, size=50).tolist()
    z = logits_of("zipf", vocab)
    s = L.llama_sampler_init_penalties(vocab, len(history) if last_n == -1 else last_n, 1.5, 0.0, 0.0)
    ref = llama_full_logits([s], z, history)
    free(s)
    cfg = sample_cfg(repetition_penalty=1.5, penalty_last_n=last_n)
    out = ours_processors([cfg], as_row(z), prompts=[history[:30]], outputs=[history[30:]])
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-6, atol=1e-6)


def test_presence_frequency_count_output_only_unlike_llama():
    """Deviation (vLLM's rule, kept): presence/frequency ignore prompt tokens; llama.cpp counts them."""
    vocab = 16
    z = np.zeros(vocab, dtype=np.float32)
    s = L.llama_sampler_init_penalties(vocab, 10, 1.0, 0.0, 1.0)
    ref = llama_full_logits([s], z, [3, 3, 5])
    free(s)
    out = ours_processors([sample_cfg(presence_penalty=1.0, penalty_last_n=10)], as_row(z),
                          prompts=[[3, 3]], outputs=[[5]])[0].numpy()
    assert ref[3] == -1.0 and out[3] == 0.0  # prompt token: penalised by llama.cpp only
    assert ref[5] == out[5] == -1.0


def test_logit_bias_matches_llama():
    vocab = 64
    z = logits_of("peaked", vocab)
    bias = {3: 2.5, 10: -100.0, 63: 1.0, 200: 5.0}  # 200 is outside the vocabulary: ignored by both
    arr = (L.llama_logit_bias * len(bias))()
    for i, (t, b) in enumerate(bias.items()):
        arr[i].token, arr[i].bias = t, b
    s = L.llama_sampler_init_logit_bias(vocab, len(bias), arr)
    ref = llama_full_logits([s], z)
    free(s)
    out = ours_processors([sample_cfg(logit_bias=bias)], as_row(z), prompts=[[1]])
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-7, atol=1e-6)


# ---------------------------------------------------------------- the existing stages, llama.cpp's chain order
@pytest.mark.parametrize("kind", ["peaked", "flat", "zipf", "neginf"])
@pytest.mark.parametrize("vocab", [1000, 49152])
def test_top_k_top_p_min_p_temperature_chain_matches_llama(kind, vocab):
    z = logits_of(kind, vocab, seed=3)
    chain = [L.llama_sampler_init_top_k(40), L.llama_sampler_init_top_p(0.9, 1), L.llama_sampler_init_min_p(0.05, 1),
             L.llama_sampler_init_temp(0.7)]
    ref = llama_apply(chain, z)
    free(*chain)
    cfg = sample_cfg(top_k=40, top_p=0.9, min_p=0.05, temperature=0.7,
                     sampler_order=["top_k", "top_p", "min_p", "temperature"])
    assert_same(ours_result(ours_samplers([cfg], as_row(z))[0]), ref)


@pytest.mark.parametrize("kind", ["peaked", "flat", "zipf"])
@pytest.mark.parametrize("p", [0.3, 0.8, 0.95])
def test_top_p_and_min_p_alone_match_llama(kind, p):
    z = logits_of(kind, 2000, seed=4)
    for ours_kw, make in (({"top_p": p}, lambda: L.llama_sampler_init_top_p(p, 1)),
                          ({"min_p": 1 - p}, lambda: L.llama_sampler_init_min_p(1 - p, 1))):
        s = make()
        ref = llama_apply([s], z)
        free(s)
        assert_same(ours_result(ours_samplers([sample_cfg(**ours_kw)], as_row(z))[0]), ref)


@pytest.mark.parametrize("kind", ["peaked", "flat", "zipf"])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_typical_matches_llama(kind, p):
    z = logits_of(kind, 500, seed=5)
    s = L.llama_sampler_init_typical(p, 1)
    ref = llama_apply([s], z)
    free(s)
    assert_same(ours_result(ours_samplers([sample_cfg(typical_p=p)], as_row(z))[0]), ref)


@pytest.mark.parametrize("t", [0.3, 1.0, 1.7])
def test_temperature_matches_llama(t):
    z = logits_of("zipf", 500, seed=6)
    s = L.llama_sampler_init_temp(t)
    ref = llama_apply([s], z)
    free(s)
    assert_same(ours_result(ours_samplers([sample_cfg(temperature=t)], as_row(z))[0]), ref)


def test_top_k_keeps_ties_unlike_llama():
    """Deviation (transformers' rule, kept): top-k keeps every token tied with the k-th; llama.cpp exactly k."""
    z = np.array([3.0, 2.0, 2.0, 2.0, 1.0], dtype=np.float32)
    s = L.llama_sampler_init_top_k(2)
    ref = llama_apply([s], z)
    free(s)
    ours = ours_result(ours_samplers([sample_cfg(top_k=2)], as_row(z))[0])
    assert len(ref.ids) == 2 and 0 in ref.ids
    assert ours.ids == [0, 1, 2, 3]


# ---------------------------------------------------------------- top-nσ, XTC, dynamic temperature
@pytest.mark.parametrize("kind", ["peaked", "flat", "zipf", "neginf", "ties"])
@pytest.mark.parametrize("n", [0.5, 1.0, 2.0, 3.5])
def test_top_n_sigma_matches_llama(kind, n):
    z = logits_of(kind, 1000, seed=7)
    s = L.llama_sampler_init_top_n_sigma(n)
    ref = llama_apply([s], z)
    free(s)
    assert_same(ours_result(ours_samplers([sample_cfg(top_n_sigma=n)], as_row(z))[0]), ref)


def test_top_n_sigma_then_temperature_matches_llama():
    z = logits_of("zipf", 4000, seed=8)
    chain = [L.llama_sampler_init_top_n_sigma(1.5), L.llama_sampler_init_temp(0.6)]
    ref = llama_apply(chain, z)
    free(*chain)
    cfg = sample_cfg(top_n_sigma=1.5, temperature=0.6, sampler_order=["top_n_sigma", "temperature"])
    assert_same(ours_result(ours_samplers([cfg], as_row(z))[0]), ref)


@pytest.mark.parametrize("kind", ["peaked", "zipf", "flat"])
@pytest.mark.parametrize("threshold", [0.02, 0.05, 0.1, 0.3, 0.6])
def test_xtc_with_probability_one_matches_llama(kind, threshold):
    """Probability 1: the coin always comes up in both (llama.cpp's ``chance > p`` never holds), so the
    comparison is deterministic; a threshold above 0.5 disables XTC in both."""
    z = logits_of(kind, 200, seed=9)
    s = L.llama_sampler_init_xtc(1.0, threshold, 1, 1234)
    ref = llama_apply([s], z)
    free(s)
    cfg = sample_cfg(xtc_probability=1.0, xtc_threshold=threshold)
    ours = ours_result(ours_samplers([cfg], as_row(z), coins=torch.zeros(1))[0])
    assert_same(ours, ref)
    if threshold > 0.5:
        assert len(ours.ids) == 200


def test_xtc_then_temperature_after_top_k_matches_llama():
    z = logits_of("zipf", 3000, seed=10)
    chain = [L.llama_sampler_init_top_k(50), L.llama_sampler_init_xtc(1.0, 0.03, 1, 7), L.llama_sampler_init_temp(1.3)]
    ref = llama_apply(chain, z)
    free(*chain)
    cfg = sample_cfg(top_k=50, xtc_probability=1.0, xtc_threshold=0.03, temperature=1.3,
                     sampler_order=["top_k", "xtc", "temperature"])
    ours = ours_result(ours_samplers([cfg], as_row(z), coins=torch.zeros(1))[0])
    assert_same(ours, ref)
    assert len(ours.ids) < 50  # XTC removed some of the top choices


def test_xtc_coin_above_probability_does_nothing():
    z = logits_of("zipf", 200, seed=11)
    cfg = sample_cfg(xtc_probability=0.5, xtc_threshold=0.02)
    kept_fire = ours_result(ours_samplers([cfg], as_row(z), coins=torch.tensor([0.5]))[0]).ids
    kept_skip = ours_result(ours_samplers([cfg], as_row(z), coins=torch.tensor([0.51]))[0]).ids
    assert len(kept_skip) == 200 and len(kept_fire) < 200  # llama.cpp: skip iff chance > probability


@pytest.mark.parametrize("kind", ["peaked", "flat", "zipf", "neginf"])
@pytest.mark.parametrize("t, delta, exponent", [(1.0, 0.5, 1.0), (0.8, 1.0, 2.0), (1.5, 0.3, 0.5), (0.7, 0.7, 1.0)])
def test_dynamic_temperature_matches_llama_temp_ext(kind, t, delta, exponent):
    z = logits_of(kind, 1000, seed=12)
    if kind == "neginf":  # llama.cpp counts -inf entries as candidates; drop them so both see the same set
        z = z[np.isfinite(z)]
    s = L.llama_sampler_init_temp_ext(t, delta, exponent)
    ref = llama_apply([s], z)
    free(s)
    cfg = sample_cfg(temperature=t, dynatemp_range=delta, dynatemp_exponent=exponent)
    assert_same(ours_result(ours_samplers([cfg], as_row(z))[0]), ref)


def test_dynamic_temperature_after_top_k_counts_the_candidates_as_llama():
    """After top-k, llama.cpp's entropy is normalised by log(k): truncated tokens left the array."""
    z = logits_of("zipf", 3000, seed=13)
    chain = [L.llama_sampler_init_top_k(20), L.llama_sampler_init_temp_ext(1.0, 0.8, 1.0)]
    ref = llama_apply(chain, z)
    free(*chain)
    cfg = sample_cfg(top_k=20, temperature=1.0, dynatemp_range=0.8, sampler_order=["top_k", "temperature"])
    assert_same(ours_result(ours_samplers([cfg], as_row(z))[0]), ref)


def test_dynamic_temperature_zero_keeps_the_best_token_as_llama():
    z = np.array([0.0] + [-200.0] * 9, dtype=np.float32)  # entropy 0 in float: temperature max(0, t - d) = 0
    s = L.llama_sampler_init_temp_ext(0.5, 0.5, 1.0)
    ref = llama_apply([s], z)
    free(s)
    ours = ours_result(ours_samplers([sample_cfg(temperature=0.5, dynatemp_range=0.5)], as_row(z))[0])
    assert ours.ids == ref.ids == [0]


def test_dynamic_temperature_counts_finite_candidates_unlike_llama():
    """Deviation: with -inf logits left in the array (a bias, top-nσ), llama.cpp still counts them in
    log(n); we count the candidates (finite logits), as after a truncation."""
    z = logits_of("neginf", 400, seed=14)
    s = L.llama_sampler_init_temp_ext(1.0, 0.8, 1.0)
    ref = llama_apply([s], z)
    free(s)
    ours = ours_result(ours_samplers([sample_cfg(dynatemp_range=0.8)], as_row(z))[0])
    assert ours.ids == ref.ids
    assert not np.allclose([ours.probs[i] for i in ours.ids], [ref.probs[i] for i in ref.ids], rtol=1e-4)
    finite = z[np.isfinite(z)]
    s = L.llama_sampler_init_temp_ext(1.0, 0.8, 1.0)
    same = llama_apply([s], finite)  # the same candidates without the -inf entries: equal again
    free(s)
    np.testing.assert_allclose(sorted(ours.probs.values()), sorted(same.probs.values()), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- mirostat, several steps, the same tokens fed to both
def _mirostat_steps(version: int, steps: int = 12, vocab: int = 2000):
    """Run llama.cpp's temp -> mirostat chain for ``steps`` steps; ours follows with llama.cpp's drawn tokens."""
    from decodetune.decoding import llama_samplers as LS
    from llama_ref import rows_of, state_of

    tau, eta, temp = 3.0, 0.3, 0.8
    miro = (L.llama_sampler_init_mirostat(vocab, 42, tau, eta, 100) if version == 1
            else L.llama_sampler_init_mirostat_v2(42, tau, eta))
    temp_s = L.llama_sampler_init_temp(temp)
    # llama.cpp's state: v1 {n_vocab, seed, seed_cur, tau, eta, m, mu, rng}, v2 {seed, seed_cur, tau, eta, mu, rng}
    tau_at, mu_at = (3, 6) if version == 1 else (2, 4)
    state_words = ctx_floats(miro, mu_at + 1)
    assert state_words[tau_at:tau_at + 2] == pytest.approx([tau, eta]) and state_words[mu_at] == 2 * tau
    cfg = sample_cfg(mirostat=version, mirostat_tau=tau, mirostat_eta=eta, temperature=temp)
    rows = rows_of([cfg])
    state = state_of(rows, [[1]], [[]], vocab)
    kept_sizes = []
    for step in range(steps):
        z = logits_of("zipf" if step % 3 else "peaked", vocab, seed=100 + step)
        ref = llama_apply([temp_s, miro], z)
        ours_logits = LS.mirostat_truncate(torch.from_numpy(z).unsqueeze(0) / temp, rows, state.per_row["mirostat_mu"])
        ours = ours_result(ours_logits[0])
        assert_same(ours, ref)
        probs = ours_logits.softmax(dim=1)
        LS.update_mirostat(state, [0], probs, torch.tensor([ref.selected]), rows)
        assert float(state.per_row["mirostat_mu"][0]) == pytest.approx(ctx_floats(miro, mu_at + 1)[mu_at], abs=1e-5)
        kept_sizes.append(len(ref.ids))
    free(temp_s, miro)
    return kept_sizes


def test_mirostat_v2_matches_llama_step_by_step():
    sizes = _mirostat_steps(2)
    assert len(set(sizes)) > 3  # mu moved the cut around


def test_mirostat_v1_matches_llama_step_by_step():
    sizes = _mirostat_steps(1)
    assert len(set(sizes)) > 3


# ------------------------------------------------------------- adaptive-p, several steps, the same tokens fed to both
def _adaptive_p_steps(target: float, decay: float, truncate: bool, steps: int = 12, vocab: int = 2000):
    """llama.cpp's [min_p ->] temp -> adaptive_p for ``steps`` steps; ours follows with llama.cpp's drawn tokens,
    so the moving average of both must agree for the transformed distributions to keep agreeing."""
    from decodetune.decoding import llama_samplers as LS
    from llama_ref import rows_of, state_of

    temp = 0.9
    head = ([L.llama_sampler_init_min_p(0.05, 1)] if truncate else []) + [L.llama_sampler_init_temp(temp)]
    adaptive = L.llama_sampler_init_adaptive_p(target, decay, 42)
    order = ["min_p", "temperature"] if truncate else ["temperature"]
    cfg = sample_cfg(adaptive_target=target, adaptive_decay=decay, temperature=temp,
                     min_p=0.05 if truncate else 0.0, sampler_order=order)
    rows = rows_of([cfg])
    state = state_of(rows, [[1]], [[]], vocab)
    picked = []
    for step in range(steps):
        z = logits_of("zipf" if step % 3 else "peaked", vocab, seed=200 + step)
        ref = llama_apply([*head, adaptive], z)
        # the chain before adaptive-p (apply_samplers refuses a token-selecting stage: beam search uses it)
        shaped = ours_samplers([cfg.replace(adaptive_target=-1.0)], torch.from_numpy(z).unsqueeze(0))
        ws, tw = state.per_row["adaptive_weighted_sum"], state.per_row["adaptive_total_weight"]
        ours_logits, original = LS.adaptive_p(shaped, rows, ws, tw)
        assert_same(ours_result(ours_logits[0]), ref)
        L.llama_sampler_accept(adaptive, ref.selected)
        LS.update_adaptive_p(state, [0], original, torch.tensor([ref.selected]), rows)
        picked.append(float(original[0, ref.selected]))
    free(*head, adaptive)
    return picked


@pytest.mark.parametrize("target,decay,truncate", [(0.3, 0.9, False), (0.1, 0.5, True), (0.7, 0.0, False),
                                                   (0.0, 0.99, True)])
def test_adaptive_p_matches_llama_step_by_step(target, decay, truncate):
    picked = _adaptive_p_steps(target, decay, truncate)
    assert len(set(picked)) > 3  # different tokens drawn, so the average moved


def test_adaptive_p_off_leaves_the_distribution_alone():
    from decodetune.decoding import llama_samplers as LS
    from llama_ref import rows_of

    rows = rows_of([sample_cfg(), sample_cfg(adaptive_target=0.5)])
    z = torch.from_numpy(np.stack([logits_of("zipf"), logits_of("zipf")]))
    out, _ = LS.adaptive_p(z, rows, torch.tensor([0.0, 5.0]), torch.tensor([10.0, 10.0]))
    assert torch.equal(out[0], z[0]) and not torch.equal(out[1], z[1])


# ---------------------------------------------------------------- DRY, on the embedded model's vocabulary
@pytest.fixture(scope="module")
def vocab_and_tokenizer():
    """llama.cpp's vocabulary of the embedded GGUF (vocab_only) and our tokenizer of the same model."""
    from transformers import AutoTokenizer

    from decodetune.models.builtin import ensure_builtin, ensure_builtin_gguf

    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(ensure_builtin_gguf("smollm2-135m", progress=False)).encode(), params)
    assert model
    tok = AutoTokenizer.from_pretrained(str(ensure_builtin("smollm2-135m", progress=False)))
    yield L.llama_model_get_vocab(model), tok
    L.llama_model_free(model)


def _llama_dry(vocab, z, history, multiplier, base, allowed, last_n, breakers):
    """llama.cpp's DRY after ``history``. Our -1 (the whole context) is passed as the context's length, as
    llama.cpp's common layer resolves -1 to the context size (the sampler itself no longer knows it)."""
    last_n = len(history) if last_n == -1 else last_n
    arr = (L.ctypes.c_char_p * len(breakers))(*[b.encode() for b in breakers])
    s = L.llama_sampler_init_dry(vocab, multiplier, base, allowed, last_n, arr, len(breakers))
    out = llama_full_logits([s], z, history)
    free(s)
    return out


STORY = ("The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on the")
DRY_CASES = {
    "plain repeat": (STORY, {}),
    "repeat across newlines": ("Once upon a time\nthere was a king.\nOnce upon a time\nthere was a", {}),
    "breaker inside the repeat": ('He said: "yes". He said: "yes". He said: "', {}),
    "multi-token breaker": (STORY, {"dry_sequence_breakers": ["sat on"]}),
    "multi-token breaker limits": (STORY, {"dry_sequence_breakers": ["dog sat"]}),
    "breaker spanning tokens, last": ("a b c d e. a b c d e. x y z a b c d", {"dry_sequence_breakers": ["c d"]}),
    "allowed length 1": (STORY, {"dry_allowed_length": 1}),
    "allowed length 4": (STORY, {"dry_allowed_length": 4}),
    "allowed length = repeat": ("Go one two three. one two", {"dry_allowed_length": 2}),
    "allowed length > repeat": ("Go one two three. one two", {"dry_allowed_length": 3}),
    "window 8": (STORY, {"dry_penalty_last_n": 8}),
    "window 20": (STORY, {"dry_penalty_last_n": 20}),
    "base 1": (STORY, {"dry_base": 1.0}),
    "no breakers at all": (STORY.replace(".", "\n"), {"dry_sequence_breakers": ["§"]}),
}


def _dry_case(case, vocab_and_tokenizer) -> int:
    """Assert ours equals llama.cpp on one case; returns how many tokens llama.cpp penalised."""
    vocab, tok = vocab_and_tokenizer
    text, kw = DRY_CASES[case]
    history = tok.encode(text, add_special_tokens=False)
    cfg = sample_cfg(dry_multiplier=0.8, **kw)
    z = logits_of("peaked", len(tok), seed=15)
    ref = _llama_dry(vocab, z, history, cfg.dry_multiplier, cfg.dry_base, cfg.dry_allowed_length,
                     cfg.dry_penalty_last_n, cfg.dry_sequence_breakers)
    # half the history as prompt, half generated: both paths of the suffix-match table
    half = len(history) // 2
    out = ours_processors([cfg], as_row(z), prompts=[history[:half]], outputs=[history[half:]], tokenizer=tok)
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-6, atol=1e-5)
    return int((ref != z).sum())


@pytest.mark.parametrize("case", list(DRY_CASES))
def test_dry_matches_llama(case, vocab_and_tokenizer):
    _dry_case(case, vocab_and_tokenizer)


def test_dry_cases_penalise_something(vocab_and_tokenizer):
    """The cases above are not vacuous: a breaker ending the context (or one token before it, with
    allowed length 2), a repeat one shorter than allowed and a window too short penalise nothing; the
    others penalise something."""
    hits = {case: _dry_case(case, vocab_and_tokenizer) for case in DRY_CASES}
    none = {"breaker inside the repeat", "multi-token breaker", "breaker spanning tokens, last",
            "allowed length > repeat", "window 8"}
    assert {case for case, h in hits.items() if h == 0} == none


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("last_n", [-1, 64, 300])
def test_dry_long_histories_match_llama(seed, last_n, vocab_and_tokenizer):
    """600 tokens of repeated segments, breakers and noise; exponents large enough to hit llama.cpp's cap."""
    vocab, tok = vocab_and_tokenizer
    rng = np.random.default_rng(seed)
    pieces = [tok.encode(t, add_special_tokens=False) for t in
              ["The king said:", " \"We ride at dawn\"", "\n", " and the army", " rode", "*", " far away."]]
    history: list[int] = []
    while len(history) < 600:
        if rng.random() < 0.3:
            history += rng.integers(0, len(tok), size=rng.integers(1, 6)).tolist()
        else:
            history += pieces[rng.integers(len(pieces))]
    # end on a 99-token repeat of a breaker-free block: base 3 ** 97 passes llama.cpp's exponent cap (80)
    words = tok.encode(" alpha beta gamma delta epsilon zeta eta theta iota kappa lambda", add_special_tokens=False)
    block = rng.choice(words, size=100).tolist()
    history = history[:400] + block + history[400:450] + block[:-1]
    cfg = sample_cfg(dry_multiplier=0.5, dry_base=3.0, dry_allowed_length=2, dry_penalty_last_n=last_n,
                     dry_sequence_breakers=["\n", ":", "ride at"])
    z = logits_of("zipf", len(tok), seed=seed)
    ref = _llama_dry(vocab, z, history, cfg.dry_multiplier, cfg.dry_base, cfg.dry_allowed_length, last_n,
                     cfg.dry_sequence_breakers)
    out = ours_processors([cfg], as_row(z), prompts=[history[:300]], outputs=[history[300:]], tokenizer=tok)
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-6, atol=1e-5)
    if last_n == 64:  # the window holds only the end of the block: no repeat longer than 63 counts
        assert (z - ref).max() < 0.5 * 3.0 ** 62
    else:
        assert (z - ref).max() >= 0.5 * 3.0 ** 78
