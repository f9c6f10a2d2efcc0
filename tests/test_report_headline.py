"""The report's headline, short configs, power sentence and knob table (from the storage, fake evaluator)."""

from __future__ import annotations

import io
import re

import optuna
import pytest

from decodetune.tuning import tune
from decodetune.tuning.headline import describe_config, headline, short_config
from decodetune.tuning.report import print_summary, render_html
from decodetune.tuning.study import resolve_storage
from test_tuning_fakes import FakeComparison, FakeEval, toy_task

OBJ = [("exact_match", "max")]
GRID = {"strategy": ["greedy", "beam", "sample"], "num_beams": [2, 4], "temperature": [0.5, 0.7123456],
        "top_p": [0.9]}


def final_of(*tuned, held_out=True):
    rows = [{"name": "greedy (default)", "config": {"strategy": "greedy"}, "metrics": {}, "vs": None, "paired": {}}]
    for i, (cfg, paired) in enumerate(tuned):
        rows.append({"name": f"tuned (trial {i})", "config": cfg, "metrics": {}, "vs": "greedy (default)",
                     "paired": {"exact_match": paired}})
    return {"split": "test", "n_items": 32, "held_out": held_out, "rows": rows}


def test_headline_names_the_winner_with_its_paired_difference():
    beam = {"strategy": "beam", "num_beams": 4, "max_new_tokens": 12}
    p = {"diff": 0.22, "ci_low": 0.06, "ci_high": 0.41, "p_value": 0.01, "p_holm": 0.02}
    assert headline(final_of((beam, p)), OBJ) == ("beam search, 4 beams beat greedy on exact_match by +0.22 "
                                                  "[0.06, 0.41] on 32 held-out items (p = 0.02)")
    # significant only before Holm: not a winner
    assert headline(final_of((beam, {**p, "p_holm": 0.06})), OBJ) == "no config beat the default; keep greedy"
    # significantly worse is no win either; for a min metric a negative difference is
    worse = {**p, "diff": -0.22, "ci_low": -0.41, "ci_high": -0.06}
    assert headline(final_of((beam, worse)), OBJ) == "no config beat the default; keep greedy"
    assert headline(final_of((beam, worse)), [("length", "min")]).startswith("no config")  # no paired length
    f = final_of((beam, worse))
    f["rows"][1]["paired"] = {"length": worse}
    assert headline(f, [("length", "min")]).startswith("beam search, 4 beams beat greedy on length by -0.22")
    assert headline(None, OBJ) == ""


def test_configs_read_the_same_everywhere():
    assert short_config({"strategy": "sample", "temperature": 0.7123456, "top_p": 0.9, "top_k": 40}) == \
        "strategy=sample, temperature=0.712, top_p=0.9, top_k=40"
    assert short_config({}) == "(defaults)"
    assert describe_config({"strategy": "sample", "temperature": 0.7, "max_new_tokens": 12}) == \
        "sampling, temperature=0.7"
    assert describe_config({"strategy": "greedy"}) == "greedy"


def winning_compare(ev):
    """The fake compare, but every tuned config beats the baseline clearly (p = 0.004 after Holm)."""
    def compare(model, task, configs, **kw):
        results = ev(model, task, configs, **kw)
        diffs = [{"index": j, "metric": m, "diff": s.value - results[0].metrics[m].value, "ci_low": 0.01,
                  "ci_high": 0.3, "p_value": 0.002, "p_holm": 0.004, "test": "wilcoxon"}
                 for j, r in enumerate(results[1:], start=1) for m, s in r.metrics.items()]
        return FakeComparison(results, diffs)
    return compare


@pytest.fixture()
def study(tiny_pair, tmp_path):
    ev = FakeEval()
    res = tune(tiny_pair, toy_task(), search="grid", space=GRID, n_trials=20, prune=False,
               out_dir=tmp_path / "out", evaluate_many=ev, compare=winning_compare(ev))
    return optuna.load_study(study_name=res.study_name, storage=resolve_storage(None, tmp_path / "out").storage)


def test_report_starts_with_the_headline_and_has_no_empty_headers(study):
    page = render_html(study)
    body = page.split("<body>", 1)[1]
    first_p = re.search(r"<p class=headline id=headline>(.*?)</p>", body)
    assert first_p and body.index("<h1>") < first_p.start() < body.index("<table>")
    assert " beat greedy on exact_match by +" in first_p.group(1) and "on 20 held-out items (p = 0.004)" in \
        first_p.group(1)
    assert not re.search(r"<th>\s*</th>", page)  # every column says what it is
    assert '{"strategy"' not in page.split("<h2>Plots</h2>")[0]  # configs are k=v, not JSON
    assert "temperature=0.712" in page and "0.7123456" not in page.split("<h2>Plots</h2>")[0]
    assert "Which knobs matter" in page and "PED-ANOVA" in page
    assert re.search(r"with 20 test items a difference below [0-9.]+ cannot be told from noise", page)


def test_terminal_summary_has_the_headline_power_and_knobs(study):
    from rich.console import Console

    buf = io.StringIO()
    print_summary(study, console=Console(file=buf, width=220))
    out = buf.getvalue()
    assert out.splitlines()[0].startswith(("beam search", "sampling", "greedy"))
    assert " beat greedy on exact_match by +" in out.splitlines()[0]
    assert "cannot be told from noise" in out and "which knobs matter" in out
    assert "not enough data" in out or "matters" in out or "no effect within" in out
