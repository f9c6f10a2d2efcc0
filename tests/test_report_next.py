"""The report's "what next" (deploy files and commands per engine, every dropped or changed field named),
example generations chosen where the configs disagree (right ones marked), and re-runs: the resume line,
``fresh``, and a progress line per trial without a terminal. Fake evaluator, no generation."""

from __future__ import annotations

import re
from types import SimpleNamespace

import optuna
import pytest

from decodetune.config import DecodingConfig
from decodetune.tuning import tune
from decodetune.tuning.exports import write_exports
from decodetune.tuning.final import N_EXAMPLES, _examples
from decodetune.tuning.report import _examples_html, _what_next_html, deploy_steps, render_html, verify_command
from decodetune.tuning.study import resolve_storage
from test_report_headline import GRID, winning_compare
from test_tuning_fakes import FakeEval, toy_task

REF, TUNED = "greedy (default)", "tuned (trial 3)"


# ============================================================ what next
def attrs_for(cfg: DecodingConfig, out, backend="torch", model="/models/qwen"):
    table = write_exports(cfg, out, backend)
    return {"model": model, "task": "arith", "backend": backend,
            "exports": {"backend": backend, "targets": table, "out": str(out),
                        "best_config": str(out / "best_config.json")}}


def test_what_next_gives_each_engine_its_file_and_command(tmp_path):
    attrs = attrs_for(DecodingConfig(strategy="sample", temperature=0.7, top_p=0.9, max_new_tokens=12), tmp_path,
                      model="/models/smol.gguf")
    steps = {s["target"]: s for s in deploy_steps(attrs)}
    assert set(steps) == {"hf", "vllm", "llamacpp", "openai", "llamacpp_server", "ollama"}
    assert all(s["exact"] for s in steps.values())
    flags = tmp_path / "exports" / "llamacpp_flags.txt"
    assert steps["llamacpp"]["commands"][0] == f"llama-cli -m /models/smol.gguf $(cat {flags})"
    assert steps["llamacpp"]["commands"][1].startswith("llama-server -m /models/smol.gguf $(cat ")
    assert f"SamplingParams(**json.load(open('{tmp_path / 'exports' / 'vllm_sampling_params.json'}')))" in \
        steps["vllm"]["commands"][1]
    assert f"GenerationConfig.from_pretrained('{tmp_path / 'exports'}')" in steps["hf"]["commands"][1]
    assert "openai_params.json" in steps["openai"]["commands"][1] and "**params" in steps["openai"]["commands"][2]
    page = "\n".join(_what_next_html(attrs))
    assert page.count("exact: the same config, nothing dropped or changed") == 6
    assert "<b>approximate</b>" not in page
    # the portability check: the winner re-scored in llama.cpp, paired against the study's engine
    assert verify_command(attrs) == (f"decodetune verify --backend llamacpp --model /models/smol.gguf "
                                     f"--config {tmp_path / 'best_config.json'} --task arith")
    assert "decodetune verify --backend llamacpp" in page


def test_what_next_names_every_dropped_or_changed_field(tmp_path):
    # beam search: vLLM SamplingParams, llama.cpp and OpenAI have no beams; llama.cpp's penalties count the prompt
    attrs = attrs_for(DecodingConfig(strategy="beam", num_beams=4, max_new_tokens=12), tmp_path)
    steps = {s["target"]: s for s in deploy_steps(attrs)}
    assert steps["hf"]["exact"] and not steps["hf"]["changes"]
    for target in ("vllm", "llamacpp", "openai", "llamacpp_server", "ollama"):
        assert not steps[target]["exact"] and "/approximate/" in steps[target]["file"]
        assert any("dropped strategy='beam'" in c for c in steps[target]["changes"]), steps[target]
    assert "/approximate/llamacpp_flags.txt)" in steps["llamacpp"]["commands"][0]
    assert steps["llamacpp"]["commands"][0].startswith("llama-cli -m MODEL.gguf $(cat ")  # not a GGUF study
    page = "\n".join(_what_next_html(attrs))
    assert page.count("<b>approximate</b>") == 5
    for target in ("vllm", "llamacpp", "openai"):
        for change in steps[target]["changes"]:
            assert change.replace("'", "&#x27;") in page
    # a semantic change, not a dropped field: penalties over prompt+output tokens in llama.cpp
    pen = attrs_for(DecodingConfig(strategy="sample", temperature=0.7, presence_penalty=0.5), tmp_path / "p")
    llama = next(s for s in deploy_steps(pen) if s["target"] == "llamacpp")
    assert llama["changes"] == ["presence_penalty counts prompt and output tokens there, output tokens in the "
                                "study's engine"]
    assert verify_command(attrs) == ("decodetune verify --backend llamacpp --model MODEL.gguf --against-model "
                                     f"/models/qwen --config {tmp_path / 'best_config.json'} --task arith")


