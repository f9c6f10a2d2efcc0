"""The llamacpp backend: llama.cpp in-process through llama-cpp-python's low-level API.

* The model is a ``.gguf`` file, or a builtin name whose verified GGUF is used as is (no de-quantisation).
* Prompts go through the GGUF's own chat template (``tokenizer.chat_template``, rendered by
  llama-cpp-python's ``Jinja2ChatFormatter``, as its ``create_chat_completion`` does), unless ``raw``.
  Generation ends on any end-of-generation token of the vocabulary (``llama_vocab_is_eog``).
* Each sequence gets its own native sampler chain, built explicitly in the order llama.cpp's
  ``common_sampler_init`` uses for the flags that :func:`decodetune.export.to_llamacpp` writes
  (:mod:`.llamacpp_chain`): ``logit_bias``, ``penalties``, ``dry``, then the config's ``sampler_order``
  (temperature / temp_ext, top_k, top_p, min_p, typical, top-nσ, XTC), then ``dist(seed)``; greedy configs
  get ``logit_bias -> penalties -> dry -> greedy``, mirostat ``logit_bias -> temperature -> mirostat``. The
  prompt is accepted into the chain before sampling, as llama-cli and llama-server do, so penalties and DRY
  see prompt and output tokens over ``penalty_last_n`` / ``dry_penalty_last_n`` tokens (-1: the context).
* ``ignore_eos`` bans every end-of-generation token (llama.cpp's ``--ignore-eos``); a ``stop_token_ids``
  token ends the row as ``stop`` (kept in the ids, left out of the text, as in the torch engine).
* Several sequences are decoded per ``llama_decode``: ``n_seq_max`` sequence slots, each its own KV stream
  (``kv_unified = false``, so a row's numerics do not depend on its neighbours); a finished sequence frees
  its slot (``llama_memory_seq_rm``) and the next waiting row takes it (continuous batching). The n
  candidates of one prompt prefill once and copy the prompt's cells (``llama_memory_seq_cp``), and the
  chat template's head (system prompt and user-turn opener) is prefilled once per backend in one more
  sequence and copied into each row, as llama-server's prompt cache and ``Llama``'s prefix reuse do.
* Flash attention is off, llama-cpp-python's default, so tokens equal those of the bindings' own API.
* Seeds: sequence 0 of a prompt uses the row's seed itself (so ``--seed S`` reproduces it in llama.cpp);
  sequence j > 0 a seed derived from (seed, j).
"""

from __future__ import annotations

import ctypes
import hashlib
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from decodetune.backends.base import Capabilities, Request, sequence_seed
from decodetune.backends.capabilities import LLAMACPP
from decodetune.backends.llamacpp_chain import build_chain
from decodetune.config import DecodingConfig
from decodetune.decoding.types import Generation
from decodetune.errors import UserError

MISSING = 'the llamacpp backend needs llama-cpp-python: pip install -e ".[llamacpp]"'


def _import_llama() -> Any:
    try:
        import llama_cpp
        from llama_cpp import _logger
    except ImportError:
        raise UserError(MISSING) from None
    _logger.set_verbose(False)  # llama.cpp's own log goes through this logger: errors only
    return llama_cpp


@dataclass
class _Row:
    """One sequence being decoded in a KV-cache slot."""

    request_index: int
    sequence_index: int
    prompt: list[int]
    config: DecodingConfig
    seed: int
    chain: Any = None
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    text_bytes: bytearray = field(default_factory=bytearray)
    logprobs: list[float] = field(default_factory=list)
    started: float = 0.0
    prefill_s: float = 0.0
    n_past: int = 0
    skip: int = 0  # leading prompt tokens copied from the cached template head


