"""Many workers on one study, against the real PostgreSQL server on 127.0.0.1:5432.

Workers are separate `decodetune worker` processes on a tiny random Llama saved to disk. The task's
references are transformers' greedy continuations, so configs score differently and deterministically
(row seeds come from (seed, item, repeat)): a 3-worker grid must reproduce the single-process values.
Skipped, with the reason, only when no PostgreSQL server answers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres

PG = os.environ.get("DECODETUNE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
ADMIN_DB = "test"
PROMPTS = ["The quick", "Once upon", "What is", "Paris is", "She sells", "The lazy", "a small robot", "12 plus",
           "Berlin is", "sea shells", "count numbers", "the capital", "brown fox", "loved to", "the answer",
           "over the"]
GRID_SPACE = """\
strategy: sample
temperature: [0.05, 0.7, 1.5, 3.0, 6.0, 12.0]
top_k: [0, 3, 10, 40]
"""
SLOW_METRIC = """\
import os, time

CALLS = [0]

def slow_match(predictions, references, items):
    CALLS[0] += 1
    hold = os.environ.get("HOLD_FILE")
    if hold and CALLS[0] > 4:  # the test kills this worker mid-trial: say so, then wait for the kill
        open(hold, "w").close()
        time.sleep(3600)
    time.sleep(float(os.environ.get("SLOW_METRIC_S", "0")))
    return [float(p.strip() == (r[0] if isinstance(r, list) else r).strip()) for p, r in zip(predictions, references)]
