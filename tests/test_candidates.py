"""The candidate strategies (self_consistency, mbr, best_of_n): config, selection on hand-made candidates,
capability checks, and each strategy through evaluate, the CLI and a one-trial tune on the tiny model."""

from __future__ import annotations

import json
import math
import typing
import warnings
from collections import Counter

import numpy as np
import pytest
import sacrebleu

from decodetune import DecodingConfig
from decodetune.backends import Capabilities, check_config, unsupported
from decodetune.backends.capabilities import LLAMACPP, OPENAI_ANY, VLLM
from decodetune.cache import config_key_fields
from decodetune.config import candidate_config
from decodetune.decoding.types import Generation
from decodetune.errors import ConfigError, UserError
from decodetune.eval import evaluate
from decodetune.evaluation.candidates import (
    best_of_n,
    majority_vote,
    mbr_matrix,
    mbr_select,
    select,
    select_row,
    utility_fn,
)
from decodetune.export import ExportError
from decodetune.models.handle import LoadedModel
from decodetune.tasks import load_task
from decodetune.tasks.base import Task, TaskItem
from decodetune.tuning.space import default_space_for

SC = {"strategy": "self_consistency", "num_candidates": 4, "temperature": 0.9}


# ==================================================================== config
def test_config_fields_validated_by_name():
    cfg = DecodingConfig(**SC)
    assert cfg.is_candidate and cfg.is_sampling
    assert not DecodingConfig(strategy="mbr", num_candidates=3, temperature=0).is_sampling
    for kwargs, field in [({"strategy": "mbr"}, "num_candidates"),  # the default 1 selects nothing
                          ({"strategy": "sample", "num_candidates": 4}, "num_candidates"),
                          ({"strategy": "best_of_n", "num_candidates": 0}, "num_candidates"),
                          ({**SC, "num_return_sequences": 2}, "num_return_sequences"),
                          ({**SC, "num_beams": 2}, "num_beams"),
                          ({"strategy": "mbr", "num_candidates": 3, "mbr_utility": "meteor"}, "mbr_utility"),
                          ({"strategy": "best_of_n", "num_candidates": 3, "rerank": "pkg.mod"}, "rerank"),
                          ({"strategy": "best_of_n", "num_candidates": 3, "rerank": 3}, "rerank")]:
        with pytest.raises(ConfigError) as e:
            DecodingConfig(**kwargs)
        assert e.value.field == field, (kwargs, e.value)
    assert DecodingConfig(strategy="mbr", num_candidates=3, mbr_utility="my_pkg.utils:score").mbr_utility \
        == "my_pkg.utils:score"


def test_config_serialises_and_warns_about_unread_selectors():
    cfg = DecodingConfig(**SC, top_p=0.9)
    assert cfg.to_dict(only_set=True) == {"strategy": "self_consistency", "num_candidates": 4,
                                          "temperature": 0.9, "top_p": 0.9}
    assert DecodingConfig.from_json(cfg.to_json()) == cfg
    assert DecodingConfig.from_yaml(cfg.to_yaml(only_set=True)) == cfg
    assert "mbr_utility" not in DecodingConfig().to_dict(only_set=True)
    assert cfg.replace(mbr_utility="bleu", rerank="x.y:z").ignored_fields() == ["mbr_utility", "rerank"]
    assert DecodingConfig(strategy="mbr", num_candidates=3, temperature=0, top_p=0.9).ignored_field_warnings() \
        == ["top_p is ignored by strategy mbr at temperature 0"]


def test_candidate_config_is_the_sampling_config_with_n_sequences():
    cfg = DecodingConfig(strategy="mbr", num_candidates=6, temperature=0.7, top_k=20, mbr_utility="bleu", seed=3)
    assert candidate_config(cfg) == DecodingConfig(strategy="sample", num_return_sequences=6, temperature=0.7,
                                                   top_k=20, seed=3)
    plain = DecodingConfig(strategy="beam", num_beams=3)
    assert candidate_config(plain) is plain


def test_cache_keys_of_plain_configs_do_not_see_the_new_fields():
    assert not {"num_candidates", "mbr_utility", "rerank"} & set(config_key_fields(DecodingConfig()))
    assert config_key_fields(DecodingConfig(**SC))["num_candidates"] == 4


