"""Training checkpoints: student weights (safetensors), optimizer state, step and loss history.

Layout: ``<dir>/step-000040/{student.safetensors, optimizer.pt, state.json}`` plus ``<dir>/latest``
naming the newest complete one. Each checkpoint is written into a temp folder and renamed, so a crash
never leaves a half checkpoint behind ``latest``. The optimizer state is a dict of tensors and numbers,
read back with ``torch.load(weights_only=True)`` (no arbitrary pickle). No RNG state is stored because
nothing in training draws from a global generator after the student is built: batch order and
on-policy samples are derived from (seed, step, position).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from decodetune.errors import UserError

KEEP = 2


def save_checkpoint(directory: str | Path, step: int, student: torch.nn.Module, optimizer: Any,
                    state: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; keeps the newest two."""
    from safetensors.torch import save_model

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".step-", suffix=".tmp", dir=root))
    try:
        # not a model folder (no config.json; only load_checkpoint reads it, through safetensors'
        # load_model, which re-ties what save_model de-duplicated): the model folder is save_student's
        save_model(student, str(tmp / "student.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from decodetune.io import atomic_write

    with atomic_write(root / "latest") as f:
        f.write(final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    root = Path(directory)
    marker = root / "latest"
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path, student: torch.nn.Module, optimizer: Any, fingerprint: dict[str, Any]) -> dict:
    """Restore weights and optimizer from ``path``; returns its state dict (step, history...).

    A checkpoint made with other training options (``fingerprint``) is a :class:`UserError`.
    """
    from safetensors.torch import load_model

    state = json.loads((path / "state.json").read_text())
    old = state.get("fingerprint", {})
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diff:
        raise UserError(f"{path}: checkpoint was made with different options ({', '.join(diff)}); "
                        "resume with the same options or use a new --checkpoint-dir")
    load_model(student, str(path / "student.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    return state
