"""Backends: the engines decodetune generates with, behind one protocol (:mod:`.base`).

``open_backend(model, BackendOptions(name=...))`` returns a :class:`Backend`:

* ``torch``: decodetune's own engine (every strategy and field);
* ``llamacpp``: llama.cpp in-process through llama-cpp-python (``pip install -e ".[llamacpp]"``);
* ``openai``: any OpenAI-compatible HTTP server (vLLM, llama.cpp server, Ollama, TGI, SGLang);
* ``vllm``: vLLM's offline ``LLM`` (GPU machines).

Evaluation, tuning, the sklearn estimator and the CLI only use the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from decodetune.backends.base import (
    Backend,
    Capabilities,
    Request,
    active,
    check_config,
    requests_of,
    unsupported,
)
from decodetune.errors import UserError

BACKENDS = ("torch", "llamacpp", "openai", "vllm")

__all__ = ["BACKENDS", "Backend", "BackendOptions", "Capabilities", "Request", "active", "as_backend",
           "check_config", "open_backend", "requests_of", "unsupported"]


@dataclass(frozen=True)
class BackendOptions:
    """How to reach an engine. Only the fields of the chosen backend are used.

    ``api_key_env`` names an environment variable: the key itself is never an option, so it cannot end
    up in a study, a report or a log. ``dtype`` is the weight precision (``fp32`` | ``bf16`` | ``int8``;
    None: the backend's default, fp32 for torch and vLLM's ``auto``); llama.cpp and servers take none,
    since the GGUF file or the server fixes the precision, and vLLM takes no int8.
    """

    name: str = "torch"
    raw: bool = False
    trust_remote_code: bool = False
    device: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    served_model: str | None = None
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 4
    endpoint: str = "auto"  # openai: auto | chat | completions
    n_ctx: int = 2048  # llamacpp: context per sequence slot
    n_threads: int | None = None
    n_seq_max: int = 8  # llamacpp: sequence slots decoded together per llama_decode
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise UserError(f"--backend: unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}")
        self._check_dtype()
        if self.concurrency < 1:
            raise UserError(f"--concurrency: must be >= 1, got {self.concurrency}")
        if self.n_ctx < 16:
            raise UserError(f"--n-ctx: must be >= 16, got {self.n_ctx}")
        if self.n_seq_max < 1:
            raise UserError(f"--parallel: must be >= 1, got {self.n_seq_max}")
        if self.timeout_s <= 0:
            raise UserError(f"--request-timeout: must be > 0, got {self.timeout_s}")
        if self.endpoint not in ("auto", "chat", "completions"):
            raise UserError(f"--endpoint: must be auto, chat or completions, got {self.endpoint!r}")
        if self.name == "openai" and not self.base_url:
            raise UserError("--base-url: the openai backend needs the server's URL (e.g. http://127.0.0.1:8000/v1)")
        if self.name != "openai" and self.base_url:
            raise UserError(f"--base-url: only the openai backend takes a URL (backend is {self.name!r})")

    def _check_dtype(self) -> None:
        if self.dtype is None:
            return
        from decodetune.models.precision import check_dtype

        object.__setattr__(self, "dtype", check_dtype(self.dtype, "--dtype"))  # frozen: normalise in place
        if self.name in ("llamacpp", "openai"):
            what = "the GGUF file" if self.name == "llamacpp" else "the server"
            raise UserError(f"--dtype: the {self.name} backend runs the precision {what} has; drop --dtype "
                            "(pick a GGUF quantisation or the server's --dtype instead)")
        if self.name == "vllm" and self.dtype == "int8":
            raise UserError("--dtype: the vllm backend takes fp32 or bf16 (int8 needs a quantised checkpoint "
                            "and vLLM's --quantization)")

    def to_dict(self) -> dict[str, Any]:
        """What a study records about the backend (no secrets: only the key's variable name)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def open_backend(model: Any, options: BackendOptions | None = None) -> Backend:
    """A backend for ``model`` (a spec ``load_model`` accepts, a .gguf path, or a served model name)."""
    opts = options or BackendOptions()
    if isinstance(model, Backend) and not isinstance(model, type):
        return model
    if opts.name == "torch":
        from decodetune.backends.torch_backend import TorchBackend
        from decodetune.models import load_model

        if isinstance(model, str):
            return TorchBackend(load_model(model, raw=opts.raw, trust_remote_code=opts.trust_remote_code,
                                           device=opts.device, dtype=opts.dtype))
        return TorchBackend(load_model(model, raw=opts.raw, dtype=opts.dtype))
    if opts.name == "llamacpp":
        from decodetune.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend.open(model, opts)
    if opts.name == "openai":
        from decodetune.backends.openai import OpenAIBackend

        return OpenAIBackend.open(model, opts)
    from decodetune.backends.vllm import VLLMBackend

    return VLLMBackend.open(model, opts)


def as_backend(model: Any) -> Backend:
    """``model`` itself if it is a backend, else the torch backend on it (the pre-backend API)."""
    if isinstance(model, Backend) and not isinstance(model, type):
        return model
    return open_backend(model, BackendOptions())