def test_exports_refuse_or_drop_the_selection():
    cfg = DecodingConfig(**SC)
    for target in ("to_hf", "to_vllm", "to_llamacpp", "to_openai"):
        with pytest.raises(ExportError, match="strategy"):
            getattr(cfg, target)()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loose = getattr(cfg, target)(strict=False)
        assert any("strategy='self_consistency'" in str(w.message) for w in caught), target
        assert loose == getattr(cfg.replace(strategy="sample", num_candidates=1), target)()


def test_cli_flags_have_the_right_types():
    import dataclasses

    from decodetune.cli.options import _option_type

    types = {f.name: typing.get_args(_option_type(f)) for f in dataclasses.fields(DecodingConfig)}
    assert types["num_candidates"] == (int, type(None))
    assert types["mbr_utility"] == types["rerank"] == types["strategy"] == (str, type(None))


# ==================================================================== selection on hand-made candidates
def test_majority_vote():
    assert majority_vote(["7", "8", "7", "9"], [0, 0, 0, 0]) == 0
    # 8 wins 2-1; the returned text is its most likely candidate
    assert majority_vote(["7", "8", "8"], [-1.0, -5.0, -2.0]) == 2
    # whitespace does not split a vote; an empty answer (nothing extracted) does not vote
    assert majority_vote(["", "", "", "5 ", "5"], [0, 0, 0, -3, -1]) == 4
    assert majority_vote(["", ""], [-2.0, -1.0]) == 1  # unless nobody answered


def test_majority_tie_goes_to_summed_logprob_then_first():
    # 1 and 2 have two votes each; 2's candidates sum to -3 against 1's -4
    assert majority_vote(["1", "2", "1", "2", "3"], [-1.0, -2.0, -3.0, -1.0, 0.0]) == 3
    # no logprobs (every score 0, as on the OpenAI API): the answer seen first, its first candidate
    assert majority_vote(["2", "1", "1", "2"], [0.0] * 4) == 0


def test_mbr_on_a_hand_made_utility_matrix():
    u = np.array([[np.nan, 0.9, 0.1],
                  [0.8, np.nan, 0.7],
                  [0.2, 0.6, np.nan]])
    # row means 0.5, 0.75, 0.4: the expected utility wins, not the single best pair (0.9)
    assert mbr_select(u) == 1
    assert mbr_select(np.array([[np.nan, 0.5], [0.5, np.nan]])) == 0  # a tie: the earliest


def test_mbr_matrix_with_token_f1_computed_by_hand():
    texts = ["p q r", "p q s", "p q r t", "z"]
    m = mbr_matrix(texts, utility_fn("token_f1"))
    expected = {(0, 1): 2 / 3, (0, 2): 6 / 7, (1, 2): 4 / 7}
    for (i, j), v in expected.items():
        assert m[i, j] == pytest.approx(v) and m[j, i] == pytest.approx(v)  # F1 is symmetric
    assert np.all(m[3, :3] == 0) and np.all(np.isnan(np.diag(m)))
    # expected utilities 32/63, 26/63, 30/63, 0
    assert np.nanmean(m, axis=1) == pytest.approx([32 / 63, 26 / 63, 30 / 63, 0])
    assert mbr_select(m) == 0


def test_mbr_utilities_are_the_libraries_scores():
    hyp, ref = "The cat sat on the mat.", "A cat sat on a mat."
    assert utility_fn("chrf")(hyp, ref) == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score)
    assert utility_fn("bleu")(hyp, ref) == pytest.approx(
        sacrebleu.metrics.BLEU(effective_order=True).sentence_score(hyp, [ref]).score)
    from rouge_score import rouge_scorer

    want = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, hyp)["rougeL"].fmeasure
    assert utility_fn("rouge_l")(hyp, ref) == pytest.approx(want)
    # the consensus candidate wins under chrF
    texts = ["dogs run fast", "the cat sat down", "a cat sat down", "the cat sat"]
    assert mbr_select(mbr_matrix(texts, utility_fn("chrf"))) in (1, 2)


