"""Small file helpers shared by every command: strict JSONL reading and atomic writes.

Bad input must name the file and line, and output files must never be left half-written,
so every writer goes through :func:`atomic_write` (temp file in the same folder, then rename).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from decodetune.errors import UserError


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file; a missing or non-UTF-8 file is a :class:`UserError` naming it."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{p}: is a directory, expected a file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{p}:{line}: not valid UTF-8 (byte offset {e.start})") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file of objects. Blank lines are skipped; a bad line names its number."""
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        obj.setdefault("_line", lineno)
        rows.append(obj)
    return rows


def _file_ancestor(p: Path) -> Path | None:
    """The nearest existing ancestor of ``p`` if it is not a folder (so ``p`` can't be created)."""
    for parent in p.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_path(path: str | Path | None, flag: str) -> None:
    """Refuse an output file path that can't be written, before any work is done.

    An existing folder, or a path under an existing regular file, is a :class:`UserError` naming ``flag``;
    missing parent folders are fine (:func:`atomic_write` creates them). ``None`` means no output.
    """
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p}: is a directory, expected a file path")
    blocker = _file_ancestor(p)
    if blocker is not None:
        raise UserError(f"{flag} {p}: {blocker} is a file, not a folder")


def check_output_dir(path: str | Path | None, flag: str) -> None:
    """Refuse an output folder path that is an existing regular file (or lies under one), before any work."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p}: is a file, expected a folder")
    blocker = _file_ancestor(p)
    if blocker is not None:
        raise UserError(f"{flag} {p}: {blocker} is a file, not a folder")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[TextIO]:
    """Open a temp file next to ``path``; rename it over ``path`` only if the block succeeds."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str | Path, obj: Any) -> None:
    """Write one JSON document atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
