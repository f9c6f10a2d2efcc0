"""The HTML report in a real headless Chromium: the page loads, the headline names the winner, no JS errors,
no horizontal overflow, the plots are drawn; a screenshot is kept in the test's tmp folder (its path printed).

Nothing is injected into the page: the report's own inline script sets ``<body data-overflow>``, read back
from ``--dump-dom``; JS errors are the page's console lines in Chromium's ``--enable-logging=stderr`` log.
Skipped when ``chromium`` is not installed (``apt-get install -y chromium``).
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest

import test_report_cli
from decodetune.tuning.headline import describe_config, headline
from decodetune.tuning.report import collect, write_report
from decodetune.tuning.study import resolve_storage

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

# the CLI study of tests/test_report_cli.py: a real tune run of the tiny model on arith
_one_thread = test_report_cli._one_thread
tiny_dir = test_report_cli.tiny_dir
tuned = test_report_cli.tuned

WIDTH = 1280


def chromium(page: Path, tmp: Path, *mode: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           f"--window-size={WIDTH},2000", *mode, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def open_page(page: Path, tmp: Path) -> dict:
    """Load ``page``: its DOM after the scripts ran, its console lines, and a screenshot."""
    dom = chromium(page, tmp, "--enable-logging=stderr", "--v=0", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp / "report.png"
    run = chromium(page, tmp, f"--screenshot={shot}")
    assert run.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    headline_p = re.search(r'<p class="headline" id="headline">(.*?)</p>', dom.stdout, re.S)
    return {
        "dom": dom.stdout,
        "console": [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln],
        "overflow": re.search(r'data-overflow="(\w+)"', body.group(1)).group(1) if body else None,
        "headline": html.unescape(headline_p.group(1)) if headline_p else None,
        "svgs": dom.stdout.count('class="main-svg"'),
        "screenshot": shot,
    }


def check_page(got: dict) -> None:
    print(f"report screenshot: {got['screenshot']}")
    assert "<h1>decodetune study " in got["dom"], "the page did not load"
    assert got["console"] == [], got["console"]  # no JS error (nor any other console output)
    assert got["overflow"] == "false", "the page is wider than the window"
    assert got["svgs"] >= 3, "plotly drew no plots"


def test_the_cli_report_in_chromium(tuned, tmp_path):
    page = tuned / "report.html"  # what `decodetune tune` wrote
    got = open_page(page, tmp_path)
    check_page(got)
    study = optuna.load_study(study_name=_only_study(tuned),
                              storage=resolve_storage(None, tuned).storage)
    d = collect(study)
    assert got["headline"] == d["headline"] != ""
    if got["headline"].startswith("no config beat"):
        assert got["headline"] == "no config beat the default; keep greedy"
    else:  # it names the tuned config that won on the test split
        winner = next(r for r in study.user_attrs["final"]["rows"] if r.get("vs"))
        assert got["headline"].startswith(describe_config(winner["config"]))
    assert "What next: deploy the winner" in got["dom"] and "decodetune verify --backend llamacpp" in got["dom"]


def test_a_known_winner_is_named_in_chromium(tiny_pair, tmp_path):
    from decodetune.tuning import tune
    from test_report_headline import GRID, winning_compare
    from test_tuning_fakes import FakeEval, toy_task

    ev = FakeEval()
    res = tune(tiny_pair, toy_task(), search="grid", space=GRID, n_trials=20, prune=False, out_dir=tmp_path / "out",
               evaluate_many=ev, compare=winning_compare(ev))
    page = write_report(res.study, tmp_path / "out" / "report.html")
    got = open_page(page, tmp_path)
    check_page(got)
    assert got["headline"] == headline(res.study.user_attrs["final"], [("exact_match", "max")])
    assert got["headline"].startswith("sampling, temperature=0.5, top_p=0.9 beat greedy on exact_match by +")
    assert '<tr class="disagree">' in got["dom"] and "✓ right" in got["dom"]


def test_the_checks_catch_a_broken_page(tmp_path):
    """The same checks on a page with a JS error and a too-wide block fail (they can see what they test)."""
    from decodetune.tuning.report import _OVERFLOW_SCRIPT

    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><h1>decodetune study x</h1><div style='width:3000px'>wide</div>"
                   "<script>undefinedThing.call()</script>" + _OVERFLOW_SCRIPT + "</body></html>")
    got = open_page(bad, tmp_path)
    assert got["overflow"] == "true"
    assert any("Uncaught ReferenceError: undefinedThing is not defined" in ln for ln in got["console"]), got
    with pytest.raises(AssertionError):
        check_page(got)


def _only_study(folder: Path) -> str:
    [summary] = optuna.get_all_study_summaries(resolve_storage(None, folder).storage, include_best_trial=False)
    return summary.study_name
