"""``generate()``: our batched decoding loop over a Hugging Face causal LM with a KV cache.

Rows of a call: one per (prompt, returned sequence) for greedy / sample configs, decoded together by
:class:`~decodetune.decoding.batching.FlatDecoder` (at most ``batch_size`` at once, continuous batching,
one prefill per distinct prompt); beam configs run as separate batches grouped by (num_beams, sampling),
contrastive ones (:mod:`~decodetune.decoding.contrastive`) by top_k and diverse_beam ones
(:mod:`~decodetune.decoding.diverse_beam`) by (num_beams, num_beam_groups).
Each step: model forward on the newest token -> processors (penalties, n-grams, min_new_tokens) ->
greedy rows take the argmax, sampling rows go through their sampler chain and draw from their own
generator -> finished rows (EOS / stop token / stop string / length) leave the batch, their KV-cache rows
dropped, and waiting rows take their slots.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import torch

from decodetune.config import DecodingConfig
from decodetune.decoding.batching import FlatDecoder, FlatRow
from decodetune.decoding.beam import BeamRequest, beam_search
from decodetune.decoding.contrastive import ContrastiveRequest, contrastive_search
from decodetune.decoding.diverse_beam import diverse_beam_search
from decodetune.decoding.fast_linear import fast_linears
from decodetune.decoding.runner import ModelRunner
from decodetune.decoding.stopping import final_text
from decodetune.decoding.token_rules import use_tokenizer
from decodetune.decoding.types import Generation
from decodetune.errors import UserError

#: Drop finished rows from the batch (index the KV cache) rather than keep computing them masked.
#: Measured in benchmarks/bench_generate.py; switchable only for that measurement.
COMPACT_FINISHED_ROWS = True
#: Let waiting rows take the slots of finished ones (continuous batching) rather than run each chunk of
#: ``batch_size`` rows down to its longest row. Switchable to measure and test against static batching.
CONTINUOUS_BATCHING = True


def generate(model: Any, prompts: Any, config: DecodingConfig | Sequence[DecodingConfig] | None = None, *,
             seeds: Sequence[int | None] | None = None, logprobs: bool = False, batch_size: int | None = None,
             progress: bool = False, draft_model: Any = None, num_draft_tokens: int | None = None,
             prompt_lookup_num_tokens: int | None = None) -> list[Generation]:
    """Decode every prompt; returns a flat list in prompt order (n consecutive entries for n sequences).

    ``model``: anything :func:`decodetune.models.load_model` accepts. ``prompts``: a list of strings or
    chats (lists of ``{"role", "content"}`` messages). ``config``: one :class:`DecodingConfig` for all
    prompts, or one per prompt (all decoded in one batch). ``seeds``: one per prompt, overriding
    ``config.seed``; a prompt without a seed gets a fresh random one, recorded in ``Generation.seed``.
    ``logprobs``: also return the raw log-probability of every generated token. ``batch_size``: most
    rows (sequences, or beams; a prompt's beams are never split) per forward pass. ``progress``: show a
    progress bar on stderr.

    The same (prompt, config, seed) gives the same tokens whatever else is in the call, its position and
    ``batch_size``. Bad input raises :class:`~decodetune.errors.UserError` naming the argument.

    ``draft_model`` (transformers' ``assistant_model``; with ``num_draft_tokens``) or
    ``prompt_lookup_num_tokens``: speculative decoding, one row at a time (:mod:`.speculative`).
    """
    if draft_model is not None or num_draft_tokens is not None or prompt_lookup_num_tokens is not None:
        from decodetune.decoding.speculative import generate_speculative

        return generate_speculative(model, prompts, config, seeds=seeds, logprobs=logprobs,
                                    draft_model=draft_model, num_draft_tokens=num_draft_tokens,
                                    prompt_lookup_num_tokens=prompt_lookup_num_tokens)
    lm = _resolve_model(model)
    prompts = _check_prompts(prompts)
    configs = _check_configs(config, len(prompts))
    seeds = _check_seeds(seeds, len(prompts))
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise UserError(f"batch_size: must be a positive integer, got {batch_size!r}")
    prompt_ids = []
    for i, prompt in enumerate(prompts):
        ids = lm.encode(prompt)
        if not ids:
            raise UserError(f"prompts[{i}]: encodes to no tokens")
        prompt_ids.append(ids)
    # deterministic strategies keep the seed they were given (maybe None); sampling ones always get one
    seeds = [s if s is not None else c.seed for s, c in zip(seeds, configs, strict=True)]
    seeds = [secrets.randbits(63) if s is None and c.is_sampling else s for s, c in zip(seeds, configs, strict=True)]

    runner = ModelRunner(lm.model)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eos_token_ids[0]
    decode: Callable[[list[int]], str] = lm.decode
    eos = list(lm.eos_token_ids)
    flat = [FlatRow(i, j, prompt_ids[i], c, seeds[i]) for i, c in enumerate(configs) if not _own_decoder(c)
            for j in range(c.num_return_sequences)]
    # (decoder, rows per prompt, what else must match in a batch) -> its requests; contrastive and
    # diverse_beam first, as diverse_beam is a beam strategy too
    beams: dict[tuple[Any, int, Any], list[Any]] = {}
    for i, c in enumerate(configs):
        if c.strategy == "contrastive":
            beams.setdefault((contrastive_search, c.top_k, None), []).append(
                ContrastiveRequest(i, prompt_ids[i], c, seeds[i]))
        elif c.strategy == "diverse_beam":
            beams.setdefault((diverse_beam_search, c.num_beams, c.num_beam_groups), []).append(
                BeamRequest(i, prompt_ids[i], c, seeds[i]))
        elif c.is_beam:
            beams.setdefault((beam_search, c.num_beams, c.is_sampling), []).append(
                BeamRequest(i, prompt_ids[i], c, seeds[i]))

    out: dict[tuple[int, int], Generation] = {}
    total = len(flat) + sum(len(v) for v in beams.values())
    # bad_words and DRY's breakers are tokenized with the model's tokenizer (decoding.token_rules)
    with (torch.inference_mode(), fast_linears(lm.model), use_tokenizer(lm.tokenizer),
          _progress(progress, total) as advance):
        if flat:
            decoder = FlatDecoder(runner, flat, pad=pad, eos=eos, decode=decode, batch_size=batch_size,
                                  advance=advance, continuous=CONTINUOUS_BATCHING, compact=COMPACT_FINISHED_ROWS)
            for row, fin in zip(flat, decoder.run(), strict=True):
                out[(row.prompt_index, row.sequence_index)] = _generation(
                    row.prompt_index, row.sequence_index, row.ids, row.seed, fin.token_ids,
                    fin.logprobs, fin.reason, fin.cut, sum(fin.logprobs), fin.prefill_s, fin.decode_s, decode, eos,
                    logprobs, stop_token=fin.stop_token, top_logprobs=fin.top_logprobs)
        for (search, width, _), requests in beams.items():
            per_batch = None if batch_size is None else max(1, batch_size // width)
            for chunk in _chunks(requests, per_batch, key=lambda r: len(r.ids)):
                results, prefill_s = search(runner, chunk, pad_token_id=pad, eos_token_ids=eos,
                                            decode=decode, on_done=advance)
                for req, hyps in zip(chunk, results, strict=True):
                    for j, h in enumerate(hyps):
                        out[(req.prompt_index, j)] = _generation(
                            req.prompt_index, j, req.ids, req.seed, h.token_ids, h.logprobs,
                            h.finish_reason, h.stop_at, h.score, prefill_s, h.decode_s, decode, eos, logprobs,
                            stop_token=h.stop_token, top_logprobs=h.top_logprobs)
    return [out[key] for key in sorted(out)]


def _generation(prompt_index: int, sequence_index: int, ids: list[int], seed: int | None,
                token_ids: list[int], lps: list[float], reason: str, cut: int | None, score: float,
                prefill_s: float, decode_s: float, decode: Callable[[list[int]], str], eos: list[int],
                want_logprobs: bool, *, stop_token: bool = False,
                top_logprobs: list[dict[int, float]] | None = None) -> Generation:
    text = final_text(decode, token_ids, reason, cut, eos, stop_token=stop_token)
    timings = {"prefill_s": prefill_s, "decode_s": decode_s, "total_s": prefill_s + decode_s}
    return Generation(text=text, token_ids=list(token_ids), logprobs=list(lps) if want_logprobs else None,
                      finish_reason=reason, timings=timings, prompt_index=prompt_index,
                      sequence_index=sequence_index, num_prompt_tokens=len(ids), score=float(score),
                      seed=seed, top_logprobs=top_logprobs)


def _chunks(items: Sequence[Any], size: int | None, key: Callable[[Any], int]) -> list[list[Any]]:
    """Split into batches of at most ``size``; with a size, similar prompt lengths go together (less padding)."""
    if size is None or size >= len(items):
        return [list(items)] if items else []
    ordered = sorted(items, key=key)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


class _progress:
    """A rich progress bar over finished sequences, or a no-op."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self._bar = enabled, total, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import Progress

        self._bar = Progress(console=Console(stderr=True), transient=False)
        self._bar.start()
        task = self._bar.add_task("generating", total=self.total)
        return lambda n: self._bar.advance(task, n)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _resolve_model(model: Any) -> Any:
    from decodetune.models.handle import LoadedModel

    if isinstance(model, LoadedModel):
        return model
    from decodetune.models import load_model

    return load_model(model)


def _check_prompts(prompts: Any) -> list[Any]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
        raise UserError(f"prompts: expected a list of prompts, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise UserError("prompts: empty prompt list")
    for i, p in enumerate(prompts):
        ok = isinstance(p, str) or (isinstance(p, list) and all(isinstance(m, dict) for m in p))
        if not ok:
            raise UserError(f"prompts[{i}]: expected a string or a list of chat messages, got {type(p).__name__}")
    return prompts


def _own_decoder(c: DecodingConfig) -> bool:
    """Beam strategies and contrastive search run in their own decoders, not the flat loop."""
    return c.is_beam or c.strategy == "contrastive"


def _check_configs(config: Any, n: int) -> list[DecodingConfig]:
    if config is None:
        return [DecodingConfig()] * n
    if isinstance(config, DecodingConfig | dict):
        config = [config] * n
    configs = [c if isinstance(c, DecodingConfig) else DecodingConfig.from_dict(c) if isinstance(c, dict)
               else _bad_config(c) for c in config]
    if len(configs) != n:
        raise UserError(f"configs: got {len(configs)} configs for {n} prompts (give one, or one per prompt)")
    for c in configs:
        pending = [n for n in _NOT_BUILT if getattr(c, n) != getattr(_DEFAULT, n)]
        if pending:  # until the issue 11 samplers land; each removes its name here
            raise UserError(f"{pending[0]}: not implemented in the torch engine yet")
        beam_pending = [n for n in _NOT_BUILT_BEAM
                        if c.strategy == "diverse_beam" and getattr(c, n) != getattr(_DEFAULT, n)]
        if beam_pending:  # beam.py and contrastive.py have them; diverse_beam.py not
            raise UserError(f"{beam_pending[0]}: not implemented for strategy {c.strategy!r} in the torch engine yet")
        if c.is_candidate:  # silently sampling one sequence would pass for the strategy
            raise UserError(f"strategy: {c.strategy!r} selects one of num_candidates samples, which the engine "
                            "does not do; run it through evaluate / eval / tune, or generate "
                            "candidate_config(config) and select with decodetune.evaluation.candidates")
    return configs


_DEFAULT = DecodingConfig()
_NOT_BUILT: tuple[str, ...] = ()
_NOT_BUILT_BEAM = ("stop_token_ids", "ignore_eos", "top_logprobs")


def _bad_config(c: Any) -> DecodingConfig:
    raise UserError(f"config: expected a DecodingConfig or a mapping, got {type(c).__name__}")


def _check_seeds(seeds: Sequence[int | None] | None, n: int) -> list[int | None]:
    if seeds is None:
        return [None] * n
    seeds = list(seeds)
    if len(seeds) != n:
        raise UserError(f"seeds: got {len(seeds)} seeds for {n} prompts")
    for i, s in enumerate(seeds):
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
            raise UserError(f"seeds[{i}]: must be a non-negative integer or None, got {s!r}")
    return seeds
