"""The vllm backend: vLLM's offline ``LLM`` engine with ``SamplingParams``, for GPU machines.

* **Model**: an HF folder, a hub id (vLLM downloads it) or a builtin name (its HF folder from
  :func:`decodetune.models.builtin.ensure_builtin`). ``LLM(model, dtype, seed=0, max_model_len=n_ctx,
  trust_remote_code)``; dtype ``auto`` lets vLLM choose (it runs fp32 checkpoints in fp16/bf16), and the
  dtype it resolved is part of :meth:`VLLMBackend.identity`, because precision changes what is generated.
* **Prompts** are rendered here, exactly as the torch engine renders them (the tokenizer's chat template
  with the generation prompt, unless ``raw``), and sent as token ids, so both engines see the same ids.
* **Configs** map through :func:`decodetune.export.to_vllm` (strict: ``check_config`` has already refused
  what vLLM cannot do). Penalties, then temperature, min_p, top_k, top_p: vLLM's fixed order
  (:data:`~decodetune.backends.capabilities.VLLM_ORDER`).
* **Seeds**: each prompt's ``SamplingParams.seed`` is the row seed. Its ``num_return_sequences``
  candidates are vLLM's own ``n`` with that one seed (vLLM seeds child j with ``seed + j``), so
  ``SamplingParams(n=N, seed=S)`` in vLLM reproduces them. Greedy rows carry no seed. vLLM refuses ``n > 1``
  at temperature 0, so such a row asks for one sequence and repeats it (greedy candidates are identical).
* **One ``llm.generate`` call** per batch with one ``SamplingParams`` per prompt: vLLM's scheduler does
  the batching (``batch_size`` is not used).
* **finish_reason**: vLLM's ``length`` is ``length``; its ``stop`` is ``stop`` when ``stop_reason`` is a
  stop string and ``eos`` otherwise (None: the EOS token; an int: a stop token id). Text is cut before the
  stop string and keeps no special tokens, as in :class:`~decodetune.decoding.types.Generation`.
* **Logprobs** (``logprobs=1``) are vLLM's default raw logprobs of the sampled tokens (before penalties
  and temperature), the torch engine's definition.
* **Timings** come from ``RequestOutput.metrics`` when vLLM fills it (it does not when stats logging is
  off, the offline default); then ``total_s`` is the wall time of the whole ``generate`` call.

The functions above :class:`VLLMBackend` need no vLLM, so they are tested on machines without a GPU.
"""

from __future__ import annotations

import gc
import hashlib
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from decodetune.backends.base import Capabilities, Request
from decodetune.backends.capabilities import VLLM
from decodetune.config import DecodingConfig
from decodetune.decoding.types import Generation
from decodetune.errors import UserError

MISSING = 'the vllm backend needs vLLM, on a GPU machine: pip install vllm (or pip install -e ".[vllm]")'
#: files whose bytes say which weights, tokenizer and defaults a folder holds
_META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_EDGE = 1 << 20  # bytes read from each end of a weight file


def import_vllm() -> Any:
    """The ``vllm`` module, or one-line :class:`UserError` saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise UserError(MISSING) from None
    return vllm


def row_seed(req: Request) -> int:
    """The seed a row is decoded with: the request's, else the config's, else a fresh one (recorded)."""
    seed = req.seed if req.seed is not None else req.config.seed
    return seed if seed is not None else secrets.randbits(31)


def sampling_kwargs(cfg: DecodingConfig, seed: int, logprobs: bool = False) -> tuple[dict[str, Any], int]:
    """``(SamplingParams kwargs, copies)`` for one row; ``copies`` > 1 repeats a greedy row's one output."""
    kw = cfg.to_vllm(strict=True)
    kw.pop("seed", None)  # the row seed replaces the config's (which is the row seed when set)
    copies = 1
    if cfg.is_sampling:
        kw["seed"] = int(seed)
    else:
        copies, kw["n"] = int(kw.get("n", 1)), 1  # vLLM refuses n > 1 at temperature 0
    if logprobs:
        kw["logprobs"] = 1  # the sampled token's logprob is always among them
    return kw, copies


def finish_reason(vllm_reason: str | None, stop_reason: int | str | None, stop_token_ids: Sequence[int] = ()) -> str:
    """decodetune's finish reason (eos | stop | length) for a vLLM ``CompletionOutput``.

    An int ``stop_reason`` is a stop token: one of the config's ``stop_token_ids`` is ``stop`` (as in the torch
    engine), any other (an EOS id of the model's generation config) ``eos``.
    """
    if vllm_reason == "length":
        return "length"
    if vllm_reason == "stop":
        if isinstance(stop_reason, str) or (isinstance(stop_reason, int) and stop_reason in stop_token_ids):
            return "stop"
        return "eos"
    raise UserError(f"vLLM ended a request with finish_reason {vllm_reason!r} (aborted or unfinished)")


