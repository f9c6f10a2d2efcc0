"""Optuna plumbing: storages, samplers, pruners and idempotent study creation.

Studies are created with ``load_if_exists=True`` so that re-running the same command (or starting several
workers on one storage) continues one study. What the study was created for (model, task, objectives,
space, sampler options) is stored in its user attributes; a later run that disagrees is refused with a
message, instead of silently mixing incompatible trials.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decodetune.errors import UserError

if TYPE_CHECKING:
    import optuna

    from decodetune.tuning.space import SearchSpace

SEARCHES = ("grid", "random", "tpe", "gp", "cmaes", "nsga2")
#: Study user attributes that must agree when a study is resumed.
IDENTITY_KEYS = ("model", "task", "objectives", "space", "limit", "repeats", "dtype")


@dataclass
class StorageInfo:
    """An opened Optuna storage plus where its generation cache lives."""

    storage: Any  # str URL or optuna BaseStorage
    url: str  # what to give optuna-dashboard / `decodetune report`
    cache_path: Path
    #: what opening it created: a new database / journal file and the folders made for it (deepest first)
    created: tuple[Path, ...] = ()


def discard_unused(info: StorageInfo) -> None:
    """Remove the file storage and folders that opening ``info`` created, if no study has been stored in it
    yet (why: a run that fails before its first trial, e.g. on a bad --model, leaves nothing behind)."""
    if not info.created:
        return
    import optuna

    try:
        if optuna.get_all_study_summaries(info.storage, include_best_trial=False):
            return
    except Exception:  # noqa: BLE001 - unreadable: leave it as it is
        return
    dispose = getattr(getattr(info.storage, "engine", None), "dispose", None)
    if dispose is not None:
        dispose()  # SQLite: close the connections before the file goes
    files = [p for p in info.created if not p.is_dir()]
    for path in files:
        for extra in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            extra.unlink(missing_ok=True)
    _remove_created([p for p in info.created if p not in files])


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def resolve_storage(storage: str | None, out_dir: Path) -> StorageInfo:
    """Open ``storage`` (an Optuna URL, or a ``.journal``/``.log`` file path) or the default SQLite file.

    The generation cache sits next to a file storage, and in ``out_dir`` for a server storage. Missing
    folders are created (for ``--out``, a journal file and ``sqlite:///`` alike), but only kept if the
    storage opens: a storage that can't be opened is a :class:`UserError` naming the (password-redacted)
    URL, and leaves no empty folder behind.
    """
    import optuna

    out_dir = Path(out_dir)
    if storage is None:
        storage = f"sqlite:///{(out_dir / 'study.db').resolve()}"
    created: list[Path] = []
    try:
        return _open_storage(storage, out_dir, created)
    except BaseException as e:
        _remove_created(created)
        if isinstance(e, UserError) or not isinstance(e, Exception | optuna.exceptions.OptunaError):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"storage: cannot open {_redact(storage)!r}: {reason}") from None


def _open_storage(storage: str, out_dir: Path, created: list[Path]) -> StorageInfo:
    """The storage for a URL or journal path; folders it makes are appended to ``created``."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if "://" not in storage:
        path = Path(storage)
        if path.suffix not in (".journal", ".log", ".jsonl"):
            raise UserError(f"storage: {storage!r} is neither an Optuna storage URL (sqlite:///file.db, "
                            "postgresql://...) nor a journal file (*.journal, *.log)")
        created += _make_dirs(path.parent)
        new = [] if path.exists() else [path.resolve()]
        st = JournalStorage(JournalFileBackend(str(path)))
        return StorageInfo(st, str(path), path.with_name(path.stem + ".cache.sqlite"), (*new, *created))
    db = sqlite_file(storage)
    new: list[Path] = []
    if db is not None:
        created += _make_dirs(db.parent)  # one rule for missing folders: create them
        cache = db.with_name(db.stem + ".cache.sqlite")
        new = [] if db.exists() else [db.resolve()]
    else:
        cache = out_dir / "cache.sqlite"
    from decodetune.tuning.distributed import heartbeat_kwargs

    st = RDBStorage(storage, engine_kwargs=_engine_kwargs(storage), **heartbeat_kwargs(storage))
    created += _make_dirs(out_dir)  # only once the storage opened: a bad URL leaves no empty --out
    return StorageInfo(st, storage, cache, (*new, *created))


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other URLs and in-memory SQLite)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def check_storage_exists(storage: str) -> None:
    """For commands that only read a study (report, status): a missing file storage is an error.

    Opening a missing ``sqlite:///`` file would create an empty database, and then report "0 studies".
    """
    db = sqlite_file(storage) if "://" in storage else Path(storage)
    if db is not None and not db.exists():
        raise UserError(f"--storage: {db} does not exist")


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first."""
    folder = folder.resolve()
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{folder}: cannot create the folder, {blocker} is a file")
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_created(folders: list[Path]) -> None:
    """Remove folders this run created, if they are still empty (why: a failed open leaves nothing)."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:  # not empty (a file landed there) or already gone: leave it
            pass


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite:///") and "?" not in url:
        path = url[len("sqlite:///"):]

        def connect() -> Any:
            import sqlite3

            # WAL + synchronous=NORMAL: a commit no longer waits for fsync (7x faster per-item reports
            # here), and the database still survives a killed process; readers (report, dashboard) don't
            # block the writer. timeout: wait for a lock instead of failing at once.
            conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn

        return {"creator": connect}
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {}