def test_verify_command_checks_another_engine_than_the_studys(tmp_path):
    attrs = attrs_for(DecodingConfig(), tmp_path, backend="llamacpp", model="m.gguf")
    assert verify_command(attrs).startswith("decodetune verify --backend torch --model m.gguf --against llamacpp ")
    assert "--against vllm" in verify_command(attrs_for(DecodingConfig(), tmp_path, backend="vllm"))
    assert _what_next_html({"model": "m"}) == []  # no exports stored: no section


# ============================================================ examples
def result(rows):
    return SimpleNamespace(rows=[{"repeat": 0, "prompt": f"q{i}", "references": [ref], **r}
                                 for i, ref, r in rows])


def two(outcomes, metric_values=(0.0, 1.0)):
    """Per item, (ref answer, ref score, tuned answer, tuned score)."""
    ref, tuned = [], []
    for i, (a, sa, b, sb) in enumerate(outcomes):
        ref.append((i, "7", {"item_id": f"i{i}", "prediction": f"so {a}", "extracted": a,
                             "scores": {"exact_match": metric_values[sa]}}))
        tuned.append((i, "7", {"item_id": f"i{i}", "prediction": f"so {b}", "extracted": b,
                               "scores": {"exact_match": metric_values[sb]}}))
    return {REF: result(ref), TUNED: result(tuned)}


def test_examples_prefer_items_where_the_configs_disagree():
    agree_right, agree_wrong = ("7", 1, "7", 1), ("3", 0, "3", 0)
    win, loss, both_wrong = ("3", 0, "7", 1), ("7", 1, "2", 0), ("3", 0, "2", 0)
    items = [agree_right, agree_wrong, win, agree_right, loss, win, both_wrong, win, agree_wrong]
    ex = _examples(two(items), [REF, TUNED], "exact_match")
    assert N_EXAMPLES == 6 and len(ex) == 6
    # the five disagreements first, in the split's order; one agreeing item fills the last place
    assert [e["item_id"] for e in ex] == ["i2", "i4", "i5", "i6", "i7", "i0"]
    assert [e["disagree"] for e in ex] == [True] * 5 + [False]
    assert ex[0]["correct"] == {REF: False, TUNED: True} and ex[0]["extracted"] == {REF: "3", TUNED: "7"}
    assert ex[1]["correct"] == {REF: True, TUNED: False}  # the tuned config's loss is shown too
    assert ex[3]["correct"] == {REF: False, TUNED: False}
    assert ex[0]["outputs"] == {REF: "so 3", TUNED: "so 7"} and ex[0]["references"] == ["7"]


def test_examples_keep_a_place_for_a_loss_and_leave_unscored_metrics_unmarked():
    many_wins = [("3", 0, "7", 1)] * 9 + [("7", 1, "2", 0)]
    ex = _examples(two(many_wins), [REF, TUNED], "exact_match")
    assert sum(e["correct"][TUNED] for e in ex) == N_EXAMPLES - 1 and ex[-1]["item_id"] == "i9"
    # chrF-like scores: no right/wrong, the scores are kept; answers are compared case/space-blind
    ex = _examples(two([("a b", 0, "A  b", 1), ("x", 0, "y", 1)], metric_values=(31.5, 58.25)), [REF, TUNED],
                   "chrf")
    assert [e["disagree"] for e in ex] == [True, False] or [e["disagree"] for e in ex] == [False, True]
    assert all(c is None for e in ex for c in e["correct"].values())


def test_examples_html_marks_right_and_wrong_answers():
    ex = _examples(two([("3", 0, "7", 1), ("7", 1, "7", 1)]), [REF, TUNED], "exact_match")
    page = "\n".join(_examples_html(ex))
    assert page.count("<tr class=disagree>") == 1
    assert "✗ wrong</span> <span class=note>answer: 3</span><pre>so 3</pre>" in page
    assert page.count("✓ right") == 3
    assert "The answers differ on 1 of these 2 items" in page
    # examples stored by an older version (outputs only) still render
    old = [{"item_id": "a", "prompt": "p", "references": ["r"], "outputs": {REF: "x", TUNED: "y"}}]
    assert "<pre>y</pre>" in "\n".join(_examples_html(old))


# ============================================================ the whole page, and re-runs
@pytest.fixture()
def out(tmp_path):
    return tmp_path / "out"


def run(tiny_pair, out, **kw):
    ev = FakeEval()
    kw = {"search": "grid", "space": GRID, "n_trials": 20, "prune": False, "out_dir": out, **kw}
    return tune(tiny_pair, toy_task(), evaluate_many=ev, compare=winning_compare(ev), **kw)