def test_best_of_n_by_mean_logprob_and_by_a_user_scorer(tmp_path, monkeypatch):
    assert best_of_n([-1.0, 2.0, 2.0]) == 1
    cands = [{"text": "a", "score": -6.0, "num_tokens": 3},   # mean -2
             {"text": "b", "score": -5.0, "num_tokens": 1},   # mean -5, though its sum is higher
             {"text": "c", "score": -9.0, "num_tokens": 4}]   # mean -2.25
    cfg = DecodingConfig(strategy="best_of_n", num_candidates=3)
    assert select(cfg, cands, None, "prompt") == 0
    (tmp_path / "my_rerank.py").write_text(
        "def by_length(prompt, candidates):\n"
        "    assert prompt == 'P'\n"
        "    return [len(c) for c in candidates]\n"
        "def bad(prompt, candidates):\n"
        "    return [1.0]\n"
        "def pick_second(hyp, ref):\n"
        "    return 1.0 if hyp == 'bb' else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cands[2]["text"] = "cccc"
    assert select(cfg.replace(rerank="my_rerank:by_length"), cands, None, "P") == 2
    with pytest.raises(UserError, match="one number per candidate"):
        select(cfg.replace(rerank="my_rerank:bad"), cands, None, "P")
    with pytest.raises(UserError, match="rerank: cannot import"):
        select(cfg.replace(rerank="no_such_module_xyz:f"), cands, None, "P")
    mbr = DecodingConfig(strategy="mbr", num_candidates=3, mbr_utility="my_rerank:pick_second")
    task = Task(name="t", kind="reference", metrics=["chrf"], splits={"dev": []})
    assert select(mbr, [{"text": "a"}, {"text": "bb"}, {"text": "c"}], task, "P") == 1


def test_select_row_counts_every_candidate_and_keeps_the_rest():
    task = Task(name="t", kind="closed", metrics=["exact_match"], splits={"dev": []}, extract="strip")
    cands = [{"text": "x", "score": -1.0, "num_tokens": 2}, {"text": "y", "score": -1.0, "num_tokens": 3},
             {"text": "y", "score": -0.5, "num_tokens": 4}]
    gen, others = select_row(DecodingConfig(strategy="self_consistency", num_candidates=3), cands, task, "p")
    assert gen["text"] == "y" and gen["num_tokens"] == 9 and others == cands[:2]
    gen, others = select_row(DecodingConfig(strategy="sample", num_return_sequences=3), cands, task, "p")
    assert gen is cands[0] and others == cands[1:]


# ==================================================================== capabilities
class FixedBackend:
    """A protocol backend that answers sequence j of every prompt with ``table[j]`` = (text, score, tokens)."""

    name = "fixed"
    model_name = "fixed"

    def __init__(self, table, caps):
        self.table, self.caps, self.calls = table, caps, []

    def identity(self):
        return "fixed:1"

    def capabilities(self):
        return self.caps

    def render(self, prompt):
        return prompt

    def generate(self, requests, *, logprobs=False, batch_size=None, progress=False):
        self.calls.append({"requests": list(requests), "logprobs": logprobs})
        out = []
        for i, r in enumerate(requests):
            for j in range(r.config.num_return_sequences):
                text, score, n = self.table[j % len(self.table)]
                out.append(Generation(text=text, token_ids=list(range(n)), logprobs=None, finish_reason="eos",
                                      timings={"total_s": 0.0}, prompt_index=i, sequence_index=j,
                                      num_prompt_tokens=1, score=score, seed=r.seed))
        return out

    def default_config(self):
        return None

    def close(self):
        pass


def _caps(**kw):
    base = dict(strategies=frozenset({"greedy", "sample"}), fields=frozenset({"max_new_tokens", "temperature"}))
    return Capabilities(**{**base, **kw})


def _closed_task(n=3):
    items = [TaskItem(id=f"q{i}", prompt=f"question {i}", references=["42"]) for i in range(n)]
    return Task(name="q", kind="closed", metrics=["exact_match"], splits={"dev": items}, extract="strip")


def test_refused_on_a_backend_without_n_candidates():
    backend = FixedBackend([("42", 0.0, 1)], _caps(n_candidates=False))
    with pytest.raises(UserError, match=r"strategy: backend 'fixed' cannot run this config .*candidates"):
        evaluate(backend, _closed_task(), SC, bootstrap=0)
    assert backend.calls == []  # refused before generating
    assert unsupported(DecodingConfig(strategy="sample"), _caps(n_candidates=False)) == []


def test_supported_where_the_candidate_config_is():
    for caps in (LLAMACPP, VLLM, OPENAI_ANY):
        assert unsupported(DecodingConfig(**SC, top_p=0.9), caps) == []
    # the candidates' own fields are checked as for any sampling config
    assert [f for f, _ in unsupported(DecodingConfig(**SC, typical_p=0.5), VLLM)] == ["typical_p"]
    # mean logprob needs logprobs; the OpenAI API returns none
    bon = DecodingConfig(strategy="best_of_n", num_candidates=3)
    assert [f for f, _ in unsupported(bon, OPENAI_ANY)] == ["rerank"]
    assert unsupported(bon.replace(rerank="pkg.mod:fn"), OPENAI_ANY) == []
    with pytest.raises(UserError, match="rerank"):
        check_config(bon, FixedBackend([], OPENAI_ANY))


def test_runner_sends_the_candidates_and_records_the_selection():
    table = [("41", -1.0, 2), ("42", -3.0, 3), ("42", -2.0, 4), ("40", -0.1, 5)]
    backend = FixedBackend(table, _caps())
    res = evaluate(backend, _closed_task(), SC, bootstrap=0)
    (call,) = backend.calls
    assert call["logprobs"] is True  # the tie-break reads the scores
    assert {(r.config.strategy, r.config.num_return_sequences) for r in call["requests"]} == {("sample", 4)}
    assert res.config.strategy == "self_consistency"
    for row in res.rows:
        assert row["prediction"] == "42" and row["num_tokens"] == 2 + 3 + 4 + 5
        assert row["other_sequences"] == ["41", "42", "40"]  # the selected is the likelier "42"
    assert res.score == 1.0 and res.num_tokens == res.num_tokens_generated == 3 * 14
    mbr = evaluate(backend, _closed_task(), {**SC, "strategy": "mbr", "mbr_utility": "token_f1"}, bootstrap=0)
    assert backend.calls[-1]["logprobs"] is False and mbr.rows[0]["prediction"] == "42"


# ==================================================================== on the tiny model
@pytest.fixture(scope="module")
def lm(tiny_pair):
    model, tok = tiny_pair
    return LoadedModel(model, tok, name="tiny")


def _candidates_of(lm, task, cfg, limit):
    """The candidates a candidate config draws: its candidate config, run on the same row seeds."""
    res = evaluate(lm, task, candidate_config(cfg), limit=limit, bootstrap=0)
    return [[row["prediction"], *row["other_sequences"]] for row in res.rows], res


@pytest.mark.parametrize("strategy, task_name", [("self_consistency", "arith"), ("mbr", "describe"),
                                                 ("best_of_n", "arith")])
def test_each_strategy_through_evaluate(lm, strategy, task_name):
    cfg = DecodingConfig(strategy=strategy, num_candidates=4, temperature=1.0, max_new_tokens=6)
    task = load_task(task_name)
    res = evaluate(lm, task, cfg, limit=3, bootstrap=0)
    cands, ref = _candidates_of(lm, task, cfg, limit=3)
    # every candidate's tokens are counted, and those are the candidate config's tokens
    assert res.num_tokens == res.num_tokens_generated == ref.num_tokens_generated
    for row, texts in zip(res.rows, cands, strict=True):
        assert sorted([row["prediction"], *row["other_sequences"]]) == sorted(texts)
        if strategy == "self_consistency":
            votes = Counter(a for a in (task.extract_answer(t) for t in texts) if a) or Counter([""])
            assert votes[row["extracted"]] == max(votes.values())
        elif strategy == "mbr":
            answers = [task.extract_answer(t) for t in texts]
            assert row["prediction"] == texts[mbr_select(mbr_matrix(answers, utility_fn("chrf")))]
    assert math.isfinite(res.score)


def test_eval_cli_takes_the_flags(capsys, tmp_path, tiny_pair):
    from decodetune.cli.main import main

    model, tok = tiny_pair
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    code = main(["eval", "--model", str(tmp_path / "m"), "--task", "describe", "--limit", "2", "--json",
                 "--bootstrap", "0", "--strategy", "mbr", "--num-candidates", "3", "--mbr-utility", "rouge_l",
                 "--max-new-tokens", "5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert d["config"]["strategy"] == "mbr" and d["config"]["num_candidates"] == 3
    assert d["config"]["mbr_utility"] == "rouge_l"
    code = main(["eval", "--model", str(tmp_path / "m"), "--task", "arith", "--strategy", "self_consistency"])
    _, err = capsys.readouterr()
    assert code == 2 and "num_candidates" in err and "Traceback" not in err
    # generate prints the selected candidate, one per prompt
    code = main(["generate", "--model", str(tmp_path / "m"), "--prompt", "The quick", "--prompt", "Paris is",
                 "--strategy", "best_of_n", "--num-candidates", "3", "--max-new-tokens", "4", "--seed", "1",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    gens = json.loads(out)["generations"]
    assert [(g["id"], g["sequence_index"]) for g in gens] == [(0, 0), (1, 0)]


def test_engine_refuses_a_candidate_strategy_it_would_only_sample(lm):
    from decodetune import generate

    with pytest.raises(UserError, match="strategy"):
        generate(lm, ["hello"], DecodingConfig(**SC))


@pytest.mark.parametrize("strategy, task_name", [("self_consistency", "arith"), ("mbr", "describe"),
                                                 ("best_of_n", "arith")])
def test_one_trial_tune(lm, tmp_path, strategy, task_name):
    from decodetune.tuning import tune

    space = {"strategy": strategy, "num_candidates": {"low": 2, "high": 3},
             "temperature": {"low": 0.5, "high": 1.5}, "max_new_tokens": 4}
    res = tune(lm, task_name, search="random", n_trials=1, space=space, out_dir=tmp_path, limit=3, seed=0)
    trial = res.best_trial
    cfg = DecodingConfig.from_dict(trial.user_attrs["config"])
    assert cfg.strategy == strategy == res.best_config.strategy
    again = evaluate(lm, task_name, cfg, limit=3, bootstrap=0)
    assert trial.values[0] == pytest.approx(again.score)
    # the trial's cost is every candidate's tokens
    drawn = evaluate(lm, task_name, candidate_config(cfg), limit=3, bootstrap=0)
    assert trial.user_attrs["tokens_evaluated"] == again.num_tokens == drawn.num_tokens_generated
    changes = json.loads((tmp_path / "exports" / "changes.json").read_text())
    assert all(not e["exact"] and any("strategy" in c for c in e["changes"]) for e in changes.values())


# ==================================================================== the tuner's default space
def test_default_space_for_the_task_kind():
    arith = default_space_for(load_task("arith"))
    assert "self_consistency" in arith["strategy"].choices
    assert arith["num_candidates"].when == {"strategy": ("self_consistency",)}
    assert (arith["num_candidates"].low, arith["num_candidates"].high) == (3, 10)
    assert "self_consistency" in arith["temperature"].when["strategy"]  # its candidates are sampled
    describe = default_space_for(load_task("describe"))
    assert "mbr" in describe["strategy"].choices and "mbr_utility" not in describe  # chrf is the default
    rouge = Task(name="r", kind="reference", metrics=["rougeL"], splits={"dev": []})
    assert default_space_for(rouge)["mbr_utility"].value == "rouge_l"
    story = default_space_for(load_task("story"))
    assert not {"self_consistency", "mbr"} & set(story["strategy"].choices) and "num_candidates" not in story
    grid = default_space_for(load_task("arith"), grid=True)
    points = grid.grid()
    assert len(points) == 2 + 8 + 12 + 24 and {p.get("num_candidates") for p in points} == {None, 4, 8}
    for p in points:
        cfg = grid.config(p)
        assert cfg.num_candidates == p.get("num_candidates", 1)


def test_default_space_for_follows_the_backend():
    task = load_task("arith")
    assert "self_consistency" in default_space_for(task, capabilities=LLAMACPP)["strategy"].choices
    no_n = _caps(n_candidates=False)
    space = default_space_for(task, capabilities=no_n)
    assert "self_consistency" not in space["strategy"].choices and "num_candidates" not in space


def test_self_consistency_on_llamacpp():
    """Another engine: the candidates share a prefill there, and their scores come back for the tie-break."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    from decodetune.backends import BackendOptions, Request, open_backend
    from decodetune.evaluation.candidates import generate_candidates

    backend = open_backend("smollm2-135m", BackendOptions(name="llamacpp", n_ctx=512, n_seq_max=4, n_threads=2))
    try:
        cfg = DecodingConfig(strategy="self_consistency", num_candidates=3, temperature=0.8, max_new_tokens=8)
        gens = generate_candidates(backend, [Request("What is 2 + 3?", cfg, seed=7)])
        assert [g.sequence_index for g in gens] == [0, 1, 2] and all(g.score < 0 for g in gens)
        res = evaluate(backend, "arith", cfg, limit=2, bootstrap=0)
        drawn = evaluate(backend, "arith", candidate_config(cfg), limit=2, bootstrap=0)
        assert res.backend == "llamacpp" and res.num_tokens == drawn.num_tokens_generated
    finally:
        backend.close()