class LlamaCppBackend:
    """llama.cpp in-process on one GGUF file. Open it with :meth:`open`."""

    name = "llamacpp"

    def __init__(self, path: Path, model_name: str, *, raw: bool = False, n_ctx: int = 2048,
                 n_seq_max: int = 8, n_threads: int | None = None, sha256: str | None = None):
        self._llama = _import_llama()
        from llama_cpp import _internals

        lc = self._llama
        lc.llama_backend_init()  # once per process; llama_decode segfaults without it
        self.path, self.model_name, self.raw = Path(path), model_name, raw
        self._sha256 = sha256
        mparams = lc.llama_model_default_params()
        try:
            self._model = _internals.LlamaModel(path_model=str(path), params=mparams, verbose=False)
        except (ValueError, OSError) as e:
            raise UserError(f"model {str(path)!r}: llama.cpp could not load it as a GGUF model ({e})") from None
        self.n_vocab = self._model.n_vocab()
        self.n_ctx = min(n_ctx, self._model.n_ctx_train() or n_ctx)
        self.n_seq_max = max(1, n_seq_max)
        self.holder = self.n_seq_max  # one more sequence keeps the chat template's head in the KV cache
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = self.n_ctx * (self.n_seq_max + 1)
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_seq_max = self.n_seq_max + 1
        cparams.kv_unified = False  # one stream per slot: a row's numerics do not depend on its neighbours
        threads = n_threads or _default_threads()
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        # llama-cpp-python's default (Llama(flash_attn=False)): the same numerics as the bindings' own API
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = _internals.LlamaContext(model=self._model, params=cparams, verbose=False)
        self._mem = lc.llama_get_memory(self._ctx.ctx)
        self._n_batch = int(cparams.n_batch)
        self._batch = lc.llama_batch_init(self._n_batch, 0, self.n_seq_max + 1)
        self.metadata = self._model.metadata()
        self._pieces: dict[int, bytes] = {}
        self._eog: tuple[int, ...] | None = None
        self._formatter = self._chat_formatter()
        self.head = self._template_head()
        self._head_cached = False

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, model: Any, opts: Any) -> LlamaCppBackend:
        """A builtin name (its GGUF from the wheel) or a ``.gguf`` path."""
        from decodetune.models.builtin import BUILTIN_MODELS, ensure_builtin_gguf

        _import_llama()
        if isinstance(model, str) and model in BUILTIN_MODELS:
            path = ensure_builtin_gguf(model)
            return cls(path, model, raw=opts.raw, n_ctx=opts.n_ctx, n_seq_max=opts.n_seq_max,
                       n_threads=opts.n_threads, sha256=BUILTIN_MODELS[model].gguf_sha256)
        p = Path(str(model)).expanduser()
        if not isinstance(model, str | Path) or p.suffix != ".gguf":
            raise UserError(f"--model: the llamacpp backend takes a .gguf file or a builtin name, got {model!r}")
        if not p.is_file():
            raise UserError(f"--model: {str(p)!r} does not exist")
        return cls(p, str(p.resolve()), raw=opts.raw, n_ctx=opts.n_ctx, n_seq_max=opts.n_seq_max,
                   n_threads=opts.n_threads)

    def _chat_formatter(self) -> Any:
        template = self.metadata.get("tokenizer.chat_template")
        if self.raw or not template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def text(tok: int) -> str:
            return self._model.token_get_text(tok) if tok != -1 else ""

        return Jinja2ChatFormatter(template, eos_token=text(self._model.token_eos()),
                                   bos_token=text(self._model.token_bos()), add_generation_prompt=True)

    def _template_head(self) -> list[int]:
        """The token ids every chat prompt starts with (system prompt, user turn opener): prefilled once.

        Found as the common prefix of two renderings that differ only in the user's text, so a prompt's
        split into head and rest depends on that prompt alone, never on the rest of the batch.
        """
        if self._formatter is None:
            return []
        a, b = self.render("a"), self.render("b")
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return a[:n] if n >= 4 else []

    def _cache_head(self) -> None:
        if self._head_cached or not self.head:
            return
        lc, batch = self._llama, self._batch
        for pos, tok in enumerate(self.head):
            _Scheduler._put(batch, pos, tok, pos, self.holder, pos == len(self.head) - 1)
        batch.n_tokens = len(self.head)
        if lc.llama_decode(self._ctx.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the chat template's head")
        self._head_cached = True

    def head_length(self, prompt: list[int]) -> int:
        """How many leading tokens of ``prompt`` the cached head covers (0 if it does not start with it)."""
        n = len(self.head)
        return n if n and len(prompt) > n and prompt[:n] == self.head else 0

    # ------------------------------------------------------------------ protocol
    def identity(self) -> str:
        """llama-cpp-python version + the GGUF's sha256 (pinned for builtins, hashed once otherwise)."""
        if self._sha256 is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._sha256 = h.hexdigest()
        return f"llamacpp:{self._llama.__version__}:{self._sha256[:16]}:{'raw' if self.raw else 'chat'}"

    def capabilities(self) -> Capabilities:
        """greedy and sample, the samplers the chain maps (see the module docstring)."""
        return LLAMACPP

    def render(self, prompt: Any) -> list[int]:
        """Token ids the context sees: the chat template applied (unless raw), special tokens parsed."""
        if self._formatter is not None:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
            result = self._formatter(messages=messages)
            return list(self._model.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special,
                                             special=True))
        text = "\n".join(m.get("content", "") for m in prompt) if isinstance(prompt, list) else str(prompt)
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=self._model.add_bos_token(),
                                         special=True))

    def default_config(self) -> DecodingConfig | None:
        """``general.sampling.*`` GGUF metadata (llama.cpp's own defaults for the model), if present."""
        keys = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p"}
        found = {field_: float(self.metadata[k]) for k, field_ in keys.items() if k in self.metadata}
        if not found:
            return None
        if "top_k" in found:
            found["top_k"] = int(found["top_k"])
        try:
            return DecodingConfig.from_dict({"strategy": "sample", **found}, source="GGUF metadata")
        except UserError:
            return None

    def close(self) -> None:
        """Free the batch, context and model."""
        if getattr(self, "_batch", None) is not None:
            self._llama.llama_batch_free(self._batch)
            self._batch = None
        for obj in ("_ctx", "_model"):
            if getattr(self, obj, None) is not None:
                getattr(self, obj).close()
                setattr(self, obj, None)

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[Request], *, logprobs: bool = False, batch_size: int | None = None,
                 progress: bool = False) -> list[Generation]:
        """Decode all requests with continuous batching over ``n_seq_max`` slots."""
        rows: list[_Row] = []
        used_seeds: list[int] = []
        for i, req in enumerate(requests):
            ids = self.render(req.prompt)
            n_new = req.config.max_new_tokens
            if len(ids) + n_new > self.n_ctx:
                raise UserError(f"prompt #{i}: {len(ids)} prompt tokens + max_new_tokens {n_new} exceed the "
                                f"llamacpp context of {self.n_ctx} tokens (--n-ctx)")
            seed = req.seed if req.seed is not None else (req.config.seed if req.config.seed is not None
                                                          else secrets.randbelow(2**31))
            used_seeds.append(seed)
            self._check_tokens(req.config, i)
            for j in range(req.config.num_return_sequences):
                rows.append(_Row(i, j, ids, req.config, seed))
        width = min(self.n_seq_max, batch_size or self.n_seq_max)
        self._cache_head()
        done = _Scheduler(self, rows, width, logprobs, progress).run()
        out = [self._generation(r, reason, used_seeds[r.request_index], logprobs) for r, reason in done]
        return sorted(out, key=lambda g: (g.prompt_index, g.sequence_index))

    def _generation(self, row: _Row, reason: str, seed: int, logprobs: bool) -> Generation:
        text = row.text_bytes.decode("utf-8", errors="replace")
        if reason == "stop":
            text = _cut_at_stop(text, row.config.stop)
        now = time.perf_counter()
        return Generation(text=text, token_ids=list(row.tokens), logprobs=list(row.logprobs) if logprobs else None,
                          finish_reason=reason, timings={"prefill_s": row.prefill_s,
                                                         "decode_s": now - row.started - row.prefill_s,
                                                         "total_s": now - row.started},
                          prompt_index=row.request_index, sequence_index=row.sequence_index,
                          num_prompt_tokens=len(row.prompt), score=float(sum(row.logprobs)), seed=seed)

    def eog_tokens(self) -> tuple[int, ...]:
        """The vocabulary's end-of-generation token ids (what ``--ignore-eos`` bans), found once."""
        if self._eog is None:
            vocab = self._model.vocab
            self._eog = tuple(t for t in range(self.n_vocab) if self._llama.llama_vocab_is_eog(vocab, t))
        return self._eog

    def _check_tokens(self, cfg: DecodingConfig, index: int) -> None:
        """Token ids of ``logit_bias`` / ``stop_token_ids`` must be in the vocabulary (llama.cpp would skip them)."""
        for name, ids in (("logit_bias", cfg.logit_bias), ("stop_token_ids", cfg.stop_token_ids)):
            bad = [t for t in ids if t >= self.n_vocab]
            if bad:
                raise UserError(f"prompt #{index}: {name}: token {bad[0]} is not in the model's vocabulary "
                                f"({self.n_vocab} tokens)")

    def piece(self, token: int) -> bytes:
        """The bytes of one token's text (special tokens render as nothing, as in the decoded text)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = self._llama.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, False)
            if n < 0:  # a longer piece: -n is the size it needs
                buf = ctypes.create_string_buffer(-n)
                n = self._llama.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, False)
            cached = self._pieces[token] = buf.raw[:max(n, 0)]
        return cached

    def __repr__(self) -> str:
        return f"LlamaCppBackend({str(self.path)!r}, n_seq_max={self.n_seq_max})"


def _default_threads() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


class _Scheduler:
    """Continuous batching: admit waiting rows into free slots, one ``llama_decode`` per step."""

    def __init__(self, backend: LlamaCppBackend, rows: list[_Row], width: int, logprobs: bool, progress: bool):
        self.b, self.lc = backend, backend._llama
        self.waiting = deque(rows)
        self.free = list(range(width))[::-1]
        self.running: list[_Row] = []
        self.done: list[tuple[_Row, str]] = []
        self.logprobs = logprobs
        self.total = len(rows)
        self.progress = _progress(progress, self.total)
        self.shared: dict[tuple[int, int], int] = {}  # (request, first slot) of a prompt being prefilled

    def run(self) -> list[tuple[_Row, str]]:
        """Decode until every row is finished; returns (row, finish reason) pairs."""
        try:
            while self.waiting or self.running:
                self._step()
        finally:
            for row in self.running:
                self._release(row)
            self.progress.close()
        return self.done

    def _admit(self) -> list[tuple[_Row, bool]]:
        """Rows to prefill this step; True where the row copies the previous row's prompt cells."""
        admitted: list[tuple[_Row, bool]] = []
        budget = self.b._n_batch - len(self.running)
        prev: _Row | None = None
        while self.waiting and self.free:
            row = self.waiting[0]
            same = (prev is not None and prev.request_index == row.request_index)
            row.skip = self.b.head_length(row.prompt)
            cost = 0 if same else len(row.prompt) - row.skip
            if cost > budget and admitted:
                break
            if cost > self.b._n_batch:
                raise UserError(f"prompt #{row.request_index}: {len(row.prompt)} tokens exceed llama.cpp's "
                                f"batch of {self.b._n_batch}")
            self.waiting.popleft()
            row.slot = self.free.pop()
            row.chain = build_chain(self.lc, row.config, sequence_seed(row.seed, row.sequence_index),
                                    self.b.n_vocab, self.b.n_ctx, self.b._model.vocab, self.b.eog_tokens())
            for tok in row.prompt:  # penalties see the prompt, as in llama-cli / llama-server
                self.lc.llama_sampler_accept(row.chain, tok)
            row.started = time.perf_counter()
            admitted.append((row, same))
            budget -= cost
            prev = row
        return admitted

    def _step(self) -> None:
        admitted = self._admit()
        batch = self.b._batch
        n = 0
        out_index: dict[int, int] = {}  # id(row) -> batch position of its logits
        owner: _Row | None = None
        for row, same in admitted:
            if same and owner is not None:
                continue  # filled after the decode by copying the owner's cells
            owner = row
            if row.skip:  # the template head's cells, computed once per backend
                self.lc.llama_memory_seq_cp(self.b._mem, self.b.holder, row.slot, -1, -1)
            for pos in range(row.skip, len(row.prompt)):
                self._put(batch, n, row.prompt[pos], pos, row.slot, pos == len(row.prompt) - 1)
                n += 1
            out_index[id(row)] = n - 1
            row.n_past = len(row.prompt)
        for row in self.running:
            self._put(batch, n, row.tokens[-1], row.n_past, row.slot, True)
            out_index[id(row)] = n
            row.n_past += 1
            n += 1
        batch.n_tokens = n
        t0 = time.perf_counter()
        rc = self.lc.llama_decode(self.b._ctx.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} ({n} tokens, {len(self.running)} running)")
        elapsed = time.perf_counter() - t0
        owner = None
        for row, same in admitted:  # candidates of one prompt: copy the prompt cells, share the logits
            if same and owner is not None:
                self.lc.llama_memory_seq_cp(self.b._mem, owner.slot, row.slot, -1, -1)
                out_index[id(row)] = out_index[id(owner)]
                row.n_past = len(row.prompt)
            else:
                owner = row
            row.prefill_s = elapsed
        for row, _ in admitted:
            self.running.append(row)
        still: list[_Row] = []
        for row in self.running:
            reason = self._sample(row, out_index[id(row)])
            if reason:
                self.done.append((row, reason))
                self._release(row)
                self.progress.update(1)
            else:
                still.append(row)
        self.running = still

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _sample(self, row: _Row, idx: int) -> str:
        """Draw the row's next token; returns its finish reason or ''."""
        lc, b = self.lc, self.b
        tok = int(lc.llama_sampler_sample(row.chain, b._ctx.ctx, idx))
        if self.logprobs:
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(b._ctx.ctx, idx), shape=(b.n_vocab,))
            m = float(logits.max())
            row.logprobs.append(float(logits[tok]) - m - float(np.log(np.exp(logits - m).sum())))
        row.tokens.append(tok)
        if lc.llama_vocab_is_eog(b._model.vocab, tok):
            return "eos"
        if tok in row.config.stop_token_ids:
            return "stop"
        row.text_bytes += b.piece(tok)
        stops = row.config.stop
        if stops:
            tail = row.text_bytes[-(max(len(s.encode()) for s in stops) + 64):].decode("utf-8", errors="ignore")
            if any(s in tail for s in stops):
                return "stop"
        if len(row.tokens) >= row.config.max_new_tokens:
            return "length"
        return ""

    def _release(self, row: _Row) -> None:
        self.lc.llama_memory_seq_rm(self.b._mem, row.slot, -1, -1)
        if row.chain is not None:
            self.lc.llama_sampler_free(row.chain)
            row.chain = None
        self.free.append(row.slot)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, total: int) -> Any:
    if not enabled or total < 2:
        return _NoProgress()
    from decodetune.backends.progress import RowProgress

    return RowProgress(total, "llamacpp")

