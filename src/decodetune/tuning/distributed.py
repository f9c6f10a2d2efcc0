"""Many workers, one study: heartbeats, stale-trial retry, a study-wide lock, and storage checks.

The database is the only coordination point (no scheduler of our own):

- Server storages (PostgreSQL, MySQL) record a heartbeat for every trial a worker holds. A worker killed
  mid-trial stops beating; after ``grace_period`` any other worker fails that trial
  (:func:`optuna.storages.fail_stale_trials`) and Optuna's ``RetryHeartbeatStaleTrialCallback`` enqueues a
  copy with the same parameters, which the next ``ask()`` hands out.
- Grid points are enqueued and asked under :func:`study_lock` (a PostgreSQL advisory lock, or a file
  lock next to a journal/SQLite file), so two workers never enqueue or take the same point. This is the
  guard against Optuna's known duplicate evaluation in distributed grid search.
- File storages (SQLite, journal) have no heartbeat: each trial a process evaluates is tagged with its
  owner (host, pid, process start time), and a RUNNING trial whose owner process is gone (``kill -9``)
  is failed on the next start or ask (:func:`fail_dead_trials`), so it is retried and never shows as
  running for ever.
- SQLite is not safe for parallel workers ("database is locked"); :func:`check_parallel_safe` says so,
  but only when another live process holds trials, never about a run's own default storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("decodetune.tuning")

#: Seconds between heartbeats, and how long a silent trial lives before another worker fails it.
HEARTBEAT_INTERVAL = int(os.environ.get("DECODETUNE_HEARTBEAT_INTERVAL", "20"))
GRACE_PERIOD = int(os.environ.get("DECODETUNE_GRACE_PERIOD", "60"))
MAX_RETRY = 3
#: Trial system attribute naming the process that evaluates a trial on a storage without heartbeats.
OWNER_ATTR = "decodetune:owner"


def is_server_url(url: str) -> bool:
    """PostgreSQL / MySQL URLs: storages that several machines can share."""
    return url.startswith(("postgresql", "postgres://", "mysql"))


def heartbeat_kwargs(url: str) -> dict[str, Any]:
    """RDBStorage keyword arguments that turn on heartbeats and retry of stale trials."""
    if not is_server_url(url):
        return {}
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return {"heartbeat_interval": HEARTBEAT_INTERVAL, "grace_period": GRACE_PERIOD,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)}


def reap_stale_trials(study: Any) -> None:
    """Fail trials whose worker stopped beating (their retries are enqueued by the callback), or, on a
    storage without heartbeats, whose process on this machine is gone."""
    import optuna

    if not has_heartbeat(study):
        _say_failed(fail_dead_trials(study))
        return
    adopt_unbeaten_trials(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def adopt_unbeaten_trials(study: Any, grace_s: float = GRACE_PERIOD) -> list[int]:
    """Give a first heartbeat to RUNNING trials that never had one and started over ``grace_s`` ago.

    A worker killed between asking a trial and its first heartbeat (a few milliseconds) leaves a RUNNING
    trial with no heartbeat row, which Optuna's ``fail_stale_trials`` skips for ever; a grid study then waits
    for it for ever. A live worker beats right after asking, so such a trial is dead: with this heartbeat it
    goes stale one grace period later and takes the normal path (failed, retried by the callback).
    """
    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    storage = getattr(study._storage, "_backend", study._storage)
    if not isinstance(storage, RDBStorage):
        return []
    from optuna.storages._rdb.storage import _create_scoped_session

    now = datetime.now()  # Optuna stamps datetime_start with the asking machine's naive local time
    # Optuna's own session handling: rollback on error, a lost connection surfaces as StorageInternalError
    with _create_scoped_session(storage.scoped_session) as session:
        running = (session.query(models.TrialModel)
                   .filter(models.TrialModel.study_id == study._study_id)
                   .filter(models.TrialModel.state == TrialState.RUNNING).all())
        rows = [(t.trial_id, t.datetime_start) for t in running if not t.heartbeats]
    adopted = [tid for tid, start in rows if start is not None and (now - start).total_seconds() > grace_s]
    for trial_id in adopted:
        storage.record_heartbeat(trial_id)
        log.warning("trial id %d has had no heartbeat since it started: its worker died; it is failed and "
                    "retried after the grace period", trial_id)
    return adopted



def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 of proc(5), counted after the "(comm)" field


def owner_tag() -> str:
    """``host:pid:start`` of this process."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def _owner_alive(tag: str) -> bool | None:
    """Whether the tagged process still runs; None when it runs on another machine (can't tell)."""
    host, _, rest = tag.partition(":")
    pid_s, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_s.isdigit():
        return None
    pid = int(pid_s)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return not start or _start_time(pid) in ("", start)


def fail_dead_trials(study: Any, grace_s: float = GRACE_PERIOD) -> list[int]:
    """Fail RUNNING trials whose owner process on this machine is gone; returns their numbers.

    For storages without heartbeats (SQLite, journal), where a killed run's trials would otherwise stay
    RUNNING for ever. A trial with no owner tag (asked by an older version, or killed between ask and
    evaluation) counts as dead once it is ``grace_s`` old. Trials of other machines are left alone.
    """
    import datetime

    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    now = datetime.datetime.now()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tag = t.system_attrs.get(OWNER_ATTR)
        if tag is not None:
            dead = _owner_alive(str(tag)) is False
        else:
            dead = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > grace_s
        if not dead:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "error", f"stale: its process ({tag or 'unknown'}) ended "
                                        "without finishing it")
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                failed.append(t.number)
        except optuna.exceptions.UpdateFinishedTrialError:  # another process failed it first
            pass
    return failed