def make_sampler(search: str, seed: int | None, space: SearchSpace, n_objectives: int,
                 n_trials: int, options: dict[str, Any] | None = None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for ``--search``; refuses combinations Optuna can't do, with a reason."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    options = dict(options or {})
    if search not in SEARCHES:
        raise UserError(f"--search: unknown search {search!r}; choose one of {', '.join(SEARCHES)}")
    n_startup = int(options.get("n_startup_trials", max(4, min(10, n_trials // 3))))
    if search in ("grid", "random"):
        return optuna.samplers.RandomSampler(seed=seed)
    if search == "tpe":
        # multivariate + group: the space is conditional (beam knobs only exist for beam trials)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True,
                                          group=True, constant_liar=True)
    if search == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup,
                                         warn_independent_sampling=False)
    if search == "cmaes":
        if n_objectives > 1:
            raise UserError("--search cmaes: CMA-ES optimises one objective; use nsga2 or tpe for several")
        if not space.is_numeric_only():
            cats = [p.name for p in space.searched if p.kind == "categorical"]
            raise UserError(f"--search cmaes: CMA-ES needs a numeric-only space, but {', '.join(cats)} "
                            f"{'is' if len(cats) == 1 else 'are'} categorical in {space.source}; fix them "
                            "(e.g. `strategy: sample`) or use tpe/gp")
        if not space.searched:
            raise UserError("--search cmaes: the space has no searched parameter")
        try:
            import cmaes  # noqa: F401 - Optuna imports it lazily, mid-study; fail before any generation
        except ImportError:
            raise UserError("--search cmaes: needs the 'cmaes' package (pip install cmaes)") from None
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=1, warn_independent_sampling=False)
    # nsga2
    population = int(options.get("population_size", max(4, min(50, n_trials // 3))))
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)


def make_pruner(enabled: bool) -> optuna.pruners.BasePruner:
    """WilcoxonPruner (per-item paired test against the best trial) or no pruning."""
    import optuna

    if not enabled:
        return optuna.pruners.NopPruner()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # the sequential test sees every chunk, so its real false-prune rate is above p_threshold
    return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=8)


def open_study(info: StorageInfo, name: str, directions: list[str], sampler: Any, pruner: Any,
               identity: dict[str, Any]) -> optuna.Study:
    """Create or load the study; check that a resumed study was made for the same job."""
    import optuna

    try:
        study = optuna.create_study(storage=info.storage, study_name=name, directions=directions,
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
    except ValueError as e:
        raise UserError(f"--study-name {name}: {str(e).splitlines()[0]}") from None
    existing = [d.name.lower()[:3] for d in study.directions]
    if existing != [d[:3] for d in directions]:
        raise UserError(f"--study-name {name}: the stored study optimises {len(existing)} objective(s) "
                        f"({', '.join(d.name.lower() for d in study.directions)}); this run asks for "
                        f"{', '.join(directions)}; use another --study-name")
    attrs = study.user_attrs
    for key in IDENTITY_KEYS:
        if key in attrs and key in identity and _comparable(key, attrs[key]) != _comparable(key, identity[key]):
            raise UserError(f"--study-name {name}: the stored study was created with a different {key} "
                            f"({_difference(_comparable(key, attrs[key]), _comparable(key, identity[key]))}); "
                            "use another --study-name")
    for key, value in identity.items():
        if key not in attrs:
            study.set_user_attr(key, value)
    return study


def _norm(v: Any) -> Any:
    import json

    return json.loads(json.dumps(v, sort_keys=True, default=str))


def _comparable(key: str, value: Any) -> Any:
    """What must match on resume. A space is its parameters by name; the file it came from may move."""
    value = _norm(value)
    if key == "space" and isinstance(value, dict) and isinstance(value.get("params"), list):
        return {p.get("name", str(i)): {k: v for k, v in p.items() if k != "name"}
                for i, p in enumerate(value["params"])}
    return value


def _difference(stored: Any, asked: Any) -> str:
    """Name what differs: for mappings, each differing key with both values; else both values."""
    stored, asked = _norm(stored), _norm(asked)
    if isinstance(stored, dict) and isinstance(asked, dict):
        keys = sorted(k for k in set(stored) | set(asked) if stored.get(k) != asked.get(k))
        return "; ".join(f"{k}: stored {_short(stored.get(k, '(absent)'))}, now {_short(asked.get(k, '(absent)'))}"
                         for k in keys)
    return f"stored {_short(stored)}, now {_short(asked)}"


def _short(v: Any, n: int = 60) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def default_study_name(model_name: str, task_name: str, search: str) -> str:
    """A stable name, so that re-running the same command continues the same study."""
    raw = f"{task_name}-{Path(model_name).name}-{search}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)
