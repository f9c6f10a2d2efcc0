"""Model loading: builtin names, local HF folders, GGUF files, hub ids and in-memory pairs.

``load_model(spec)`` returns a :class:`LoadedModel`. String specs are memoised per process, so the
tuner, the sklearn estimator and repeated API calls share one copy of the weights.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from decodetune.errors import UserError
from decodetune.models.builtin import BUILTIN_MODELS, ensure_builtin, is_cached, model_dir
from decodetune.models.handle import LoadedModel, Prompt

__all__ = ["LoadedModel", "Prompt", "load_model", "BUILTIN_MODELS", "is_cached", "model_dir", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2-135m"

_LOADED: dict[tuple[Any, ...], LoadedModel] = {}
_LOCK = threading.Lock()


def load_model(spec: Any = DEFAULT_MODEL, *, trust_remote_code: bool = False, raw: bool = False,
               device: str | None = None, reuse: bool = True) -> LoadedModel:
    """Resolve ``spec`` to a :class:`LoadedModel`.

    ``spec`` is a builtin name (``smollm2-135m``), a local Hugging Face model folder, a ``.gguf`` file, a hub
    id (needs network or a local hub cache), a ``(model, tokenizer)`` pair, or a LoadedModel. Instruct models
    use their chat template unless ``raw``. ``trust_remote_code`` stays off unless asked for.
    A spec that cannot be resolved raises :class:`UserError` naming what was tried.
    """
    if isinstance(spec, LoadedModel):
        if raw and spec.chat:
            return LoadedModel(spec.model, spec.tokenizer, name=spec.name, chat=False, source=spec.source)
        return spec
    if isinstance(spec, tuple | list) and len(spec) == 2 and not isinstance(spec[0], str):
        model, tok = spec
        return LoadedModel(model, tok, name=_fingerprint(model), chat=_has_chat(tok) and not raw,
                           source="in-memory")
    if isinstance(spec, os.PathLike):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"model: expected a name, path, hub id or (model, tokenizer) pair, got {spec!r}")
    key = (spec, trust_remote_code, raw, device)
    with _LOCK:
        if reuse and key in _LOADED:
            return _LOADED[key]
        loaded = _load_str(spec, trust_remote_code=trust_remote_code, raw=raw, device=device)
        if reuse:
            _LOADED[key] = loaded
        return loaded


def _load_str(spec: str, *, trust_remote_code: bool, raw: bool, device: str | None) -> LoadedModel:
    tried: list[str] = []
    if spec in BUILTIN_MODELS:
        path = ensure_builtin(spec)
        return _from_dir(path, name=spec, raw=raw, device=device, trust_remote_code=False, source=str(path))
    tried.append(f"not a builtin ({', '.join(BUILTIN_MODELS)})")
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return _from_gguf(p, raw=raw, device=device)
    if p.is_dir():
        if (p / "config.json").exists():
            return _from_dir(p, name=str(p.resolve()), raw=raw, device=device,
                             trust_remote_code=trust_remote_code, source=str(p.resolve()))
        raise UserError(f"model {spec!r}: folder has no config.json (not a Hugging Face model folder)")
    if p.exists():
        raise UserError(f"model {spec!r}: file is not a .gguf model or a model folder")
    tried.append("not a local path")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        kw = dict(name=spec, raw=raw, device=device, trust_remote_code=trust_remote_code, source=f"hub:{spec}")
        try:  # the local hub cache first: no network, no retries
            return _from_dir(spec, local_files_only=True, **kw)
        except Exception:
            tried.append("not in the local hub cache")
        if not _hub_reachable():
            tried.append("the hub is unreachable")
        else:
            try:
                return _from_dir(spec, **kw)
            except Exception as e:  # hub errors come in many types; report one line
                reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                tried.append(f"hub id could not be loaded ({reason})")
    else:
        tried.append("not a hub id (owner/name)")
    raise UserError(f"model {spec!r} could not be resolved: " + "; ".join(tried))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of huggingface_hub's retries (about 45 s when offline)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _from_dir(path: str | Path, *, name: str, raw: bool, device: str | None, trust_remote_code: bool,
              source: str, local_files_only: bool = False) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kw = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    tok = AutoTokenizer.from_pretrained(str(path), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)
    _patch_hook(model, path)
    model.to(_device(device))
    return LoadedModel(model, tok, name=name, chat=_has_chat(tok) and not raw, source=source)


def _from_gguf(path: Path, *, raw: bool, device: str | None) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, EOFError) as e:
        # the GGUF reader raises these for files that are not GGUF (bad magic, empty, truncated) or that
        # hold an architecture transformers can't load: bad input, so one line naming the file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"model {str(path)!r}: not a loadable GGUF file ({reason})") from None
    model.to(_device(device))
    return LoadedModel(model, tok, name=str(path.resolve()), chat=_has_chat(tok) and not raw, source=str(path))


def _patch_hook(model: Any, path: str | Path) -> None:
    """Let students saved by ``decodetune distill`` with a non-RMSNorm normalisation load correctly."""
    if getattr(model.config, "decodetune_norm", None) in (None, "rmsnorm"):
        return
    from decodetune.train.distill.student import maybe_patch_norm  # optional, only for such students

    maybe_patch_norm(model, path)


def _has_chat(tok: Any) -> bool:
    return bool(getattr(tok, "chat_template", None))


def _fingerprint(model: Any) -> str:
    """A stable identity for an in-memory model: its config plus a sample of its weights."""
    h = hashlib.sha256(model.config.to_json_string().encode())
    for i, param in enumerate(model.parameters()):
        h.update(param.detach().flatten()[:256].cpu().numpy().tobytes())
        if i >= 3:
            break
    return f"mem:{getattr(model.config, 'model_type', 'model')}:{h.hexdigest()[:16]}"