"""


def _connect(db: str):
    import psycopg

    return psycopg.connect(f"{PG}/{db}", connect_timeout=5, autocommit=True)


@pytest.fixture(scope="module")
def pg_db():
    """A fresh database for this module (dropped afterwards)."""
    try:
        conn = _connect(ADMIN_DB)
    except Exception as e:  # noqa: BLE001 - any failure means: no server to test against
        pytest.skip(f"no PostgreSQL server reachable at {PG}/{ADMIN_DB}: {str(e).strip().splitlines()[0]}")
    name = f"decodetune_t_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE DATABASE {name}")
    yield f"{PG}/{name}"
    conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_pair):
    """Tiny model folder, a task file with greedy references, a grid space and a slow user metric."""
    import torch

    model, tok = tiny_pair
    root = tmp_path_factory.mktemp("dist")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = []
    for i, text in enumerate(PROMPTS):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                                 min_new_tokens=4, pad_token_id=0)
        rows.append({"id": f"p{i}", "prompt": text,
                     "reference": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "grid.yaml").write_text(GRID_SPACE + "max_new_tokens: 4\nmin_new_tokens: 4\n")
    (root / "slowmetric.py").write_text(SLOW_METRIC)
    return root


def worker_cmd(root: Path, url: str, study: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "decodetune", "worker", "--storage", url, "--study-name", study,
            "--model", str(root / "model"), "--task", str(root / "task.jsonl"), "--threads", "1",
            "--out", str(root / f"out-{study}"), *extra]


def start(root: Path, cmd: list[str], **env: str) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    return outs


def load(url: str, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=url)


def point(t) -> tuple:
    return (t.params.get("temperature"), t.params.get("top_k"))


def test_grid_three_workers_match_single_process(pg_db, workdir):
    from optuna.trial import TrialState

    grid = ["--search", "grid", "--space", str(workdir / "grid.yaml"), "--no-prune", "--objective",
            "exact_match:max"]
    single = f"single-{uuid.uuid4().hex[:6]}"
    finish([start(workdir, worker_cmd(workdir, pg_db, single, *grid))])
    multi = f"multi-{uuid.uuid4().hex[:6]}"
    finish([start(workdir, worker_cmd(workdir, pg_db, multi, *grid, "--batch-trials", "2")) for _ in range(3)])

    s1, s3 = load(pg_db, single), load(pg_db, multi)
    for s in (s1, s3):
        assert len(s.trials) == 24, (s.study_name, [(t.number, t.state.name, point(t)) for t in s.trials])
        done = s.get_trials(states=(TrialState.COMPLETE,))
        assert len(done) == 24 and len({point(t) for t in done}) == 24  # every point once, no duplicates
    v1 = {point(t): t.value for t in s1.trials}
    v3 = {point(t): t.value for t in s3.trials}
    assert v1 == v3
    assert s1.best_value == s3.best_value == max(v1.values())
    assert len(set(v1.values())) > 1  # the objective really separates the configs


def test_killed_worker_trial_fails_and_is_retried(pg_db, workdir):
    from optuna.trial import TrialState

    study = f"kill-{uuid.uuid4().hex[:6]}"
    args = ["--search", "grid", "--space", str(workdir / "grid.yaml"), "--no-prune", "--objective",
            "slowmetric:slow_match:max", "--batch-trials", "2"]
    env = {"DECODETUNE_HEARTBEAT_INTERVAL": "1", "DECODETUNE_GRACE_PERIOD": "4"}
    held_flag = workdir / f"held-{study}"
    victim = start(workdir, worker_cmd(workdir, pg_db, study, *args), HOLD_FILE=str(held_flag), **env)
    # killed inside its fifth metric call, after trials have completed, so a trial is surely RUNNING at the
    # kill (killing on a poll's word raced the worker: between its tell and its next ask, seen once in CI)
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None and not held_flag.exists():
        time.sleep(0.2)
    if not held_flag.exists():
        victim.kill()
        pytest.fail(f"the victim worker never held a running trial: {victim.communicate()[0][-2000:]}")
    assert load(pg_db, study).get_trials(states=(TrialState.COMPLETE,))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # the victim may have asked its batch's other trial too (with no heartbeat yet, that one is failed as
    # well: distributed.adopt_unbeaten_trials)
    held = {t.number for t in load(pg_db, study).get_trials(states=(TrialState.RUNNING,))}
    assert held
    finish([start(workdir, worker_cmd(workdir, pg_db, study, *args), **env) for _ in range(2)])

    s = load(pg_db, study)
    failed = s.get_trials(states=(TrialState.FAIL,))
    assert {t.number for t in failed} == held  # the victim's trials ended FAIL through the heartbeat
    retried = {t.system_attrs.get("failed_trial") for t in s.get_trials(states=(TrialState.COMPLETE,))}
    assert held <= retried  # ... and were retried with the same parameters
    done = s.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 24 and len({point(t) for t in done}) == 24
    assert not s.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def test_tpe_four_workers_then_report_and_status(pg_db, workdir, tmp_path):
    from optuna.trial import TrialState

    study = f"tpe-{uuid.uuid4().hex[:6]}"
    args = ["--search", "tpe", "--n-trials", "10", "--objective", "exact_match:max", "--batch-trials", "2"]
    finish([start(workdir, worker_cmd(workdir, pg_db, study, *args)) for _ in range(4)])
    s = load(pg_db, study)
    assert len(s.trials) == 40
    assert all(t.state == TrialState.COMPLETE for t in s.trials)
    assert not any("error" in t.user_attrs for t in s.trials)

    from decodetune.cli.main import main

    html = tmp_path / "report.html"
    assert main(["report", "--storage", pg_db, "--study-name", study, "--out", str(html)]) == 0
    assert "optimisation history" in html.read_text().lower()
    from decodetune.cli.status_cmd import study_status

    info = study_status(s)
    assert info["complete"] + info["pruned"] == 40 and info["running"] == info["failed"] == 0
    assert info["best_value"] == max(t.value for t in s.trials if not t.user_attrs.get("pruned"))


def _has_trial(url: str, study: str) -> bool:
    import optuna

    try:
        return bool(optuna.load_study(study_name=study, storage=url).trials)
    except KeyError:  # not created yet
        return False


def test_connection_drop_mid_study_reconnects(pg_db, workdir):
    from optuna.trial import TrialState

    study = f"drop-{uuid.uuid4().hex[:6]}"
    url = f"{pg_db}?application_name=decodetune_drop"
    args = ["--search", "random", "--n-trials", "8", "--objective", "slowmetric:slow_match:max",
            "--batch-trials", "1", "--no-prune"]
    proc = start(workdir, worker_cmd(workdir, url, study, *args), SLOW_METRIC_S="0.5")
    killed = 0
    conn = _connect(ADMIN_DB)
    deadline = time.time() + 120
    # mid-study: the drops start once the worker has created the study and asked a trial (a drop while
    # the study is being created is another fault, which this test is not about)
    while time.time() < deadline and proc.poll() is None and not _has_trial(pg_db, study):
        time.sleep(0.2)
    while time.time() < deadline and proc.poll() is None and killed < 3:
        time.sleep(1.5)
        cur = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE application_name = 'decodetune_drop'")
        killed += sum(1 for (ok,) in cur.fetchall() if ok)
    conn.close()
    out, _ = proc.communicate(timeout=300)
    assert killed > 0, "no connection was dropped"
    s = load(pg_db, study)
    complete = s.get_trials(states=(TrialState.COMPLETE,))
    if proc.returncode == 0:
        assert len(complete) == 8  # reconnected and finished
    else:  # or a clear one-line message, and nothing completed was lost
        assert proc.returncode == 2 and "error: storage: lost the connection" in out, out[-2000:]
        assert "Traceback" not in out


def run_cli(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "decodetune", *args], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def test_bad_databases_fail_clearly_and_fast(pg_db, workdir):
    base = ["status", "--study-name", "x", "--storage"]
    t0 = time.time()
    code, err = run_cli(*base, "postgresql://postgres@127.0.0.1:5999/test")  # nothing listens there
    assert code == 2 and err.startswith("error: storage: cannot open") and err.count("\n") == 1, err
    code, err = run_cli(*base, f"{PG}/no_such_database_xyz")
    assert code == 2 and "no_such_database_xyz" in err and "does not exist" in err, err
    code, err = run_cli(*base, "postgresql://no_such_role:secret@127.0.0.1:5432/test")
    assert code == 2 and "secret" not in err and "no_such_role" in err, err
    assert time.time() - t0 < 90


def test_same_study_name_with_another_space_names_the_difference(pg_db, workdir, tmp_path):
    study = f"space-{uuid.uuid4().hex[:6]}"
    args = ["--search", "grid", "--space", str(workdir / "grid.yaml"), "--n-trials", "1", "--objective",
            "exact_match:max"]
    finish([start(workdir, worker_cmd(workdir, pg_db, study, *args))])
    other = tmp_path / "other.yaml"
    other.write_text(GRID_SPACE.replace("12.0]", "24.0]") + "max_new_tokens: 4\nmin_new_tokens: 4\n")
    args[3] = str(other)
    proc = subprocess.run(worker_cmd(workdir, pg_db, study, *args), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "different space" in proc.stderr and "temperature" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_refuses_sqlite(workdir, tmp_path):
    code, err = run_cli("worker", "--storage", f"sqlite:///{tmp_path}/s.db", "--study-name", "s", "--task",
                        str(workdir / "task.jsonl"), "--model", str(workdir / "model"))
    assert code == 2 and "SQLite is not safe for parallel workers" in err


def test_trial_killed_before_its_first_heartbeat_is_failed_and_retried(pg_db):
    """A worker that dies between ask() and its first heartbeat leaves a RUNNING trial with no heartbeat
    row, which Optuna's fail_stale_trials skips for ever (a grid study then waited for it for ever; seen
    once in CI as test_killed_worker_trial_fails_and_is_retried hanging)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from decodetune.tuning.distributed import adopt_unbeaten_trials, reap_stale_trials

    storage = RDBStorage(pg_db, heartbeat_interval=1, grace_period=1,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    study = optuna.create_study(study_name=f"unbeaten-{uuid.uuid4().hex[:6]}", storage=storage)
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # its worker "dies" here
    live = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage.record_heartbeat(live._trial_id)  # a live worker beats right after asking
    assert adopt_unbeaten_trials(study, grace_s=60) == []  # too young to tell
    optuna.storages.fail_stale_trials(study)
    assert study.trials[dead.number].state == TrialState.RUNNING  # what Optuna alone does: nothing, for ever
    time.sleep(1.2)
    assert adopt_unbeaten_trials(study, grace_s=1) == [dead._trial_id]  # the live one has a heartbeat
    storage.record_heartbeat(live._trial_id)
    time.sleep(1.2)
    storage.record_heartbeat(live._trial_id)
    reap_stale_trials(study)
    states = {t.number: t.state for t in study.trials}
    assert states[dead.number] == TrialState.FAIL and states[live.number] == TrialState.RUNNING
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING and retry[0].params == dead.params


def test_storage_failure_finds_the_lost_connection_in_the_cause_chain():
    """Optuna wraps what a dropped connection raised in StorageInternalError; the lost connection can sit
    one level down (a rollback that failed too) or be a PendingRollbackError; other errors stay as they are."""
    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    from decodetune.tuning.distributed import storage_failure

    def wrapped(cause: BaseException) -> StorageInternalError:
        try:
            raise StorageInternalError("An exception is raised during the commit.") from cause
        except StorageInternalError as e:
            return e

    dropped = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    deeper = ValueError("while rolling back")
    deeper.__context__ = dropped
    pending = sqlalchemy.exc.PendingRollbackError("Can't reconnect until invalid transaction is rolled back")
    for cause in (dropped, deeper, pending):
        line = storage_failure(wrapped(cause), "postgresql://user:secret@db/x")
        assert line is not None and line.startswith("storage: lost the connection") and "secret" not in line
    assert storage_failure(wrapped(sqlalchemy.exc.DataError("x", {}, Exception("too long"))), None) is None
    assert storage_failure(ValueError("not a storage error"), None) is None
