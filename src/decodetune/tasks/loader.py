"""Load a task from a JSONL or CSV file.

Each row has ``prompt`` (text) or ``messages`` (a chat: list of ``{"role", "content"}``), optionally
``reference`` (one string), ``references`` (a list) or ``answer`` (a checkable answer, or a list of
acceptable answers: an item is right if it matches any), and optionally an ``id``. In CSV, ``messages``,
``references`` and list ``answer`` cells hold JSON (a list), and such a cell that is not a JSON list is one
value. The scoring recipe is inferred: rows with ``answer`` make a closed task
(numeric answers are extracted as the first number), rows with references a reference task, rows with
neither an open-ended one. Bad rows raise a :class:`UserError` naming ``file:line`` and the field.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from decodetune.errors import UserError
from decodetune.io import read_jsonl, read_text
from decodetune.metrics.answer import parse_number
from decodetune.tasks.base import Task, TaskItem

OPEN_METRICS = ["distinct-2", "rep-2", "self_bleu", "repetition", "length"]
REFERENCE_METRICS = ["chrf", "rougeL", "bleu", "length"]


def _as_text(value: Any, where: str, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        what = "a string or a list of strings" if field == "answer" else "a string"
        raise UserError(f"{where}: field {field!r} must be {what}, got {type(value).__name__}")
    return value if isinstance(value, str) else str(value)


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{where}: field 'messages' must be a JSON list of messages") from None
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: messages[{k}] must be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _references(row: dict[str, Any], where: str, csv_cells: bool) -> tuple[list[str], bool]:
    """(references, has_answer_field)."""
    refs: list[str] = []
    if row.get("references") not in (None, ""):
        value = row["references"]
        if csv_cells and isinstance(value, str):
            try:
                value = json.loads(value) if value.lstrip().startswith("[") else [value]
            except json.JSONDecodeError:
                raise UserError(f"{where}: field 'references' is not a valid JSON list") from None
        if not isinstance(value, list):
            raise UserError(f"{where}: field 'references' must be a list of strings")
        refs.extend(_as_text(v, where, "references") for v in value)
    if row.get("reference") not in (None, ""):
        refs.append(_as_text(row["reference"], where, "reference"))
    has_answer = row.get("answer") not in (None, "")
    if has_answer:
        refs.extend(_answers(row["answer"], where, csv_cells))
    return refs, has_answer


def _answers(value: Any, where: str, csv_cells: bool) -> list[str]:
    """One answer, or a list of acceptable answers (many data sets have several); scored against any."""
    if csv_cells and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{where}: field 'answer' is not a valid JSON list") from None
    if not isinstance(value, list):
        return [_as_text(value, where, "answer")]
    answers = [_as_text(v, where, "answer") for v in value]
    if not answers or not all(a.strip() for a in answers):
        raise UserError(f"{where}: field 'answer': a list of answers must be non-empty, without empty strings")
    return answers


def _item(row: dict[str, Any], where: str, index: int, csv_cells: bool) -> tuple[TaskItem, bool]:
    if row.get("messages") not in (None, ""):
        prompt: str | list[dict[str, str]] = _messages(row["messages"], where)
    elif row.get("prompt") not in (None, ""):
        prompt = _as_text(row["prompt"], where, "prompt")
    else:
        raise UserError(f"{where}: missing field 'prompt' (or 'messages')")
    refs, has_answer = _references(row, where, csv_cells)
    item_id = _as_text(row["id"], where, "id") if row.get("id") not in (None, "") else str(index)
    data = {k: v for k, v in row.items() if k != "_line"}
    return TaskItem(id=item_id, prompt=prompt, references=refs, data=data, source=where), has_answer


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    text = read_text(path)
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    try:
        for row in reader:
            if None in row:
                raise UserError(f"{path}:{reader.line_num}: more cells than header columns")
            if not any((v or "").strip() for v in row.values()):
                continue
            row = dict(row)
            row["_line"] = reader.line_num
            rows.append(row)
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def load_task_file(path: str | Path, name: str | None = None) -> Task:
    """Read a ``.jsonl`` or ``.csv`` task file into a :class:`Task` with one split, ``all``."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows, csv_cells = read_jsonl(p), False
    elif suffix in (".csv", ".tsv"):
        rows, csv_cells = _csv_rows(p), True
    else:
        raise UserError(f"{p}: unknown task file type {suffix!r}; expected .jsonl or .csv")
    if not rows:
        raise UserError(f"{p}: empty task (no rows)")
    items, answers, seen = [], [], {}
    for index, row in enumerate(rows):
        where = f"{p}:{row.get('_line', index + 1)}"
        item, has_answer = _item(row, where, index, csv_cells)
        if item.id in seen:
            raise UserError(f"{where}: duplicate id {item.id!r} (first at line {seen[item.id]})")
        seen[item.id] = row.get("_line", index + 1)
        items.append(item)
        answers.append(has_answer)
    if any(answers):
        numeric = all(parse_number(r) is not None and r.strip() == (r.strip().split() or [""])[0]
                      for it in items for r in it.references)
        if numeric:
            kind, extract, metrics = "closed", "first_number", ["numeric_match", "exact_match", "length"]
        else:
            kind, extract, metrics = "closed", "strip", ["exact_match", "contains", "token_f1", "length"]
        defaults: dict[str, Any] = {"max_new_tokens": 32}
    elif any(it.references for it in items):
        kind, extract, metrics = "reference", "strip", list(REFERENCE_METRICS)
        defaults = {"max_new_tokens": 64}
    else:
        kind, extract, metrics = "open", "none", list(OPEN_METRICS)
        defaults = {"max_new_tokens": 128}
    return Task(name=name or p.stem, kind=kind, metrics=metrics, splits={"all": items}, extract=extract,
                defaults=defaults, description=f"{len(items)} items from {p}", source=str(p))
