"""Trials a killed run leaves RUNNING on a storage without heartbeats (SQLite, journal) are failed on resume,
said first; a single process on its default SQLite file gets no "not safe for parallel workers" warning."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import optuna
import pytest
from optuna.trial import TrialState

from decodetune.tuning import tune
from decodetune.tuning.distributed import (
    OWNER_ATTR,
    Heartbeat,
    check_parallel_safe,
    fail_dead_trials,
    owner_tag,
)
from decodetune.tuning.study import resolve_storage
from test_tuning_fakes import FakeEval, make_fake_compare, toy_task


class Records(logging.Handler):
    """Collects decodetune.tuning warnings whatever handlers the CLI tests installed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture()
def warnings_seen():
    log = logging.getLogger("decodetune.tuning")
    handler, level = Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    yield handler.messages
    log.removeHandler(handler)
    log.setLevel(level)


def _tune(tiny_pair, tmp_path, storage, n_trials):
    ev = FakeEval()
    return tune(tiny_pair, toy_task(), search="random", n_trials=n_trials, prune=False, storage=storage,
                study_name="S", out_dir=tmp_path / "out", evaluate_many=ev, compare=make_fake_compare(ev),
                final_test=False)


def _kill_mid_trials(storage: str, tmp_path) -> None:
    """Another process asks two trials, starts evaluating them (Heartbeat), and is killed with SIGKILL."""
    script = textwrap.dedent(f"""
        import os, signal, optuna
        from decodetune.tuning.distributed import Heartbeat
        from decodetune.tuning.study import resolve_storage
        info = resolve_storage({storage!r}, {str(tmp_path / "out")!r})
        study = optuna.load_study(study_name="S", storage=info.storage)
        trials = [study.ask(), study.ask()]
        Heartbeat(study, trials).__enter__()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr


def _storage(kind: str, tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'out' / 'study.db'}" if kind == "sqlite" else str(tmp_path / "s.journal")


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_killed_runs_trials_are_failed_on_resume_and_said_first(kind, tiny_pair, tmp_path, warnings_seen):
    storage = _storage(kind, tmp_path)
    _tune(tiny_pair, tmp_path, storage, 3)
    _kill_mid_trials(storage, tmp_path)
    study = optuna.load_study(study_name="S", storage=resolve_storage(storage, tmp_path / "out").storage)
    assert len(study.get_trials(states=(TrialState.RUNNING,))) == 2  # what kill -9 used to leave for ever
    warnings_seen.clear()
    _tune(tiny_pair, tmp_path, storage, 5)
    assert warnings_seen and "2 trial(s) left RUNNING by a run that was killed" in warnings_seen[0]
    assert not any("not safe for parallel" in m for m in warnings_seen)
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    stale = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stale) == 2 and all(t.user_attrs["error"].startswith("stale:") for t in stale)
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 5


def test_single_process_on_default_sqlite_gets_no_parallel_warning(tiny_pair, tmp_path, warnings_seen):
    _tune(tiny_pair, tmp_path, None, 2)
    _tune(tiny_pair, tmp_path, None, 4)  # resume
    assert not any("not safe for parallel" in m for m in warnings_seen)


def test_live_owner_is_left_alone_and_sqlite_warns_about_it(tmp_path, warnings_seen):
    info = resolve_storage(None, tmp_path / "out")
    study = optuna.create_study(storage=info.storage, study_name="S")
    trial = study.ask()
    with Heartbeat(study, [trial]):
        assert study.get_trials()[0].system_attrs[OWNER_ATTR] == owner_tag()
        assert "not safe for parallel" in (check_parallel_safe(study, info.url) or "")
    assert study.get_trials()[0].state == TrialState.RUNNING
    assert check_parallel_safe(study, "x.journal") is None and not warnings_seen


def test_untagged_running_trial_is_dead_only_after_the_grace_period(tmp_path):
    info = resolve_storage(str(tmp_path / "s.journal"), tmp_path)
    study = optuna.create_study(storage=info.storage, study_name="S")
    study.ask()  # asked by an older version, or killed between ask and evaluation: no owner tag
    assert fail_dead_trials(study) == []
    assert fail_dead_trials(study, grace_s=-1) == [0]
    assert study.get_trials()[0].state == TrialState.FAIL
