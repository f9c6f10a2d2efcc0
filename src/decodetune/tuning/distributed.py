"""Many workers, one study: heartbeats, stale-trial retry, a study-wide lock, and storage checks.

The database is the only coordination point (no scheduler of our own):

- Server storages (PostgreSQL, MySQL) record a heartbeat for every trial a worker holds. A worker killed
  mid-trial stops beating; after ``grace_period`` any other worker fails that trial
  (:func:`optuna.storages.fail_stale_trials`) and Optuna's ``RetryHeartbeatStaleTrialCallback`` enqueues a
  copy with the same parameters, which the next ``ask()`` hands out.
- Grid points are enqueued and asked under :func:`study_lock` (a PostgreSQL advisory lock, or a file
  lock next to a journal/SQLite file), so two workers never enqueue or take the same point. This is the
  guard against Optuna's known duplicate evaluation in distributed grid search.
- SQLite is not safe for parallel workers ("database is locked"); :func:`check_parallel_safe` says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("decodetune.tuning")

#: Seconds between heartbeats, and how long a silent trial lives before another worker fails it.
HEARTBEAT_INTERVAL = int(os.environ.get("DECODETUNE_HEARTBEAT_INTERVAL", "20"))
GRACE_PERIOD = int(os.environ.get("DECODETUNE_GRACE_PERIOD", "60"))
MAX_RETRY = 3


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
    """Fail trials whose worker stopped beating (their retries are enqueued by the callback)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def has_heartbeat(study: Any) -> bool:
    """Whether the study's storage records heartbeats (so stale trials of dead workers get failed)."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    storage = study._storage
    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


class Heartbeat:
    """Records a heartbeat for each trial of a batch until the block ends (no-op without heartbeats)."""

    def __init__(self, study: Any, trials: list[Any]):
        self._storage = study._storage if has_heartbeat(study) else None
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
        if self._storage is None or not self._ids:
            return self
        self._beat()
        interval = self._storage.get_heartbeat_interval() or HEARTBEAT_INTERVAL

        def loop() -> None:
            while not self._stop.wait(interval):
                self._beat()

        self._thread = threading.Thread(target=loop, name="decodetune-heartbeat", daemon=True)
        self._thread.start()
        return self

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
    """A warning when a SQLite study already has a RUNNING trial (probably another worker)."""
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

    if not isinstance(error, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return None
    from decodetune.tuning.study import _redact

    where = _redact(url) if url else "the storage"
    reason = str(getattr(error, "orig", error)).strip().splitlines()[0] if str(error).strip() else "no reason"
    return (f"storage: lost the connection to {where} ({reason}); completed trials are saved, and re-running "
            "the same command continues the study")
