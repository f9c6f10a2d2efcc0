"""Generation cache: (model, prompt token ids, generation-relevant config fields, seed) -> generations.

SQLite in WAL mode with a busy timeout, one connection per thread and per process, and ``INSERT OR
IGNORE`` writes, so several tuner workers (threads or processes) can share one file: readers never block
writers, concurrent writers wait instead of failing with "database is locked", and since a key fully
determines its generations, whichever worker stores a key first stores the same value as any other.

The key leaves out what cannot change the tokens: the seed of a deterministic config (greedy, beam, or
sampling at temperature 0), and the distribution-shaping sampler fields of a greedy config. Everything
else in :class:`~decodetune.config.DecodingConfig` is part of the key, as is the decodetune version (a
fixed engine bug must not serve stale rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from decodetune.config import DecodingConfig
from decodetune.errors import UserError

SCHEMA_VERSION = 1
#: Fields that only shape the sampling distribution: irrelevant to greedy decoding.
_SAMPLER_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                   "sampler_order")


def config_key_fields(config: DecodingConfig) -> dict[str, Any]:
    """The config fields that can change the generated tokens (seed handled separately)."""
    d = config.to_dict()
    d.pop("seed", None)
    if not config.is_candidate:  # (always at their defaults there) keys from before these fields stay valid
        for name in ("num_candidates", "mbr_utility", "rerank"):
            d.pop(name, None)
    if config.strategy == "greedy":
        for name in _SAMPLER_FIELDS:
            d.pop(name, None)
    return d


def cache_key(model_id: str, prompt_ids: Any, config: DecodingConfig, seed: int | None) -> str:
    """Hex SHA-256 of everything that determines the generations of one prompt row."""
    from decodetune import __version__

    payload = {
        "v": SCHEMA_VERSION,
        "decodetune": __version__,
        "model": model_id,
        "prompt": prompt_ids if isinstance(prompt_ids, str) else list(prompt_ids),
        "config": config_key_fields(config),
        "seed": seed if config.is_sampling else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def model_fingerprint(lm: Any) -> str:
    """``name`` plus a hash of the weights, memoised on the handle (two "custom" models must not collide).

    A precision other than fp32 is part of it (``name:bf16:hash``), so fp32 keys stay what they were. An int8
    model loaded by ``load_model`` carries the memo made from the fp32 weights it was quantised from (its
    packed int8 weights are no parameters to hash here)."""
    memo = getattr(lm, "extra", {}).get("fingerprint")
    if memo:
        return memo
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    dtype = getattr(lm, "dtype", "") or "fp32"
    fp = f"{lm.name}:{h.hexdigest()[:16]}" if dtype == "fp32" else f"{lm.name}:{dtype}:{h.hexdigest()[:16]}"
    if hasattr(lm, "extra"):
        lm.extra["fingerprint"] = fp
    return fp


class GenerationCache:
    """A SQLite-backed map from :func:`cache_key` to a list of generation dicts.

    ``hits`` and ``misses`` count lookups made through this object.
    """

    def __init__(self, path: str | Path, timeout_s: float = 120.0):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.hits = 0
        self.misses = 0
        self._local = threading.local()
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn()
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path}: cannot open generation cache ({e})") from None

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        # A connection must not cross a fork; each thread gets its own.
        conn = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                     "value TEXT NOT NULL, created REAL NOT NULL)")
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def get_many(self, keys: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """Stored values of the keys that are present (missing keys are absent from the result)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, list[dict[str, Any]]] = {}
        conn = self._conn()
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for key, value in conn.execute(f"SELECT key, value FROM generations WHERE key IN ({marks})", chunk):
                found[key] = json.loads(value)
        with self._lock:
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        return found

    def get(self, key: str) -> list[dict[str, Any]] | None:
        """The stored value of one key, or None."""
        return self.get_many([key]).get(key)

    def put_many(self, entries: dict[str, list[dict[str, Any]]], model: str = "") -> None:
        """Store values; keys already present keep their value (it is the same by construction)."""
        if not entries:
            return
        now = time.time()
        rows = [(k, model, json.dumps(v, ensure_ascii=False), now) for k, v in entries.items()]
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR IGNORE INTO generations (key, model, value, created) VALUES (?, ?, ?, ?)",
                             rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM generations").fetchone()[0])

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self) -> GenerationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for process pools: the connection is reopened in the child.
        return {"path": self.path, "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["timeout_s"])  # type: ignore[misc]


def open_cache(cache: str | Path | GenerationCache | None) -> GenerationCache | None:
    """A :class:`GenerationCache` from a path (or pass one through; None stays None)."""
    if cache is None or isinstance(cache, GenerationCache):
        return cache
    return GenerationCache(cache)