def timings_of(metrics: Any, wall_s: float) -> tuple[dict[str, float], str]:
    """``(timings, source)`` from ``RequestOutput.metrics`` (vLLM v1 or v0 names), else the batch wall time."""
    if metrics is not None:
        start = _first(metrics, "scheduled_ts", "first_scheduled_time")
        first = _first(metrics, "first_token_ts", "first_token_time")
        last = _first(metrics, "last_token_ts", "last_token_time")
        if start and first and last and start <= first <= last:
            return {"prefill_s": first - start, "decode_s": last - first, "total_s": last - start}, "vllm"
    return {"total_s": wall_s}, "batch"


def _first(obj: Any, *names: str) -> float | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int | float) and value > 0:
            return float(value)
    return None


def to_generation(out: Any, *, index: int, sequence: int, seed: int | None, num_prompt_tokens: int,
                  timings: dict[str, float], logprobs: bool, timing_source: str = "vllm",
                  stop_token_ids: Sequence[int] = ()) -> Generation:
    """A :class:`Generation` from one vLLM ``CompletionOutput``."""
    ids = [int(t) for t in out.token_ids]
    lps: list[float] | None = None
    if logprobs and out.logprobs is not None:
        # one {token id: Logprob} per position, the sampled token always present
        lps = [float(pos[tok].logprob) for tok, pos in zip(ids, out.logprobs, strict=False)]
    score = float(sum(lps)) if lps is not None else float(out.cumulative_logprob or 0.0)
    return Generation(text=out.text, token_ids=ids, logprobs=lps,
                      finish_reason=finish_reason(out.finish_reason, out.stop_reason, stop_token_ids),
                      timings=dict(timings),
                      prompt_index=index, sequence_index=sequence, num_prompt_tokens=num_prompt_tokens,
                      score=score, seed=seed, extra={"timings_from": timing_source})


def render_ids(tokenizer: Any, prompt: Any, chat: bool) -> list[int]:
    """Prompt token ids by the rules of the torch engine's ``LoadedModel.encode`` (same ids in both engines).

    With ``chat``: the chat template with the generation prompt (a string is one user message). Without:
    the text (a chat's contents joined by newlines) with the tokenizer's special tokens (BOS).
    """
    from decodetune.models.handle import _chat_ids

    if chat:
        return _chat_ids(tokenizer, prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])
    text = "\n".join(m.get("content", "") for m in prompt) if isinstance(prompt, list) else str(prompt)
    return [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]