def test_report_has_what_next_and_disagreeing_examples(tiny_pair, out):
    res = run(tiny_pair, out)
    study = optuna.load_study(study_name=res.study_name, storage=resolve_storage(None, out).storage)
    page = render_html(study)
    assert "<h2 id=what-next>What next: deploy the winner</h2>" in page
    assert f"llama-cli -m MODEL.gguf $(cat {out / 'exports' / 'llamacpp_flags.txt'})" in page
    assert f"--config {out / 'best_config.json'} --task toy" in page
    assert page.index("Example generations") < page.index("What next") < page.index("<h2>Plots</h2>")
    examples = study.user_attrs["final"]["examples"]
    assert examples and all(e["disagree"] for e in examples)  # the winner beats greedy on many test items
    assert "✓ right" in page and "✗ wrong" in page
    assert "document.body.dataset.overflow" in page  # the browser test reads it


def test_resume_is_said_first_and_fresh_starts_over(tiny_pair, out):
    said: list[str] = []
    first = run(tiny_pair, out, announce=said.append)
    assert said == []  # a new study: nothing to say
    run(tiny_pair, out, announce=said.append)
    assert said == [f"resuming study {first.study_name}: 5 trials already done"]
    # another study in the same storage is left alone by --fresh
    run(tiny_pair, out, study_name="other", n_trials=2, batch_trials=1)
    said.clear()
    again = run(tiny_pair, out, announce=said.append, fresh=True, n_trials=2, batch_trials=1)
    url = f"sqlite:///{(out / 'study.db').resolve()}"
    assert said == [f"--fresh: deleted study {first.study_name} (5 trials) from {url}; starting over (cached "
                    "generations are kept)"]
    assert again.stats.trials_told == 2
    storage = resolve_storage(None, out).storage
    assert len(optuna.load_study(study_name=first.study_name, storage=storage).trials) == 2
    assert len(optuna.load_study(study_name="other", storage=storage).trials) == 2
    said.clear()
    run(tiny_pair, out, announce=said.append, fresh=True, study_name="new", n_trials=1)
    assert said == []  # --fresh on a study that does not exist yet: nothing deleted, nothing to say


def test_progress_is_a_line_per_trial_without_a_terminal(tiny_pair, out, capsys):
    run(tiny_pair, out, progress=True, batch_trials=2)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("trial ")]
    assert len(lines) == 5  # the grid's five points
    assert re.fullmatch(r"trial 0 \(1/20 this run\): exact_match=0\.\d+; best exact_match=0\.\d+ \(trial 0\); "
                        r"\d+ s", lines[0]), lines[0]
    assert lines[-1].startswith("trial 4 (5/20 this run): exact_match=")
    run(tiny_pair, out, progress=False, study_name="quiet")
    assert "trial " not in capsys.readouterr().err


def test_pruned_and_failed_trials_get_their_progress_line(tiny_pair, out, capsys):
    from test_tuning_fakes import make_fake_compare

    ev = FakeEval()
    tune(tiny_pair, toy_task(), search="random", n_trials=16, batch_trials=4, seed=3, out_dir=out,
         evaluate_many=ev, compare=make_fake_compare(ev), progress=True)
    notes = [ln.split(": ", 1)[1] for ln in capsys.readouterr().err.splitlines() if ln.startswith("trial ")]
    assert len(notes) == 16
    assert any(re.match(r"pruned after \d+ items; best exact_match=", n) for n in notes), notes
    ev = FakeEval(fail_when=lambda c: c.strategy == "greedy")
    tune(tiny_pair, toy_task(), search="grid", space={"strategy": ["greedy", "sample"], "temperature": [0.5]},
         n_trials=2, prune=False, out_dir=out, study_name="failing", evaluate_many=ev,
         compare=make_fake_compare(ev), progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("trial ")]
    assert any(ln.startswith("trial 0 (1/2 this run): failed") for ln in lines), lines


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_postgresql_study_is_kept_unless_fresh(tiny_pair, out):
    import os
    import uuid

    pg = os.environ.get("DECODETUNE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
    try:
        import psycopg

        conn = psycopg.connect(f"{pg}/test", connect_timeout=5, autocommit=True)
    except Exception as e:  # noqa: BLE001 - any failure means: no server to test against
        pytest.skip(f"no PostgreSQL server reachable at {pg}/test: {str(e).strip().splitlines()[0]}")
    db = f"decodetune_t_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE DATABASE {db}")
    try:
        url, said = f"{pg}/{db}", []
        first = run(tiny_pair, out, storage=url, announce=said.append)
        run(tiny_pair, out, storage=url, announce=said.append, n_trials=1)  # a re-run never deletes
        assert said == [f"resuming study {first.study_name}: 5 trials already done"]
        assert len(optuna.load_study(study_name=first.study_name, storage=url).trials) == 5
        said.clear()
        run(tiny_pair, out, storage=url, announce=said.append, fresh=True, n_trials=1)
        assert said[0].startswith(f"--fresh: deleted study {first.study_name} (5 trials) from {url}; ")
        assert len(optuna.load_study(study_name=first.study_name, storage=url).trials) == 1
    finally:
        conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        conn.close()
