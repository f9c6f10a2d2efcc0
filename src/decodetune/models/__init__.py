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
from decodetune.models.precision import DEFAULT_DTYPE, DTYPES, check_dtype, convert, dtype_of, torch_load_dtype

__all__ = ["LoadedModel", "Prompt", "load_model", "BUILTIN_MODELS", "is_cached", "model_dir", "DEFAULT_MODEL",
           "DTYPES"]

DEFAULT_MODEL = "smollm2-135m"

_LOADED: dict[tuple[Any, ...], LoadedModel] = {}
_LOCK = threading.Lock()


def load_model(spec: Any = DEFAULT_MODEL, *, trust_remote_code: bool = False, raw: bool = False,
               device: str | None = None, reuse: bool = True, dtype: str | None = None) -> LoadedModel:
    """Resolve ``spec`` to a :class:`LoadedModel`.

    ``spec`` is a builtin name (``smollm2-135m``), a local Hugging Face model folder, a ``.gguf`` file, a hub
    id (needs network or a local hub cache), a ``(model, tokenizer)`` pair, or a LoadedModel. Instruct models
    use their chat template unless ``raw``. ``trust_remote_code`` stays off unless asked for.
    ``dtype`` is the weight precision, ``fp32`` | ``bf16`` | ``int8`` (see :mod:`decodetune.models.precision`):
    None loads names and paths in fp32 and leaves an in-memory model as it is; a dtype other than an
    in-memory model's own converts a copy (the caller's model is never changed).
    A spec that cannot be resolved raises :class:`UserError` naming what was tried.
    """
    dtype = None if dtype is None else check_dtype(dtype)
    if isinstance(spec, LoadedModel):
        if dtype not in (None, spec.dtype):
            return _converted(spec.model, spec.tokenizer, spec.name, spec.chat and not raw, spec.source, dtype)
        if raw and spec.chat:
            return LoadedModel(spec.model, spec.tokenizer, name=spec.name, chat=False, source=spec.source,
                               dtype=spec.dtype)
        return spec
    if isinstance(spec, tuple | list) and len(spec) == 2 and not isinstance(spec[0], str):
        model, tok = spec
        chat = _has_chat(tok) and not raw
        if dtype not in (None, dtype_of(model)):
            return _converted(model, tok, _fingerprint(model), chat, "in-memory", dtype)
        return LoadedModel(model, tok, name=_fingerprint(model), chat=chat, source="in-memory")
    if isinstance(spec, os.PathLike):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"model: expected a name, path, hub id or (model, tokenizer) pair, got {spec!r}")
    dtype = dtype or DEFAULT_DTYPE
    key = (spec, trust_remote_code, raw, device, dtype)
    with _LOCK:
        if reuse and key in _LOADED:
            return _LOADED[key]
        loaded = _load_str(spec, trust_remote_code=trust_remote_code, raw=raw, device=device, dtype=dtype)
        if reuse:
            _LOADED[key] = loaded
        return loaded


def _converted(model: Any, tok: Any, name: str, chat: bool, source: str, dtype: str) -> LoadedModel:
    """A copy of an in-memory model in ``dtype`` (float32 first: int8 quantises float weights)."""
    import copy

    import torch

    twin = copy.deepcopy(model)
    if dtype_of(twin) == "int8":
        raise UserError(f"dtype: cannot convert an int8 model to {dtype}; load the original weights instead")
    twin.to(torch.float32)
    return _finish(twin, tok, name=name, chat=chat, source=source, dtype=dtype)


def _finish(model: Any, tok: Any, *, name: str, chat: bool, source: str, dtype: str) -> LoadedModel:
    """The LoadedModel in ``dtype``. An int8 one carries the fingerprint of the fp32 weights it is quantised
    from: quantisation is deterministic, and its packed weights are no parameters the cache could hash."""
    extra: dict[str, Any] = {}
    if dtype == "int8":
        from decodetune.cache import model_fingerprint

        name_part, digest = model_fingerprint(LoadedModel(model, tok, name=name, dtype="fp32")).rsplit(":", 1)
        extra["fingerprint"] = f"{name_part}:int8:{digest}"
    return LoadedModel(convert(model, dtype), tok, name=name, chat=chat, source=source, extra=extra, dtype=dtype)


def _load_str(spec: str, *, trust_remote_code: bool, raw: bool, device: str | None,
              dtype: str = DEFAULT_DTYPE) -> LoadedModel:
    tried: list[str] = []
    if spec in BUILTIN_MODELS:
        path = ensure_builtin(spec)
        return _from_dir(path, name=spec, raw=raw, device=device, trust_remote_code=False, source=str(path),
                         dtype=dtype)
    tried.append(f"not a builtin ({', '.join(BUILTIN_MODELS)})")
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return _from_gguf(p, raw=raw, device=device, dtype=dtype)
    if p.is_dir():
        if (p / "config.json").exists():
            return _from_dir(p, name=str(p.resolve()), raw=raw, device=device,
                             trust_remote_code=trust_remote_code, source=str(p.resolve()), dtype=dtype)
        raise UserError(f"model {spec!r}: folder has no config.json (not a Hugging Face model folder)")
    if p.exists():
        raise UserError(f"model {spec!r}: file is not a .gguf model or a model folder")
    tried.append("not a local path")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        kw = dict(name=spec, raw=raw, device=device, trust_remote_code=trust_remote_code, source=f"hub:{spec}",
                  dtype=dtype)
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
              source: str, local_files_only: bool = False, dtype: str = DEFAULT_DTYPE) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kw = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    tok = AutoTokenizer.from_pretrained(str(path), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_load_dtype(dtype), **kw)
    _patch_hook(model, path)
    model.to(_device(device))
    return _finish(model, tok, name=name, chat=_has_chat(tok) and not raw, source=source, dtype=dtype)


def _from_gguf(path: Path, *, raw: bool, device: str | None, dtype: str = DEFAULT_DTYPE) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch_load_dtype(dtype))
    except (ValueError, KeyError, OSError, EOFError) as e:
        # the GGUF reader raises these for files that are not GGUF (bad magic, empty, truncated) or that
        # hold an architecture transformers can't load: bad input, so one line naming the file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"model {str(path)!r}: not a loadable GGUF file ({reason})") from None
    model.to(_device(device))
    return _finish(model, tok, name=str(path.resolve()), chat=_has_chat(tok) and not raw, source=str(path),
                   dtype=dtype)


def _patch_hook(model: Any, path: str | Path) -> None:
    """Let students saved by ``decodetune distill`` with a non-RMSNorm normalisation load correctly."""
    if getattr(model.config, "decodetune_norm", None) in (None, "rmsnorm"):
        return
    from decodetune.models.norms import maybe_patch_norm  # only such students need it

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