def folder_fingerprint(path: Path) -> str:
    """A hash of a model folder: its config/tokenizer files whole, each weight file's name, size and ends.

    Hashing every byte of a multi-GB checkpoint on each open would cost minutes; the first and last MiB
    of a weight file (for safetensors: the header and the first and last tensors) tell checkpoints apart.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        if f.name in _META_FILES:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        elif f.suffix in _WEIGHT_SUFFIXES:
            size = f.stat().st_size
            h.update(f"{f.name}\0{size}\0".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(_EDGE))
                fh.seek(max(0, size - _EDGE))
                h.update(fh.read(_EDGE))
    return h.hexdigest()[:16]


def resolve_model(model: Any) -> tuple[str, str, Path | None]:
    """``(what LLM loads, model_name, local folder or None)`` for a builtin name, an HF folder or a hub id."""
    from decodetune.models.builtin import BUILTIN_MODELS, ensure_builtin

    if not isinstance(model, str | Path):
        raise UserError(f"--model: the vllm backend takes an HF folder, a hub id or a builtin name, got {model!r}")
    if isinstance(model, str) and model in BUILTIN_MODELS:
        folder = ensure_builtin(model)
        return str(folder), model, folder
    p = Path(str(model)).expanduser()
    if p.suffix == ".gguf":
        raise UserError(f"--model: {str(model)!r} is a GGUF file; use --backend llamacpp for GGUF models")
    if p.is_dir():
        return str(p.resolve()), str(p.resolve()), p.resolve()
    if p.exists() or str(model).startswith((".", "/", "~")):
        raise UserError(f"--model: {str(model)!r} is not a model folder")
    return str(model), str(model), None  # a hub id: vLLM fetches it


class VLLMBackend:
    """vLLM's offline engine on one model. Open it with :meth:`open`."""

    name = "vllm"

    def __init__(self, llm: Any, vllm: Any, *, model_name: str, folder: Path | None, raw: bool = False):
        self.llm, self._vllm = llm, vllm
        self.model_name, self.raw = model_name, raw
        mc = llm.llm_engine.model_config
        self.max_model_len = int(mc.max_model_len)
        self.dtype = str(mc.dtype).removeprefix("torch.")
        self.folder = folder or _hub_snapshot(model_name)
        self._hash = folder_fingerprint(self.folder) if self.folder else f"hub:{model_name}"
        self.tokenizer = llm.get_tokenizer()
        self.chat = bool(getattr(self.tokenizer, "chat_template", None)) and not raw

    @classmethod
    def open(cls, model: Any, opts: Any) -> VLLMBackend:
        """Load ``model`` into a vLLM ``LLM`` (minutes for a large model: weights, CUDA graphs)."""
        vllm = import_vllm()
        target, model_name, folder = resolve_model(model)
        # dtype and gpu_memory_utilization are read only if the options carry them (BackendOptions may not)
        extra = {k: getattr(opts, k) for k in ("gpu_memory_utilization",) if getattr(opts, k, None) is not None}
        try:
            dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(getattr(opts, "dtype", None) or "", "auto")
            llm = vllm.LLM(model=target, dtype=dtype, seed=0,
                           max_model_len=opts.n_ctx, trust_remote_code=opts.trust_remote_code, **extra)
        except ValueError as e:  # vLLM's own checks (max_model_len too long, unknown architecture...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise UserError(f"--model: vLLM could not load {model_name!r} ({first})") from None
        return cls(llm, vllm, model_name=model_name, folder=folder, raw=opts.raw)

    # ------------------------------------------------------------------ protocol
    def identity(self) -> str:
        """``vllm:<version>:<model>:<weights hash>:<dtype>:<chat|raw>``."""
        return (f"vllm:{self._vllm.__version__}:{self.model_name}:{self._hash}:{self.dtype}:"
                f"{'chat' if self.chat else 'raw'}")

    def capabilities(self) -> Capabilities:
        """greedy and sample with vLLM's samplers, in vLLM's fixed order."""
        return VLLM

    def render(self, prompt: Any) -> list[int]:
        """Token ids vLLM is given: the chat template applied (unless raw), as the torch engine does."""
        return render_ids(self.tokenizer, prompt, self.chat)

    def default_config(self) -> DecodingConfig | None:
        """The model's ``generation_config.json`` (vLLM's default sampling params), if it sets a knob."""
        if self.folder is None or not (self.folder / "generation_config.json").is_file():
            return None
        from transformers import GenerationConfig

        from decodetune.backends.torch_backend import generation_config_to_decoding

        try:
            return generation_config_to_decoding(GenerationConfig.from_pretrained(str(self.folder)))
        except (OSError, ValueError):
            return None

    def generate(self, requests: Sequence[Request], *, logprobs: bool = False, batch_size: int | None = None,
                 progress: bool = False) -> list[Generation]:
        """All requests in one ``llm.generate`` call; a flat list in request order."""
        prompts: list[dict[str, list[int]]] = []
        params: list[Any] = []
        seeds: list[int] = []
        copies: list[int] = []
        for i, req in enumerate(requests):
            ids = self.render(req.prompt)
            if len(ids) + req.config.max_new_tokens > self.max_model_len:
                raise UserError(f"prompt #{i}: {len(ids)} prompt tokens + max_new_tokens "
                                f"{req.config.max_new_tokens} exceed vLLM's max_model_len of "
                                f"{self.max_model_len} (--n-ctx)")
            seeds.append(row_seed(req))
            kw, n_copies = sampling_kwargs(req.config, seeds[-1], logprobs)
            try:
                params.append(self._vllm.SamplingParams(**kw))
            except (ValueError, TypeError) as e:  # ranges vLLM checks, e.g. temperature <= 2
                raise UserError(f"request #{i}: vLLM refused its sampling parameters ({e})") from None
            prompts.append({"prompt_token_ids": ids})  # vllm.TokensPrompt is this TypedDict
            copies.append(n_copies)
        if not prompts:
            return []
        t0 = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        wall = time.perf_counter() - t0
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        result: list[Generation] = []
        for i, ro in enumerate(outputs):
            timings, source = timings_of(getattr(ro, "metrics", None), wall)
            n_prompt = len(ro.prompt_token_ids or prompts[i]["prompt_token_ids"])
            done = sorted(ro.outputs, key=lambda o: o.index)
            if copies[i] > 1:
                done = done[:1] * copies[i]
            for j, out in enumerate(done):
                result.append(to_generation(out, index=i, sequence=j, seed=seeds[i], num_prompt_tokens=n_prompt,
                                            timings=timings, logprobs=logprobs, timing_source=source,
                                            stop_token_ids=requests[i].config.stop_token_ids))
        return result

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back (so another model can load in-process)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()  # v1 runs the engine core in a child process
        del llm
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VLLMBackend({self.model_name!r}, dtype={self.dtype!r}, max_model_len={self.max_model_len})"


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub model vLLM has downloaded (its name is the commit), if any."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not a hub id, not cached, or no huggingface_hub: identity falls back to the id
        return None
