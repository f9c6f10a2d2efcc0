"""Shared CLI options that choose the engine: ``--backend`` and how to reach it.

``@backend_options`` adds the flags to a command and passes one ``backend: BackendOptions`` argument, so
``--backend``, ``--base-url``, ``--api-key-env``, ``--served-model``, ``--concurrency``... mean the same
in every command. The API key is only ever read from the environment variable ``--api-key-env`` names.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import typer

PANEL = "Backend (the engine that generates)"

_FLAGS: list[tuple[str, Any, Any, str]] = [
    # (parameter, annotation, default, flag + help)
    ("backend", str, "torch", "--backend|torch | llamacpp | openai | vllm"),
    ("base_url", Optional[str], None, "--base-url|openai: server URL, e.g. http://127.0.0.1:8000/v1"),  # noqa: UP045
    ("api_key_env", Optional[str], None, "--api-key-env|openai: environment variable holding the API key"),  # noqa: UP045
    ("served_model", Optional[str], None, "--served-model|openai: model name the server knows (default --model)"),  # noqa: UP045
    ("endpoint", str, "auto", "--endpoint|openai: auto | chat | completions"),
    ("concurrency", int, 8, "--concurrency|openai: requests in flight"),
    ("request_timeout", float, 120.0, "--request-timeout|openai: seconds per request"),
    ("n_ctx", int, 2048, "--n-ctx|llamacpp / vllm: context tokens per sequence"),
    ("n_seq_max", int, 8, "--parallel|llamacpp: sequences decoded together"),
    ("dtype", Optional[str], None,  # noqa: UP045
     "--dtype|torch / vllm: weight precision fp32 | bf16 | int8 (torch only); default fp32 (vllm: auto)"),
]


def backend_options(func: Any) -> Any:
    """Decorator: add the backend flags; call ``func(..., backend=BackendOptions)``."""
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.name != "backend"]
    extra = []
    for name, annotation, default, spec in _FLAGS:
        flag, help_text = spec.split("|", 1)
        extra.append(inspect.Parameter(f"be_{name}", inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                       default=typer.Option(default, flag, help=help_text, rich_help_panel=PANEL)))

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(f"be_{name}") for name, *_ in _FLAGS}
        return func(*args, backend=make_options(values), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
    return wrapper


def make_options(values: dict[str, Any]) -> Any:
    """BackendOptions from the flag values (validated there, errors name the flag)."""
    from decodetune.backends import BackendOptions

    return BackendOptions(name=str(values["backend"]).lower(), base_url=values["base_url"],
                          api_key_env=values["api_key_env"], served_model=values["served_model"],
                          endpoint=values["endpoint"], concurrency=values["concurrency"],
                          timeout_s=values["request_timeout"], n_ctx=values["n_ctx"],
                          n_seq_max=values["n_seq_max"], dtype=values["dtype"])


def with_model_flags(opts: Any, *, raw: bool = False, trust_remote_code: bool = False,
                     threads: int | None = None) -> Any:
    """The options plus the model flags every command already has (``--raw``, ``--trust-remote-code``)."""
    import dataclasses

    return dataclasses.replace(opts, raw=raw, trust_remote_code=trust_remote_code,
                               n_threads=threads if threads else opts.n_threads)


def engine_for(model: str, opts: Any) -> Any:
    """What evaluate()/compare() get as ``model``: the name itself for the default torch engine (it loads
    after the task and configs are checked), else the opened backend."""
    if opts.name == "torch" and not (opts.raw or opts.trust_remote_code or opts.device or opts.dtype):
        return model
    from decodetune.backends import open_backend

    return open_backend(model, opts)