def _say_failed(numbers: list[int]) -> None:
    if numbers:
        shown = ", ".join(map(str, numbers[:8])) + (", ..." if len(numbers) > 8 else "")
        log.warning("%d trial(s) left RUNNING by a run that was killed (trial %s) are now marked failed; "
                    "their points can be tried again", len(numbers), shown)


def has_heartbeat(study: Any) -> bool:
    """Whether the study's storage records heartbeats (so stale trials of dead workers get failed)."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    storage = study._storage
    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


class Heartbeat:
    """Records a heartbeat for each trial of a batch until the block ends (no-op without heartbeats)."""

    def __init__(self, study: Any, trials: list[Any]):
        self._storage = study._storage if has_heartbeat(study) else None
        self._study_storage = study._storage
        self._ids = [t._trial_id for t in trials]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        for trial_id in self._ids:
            try:
                self._storage.record_heartbeat(trial_id)  # type: ignore[union-attr]
            except Exception as e:  # a lost connection must not kill the evaluation; the next beat retries
                log.warning("heartbeat for trial id %d failed: %s", trial_id, str(e).splitlines()[0])

    def __enter__(self) -> Heartbeat:
        if self._storage is None:
            self._tag_owner()
            return self
        if not self._ids:
            return self
        self._beat()
        interval = self._storage.get_heartbeat_interval() or HEARTBEAT_INTERVAL

        def loop() -> None:
            while not self._stop.wait(interval):
                self._beat()

        self._thread = threading.Thread(target=loop, name="decodetune-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _tag_owner(self) -> None:
        """Without heartbeats, record which process holds each trial (see :func:`fail_dead_trials`)."""
        tag = owner_tag()
        for trial_id in self._ids:
            try:
                self._study_storage.set_trial_system_attr(trial_id, OWNER_ATTR, tag)
            except Exception as e:  # a missing tag only delays the reaping of this trial to the grace period
                log.warning("could not tag trial id %d with its process: %s", trial_id, str(e).splitlines()[0])

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@contextlib.contextmanager
def study_lock(study: Any, url: str) -> Iterator[None]:
    """Exclusive section across all workers of ``study`` (grid enqueue + ask)."""
    key = int.from_bytes(hashlib.sha256(study.study_name.encode()).digest()[:8], "big", signed=True)
    storage = study._storage
    inner = getattr(storage, "_backend", storage)  # optuna wraps RDB storages in a cache
    engine = getattr(inner, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        import sqlalchemy

        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        return
    path = _file_of(url)
    if path is None:  # in-memory or a server without advisory locks: one process, nothing to guard
        yield
        return
    from filelock import FileLock

    with FileLock(str(path) + f".{key & 0xFFFFFFFF:08x}.lock"):
        yield


def _file_of(url: str) -> Path | None:
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    if "://" not in url:
        return Path(url)
    return None


def check_parallel_safe(study: Any, url: str) -> str | None:
    """At the start of a run: fail trials a killed run left RUNNING (and say so, first), then a warning
    when a SQLite study still has a RUNNING trial, i.e. another live process writes to it.

    A single process on its own default SQLite file gets no warning.
    """
    if not has_heartbeat(study):
        _say_failed(fail_dead_trials(study))
    if not url.startswith("sqlite"):
        return None
    from optuna.trial import TrialState

    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        return ("SQLite storage is not safe for parallel workers (writers get 'database is locked'); use a "
                "journal file (--storage study.journal) on one machine or PostgreSQL across machines")
    return None


def storage_failure(error: BaseException, url: str | None) -> str | None:
    """One line for a storage that went away mid-study (None if ``error`` is something else).

    Every trial a worker told is committed at once, so a lost connection loses no completed trial:
    the message says so and how to continue.
    """
    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    # a session that outlived its connection says PendingRollbackError on its next use
    lost = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.PendingRollbackError)
    # Optuna wraps a failed commit in StorageInternalError: the dropped connection is its cause (or its
    # cause's context). Nothing else is unwrapped (a UserError such as "cannot open" already says what happened).
    if isinstance(error, StorageInternalError):
        error = _lost_in_chain(error, lost) or error
    if not isinstance(error, lost) and not getattr(error, "connection_invalidated", False):
        return None
    from decodetune.tuning.study import _redact

    where = _redact(url) if url else "the storage"
    reason = str(getattr(error, "orig", error)).strip().splitlines()[0] if str(error).strip() else "no reason"
    return (f"storage: lost the connection to {where} ({reason}); completed trials are saved, and re-running "
            "the same command continues the study")


def _lost_in_chain(error: BaseException, lost: tuple[type, ...]) -> BaseException | None:
    """The first lost-connection error among ``error``'s causes and contexts."""
    seen: set[int] = set()
    e: BaseException | None = error.__cause__ or error.__context__
    while e is not None and id(e) not in seen:
        if isinstance(e, lost) or getattr(e, "connection_invalidated", False):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
