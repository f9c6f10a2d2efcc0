"""`evaluate`, `evaluate_many`, `compare`: generate with a backend, score, bootstrap.

``model`` is a :class:`~decodetune.backends.Backend` (torch, llamacpp, openai, vllm) or anything
``load_model`` accepts (then the torch backend). Every config is checked against the backend's
capabilities before anything is generated. Every row of a run (items x repeats x configs) goes to ONE
``backend.generate`` call (the torch engine batches rows with different configs together); rows
already in the generation cache, or identical to another row of the run, are not generated again.
Each row's seed is derived from (base seed, item id, repeat) and never from the config, so configs
compared on the same items see the same random numbers. Generations are written to ``output``
(atomically) before any metric runs, so a failing metric never loses them; the file is rewritten with
the scores once the metrics are done.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from decodetune.backends import Backend, as_backend, check_config, requests_of
from decodetune.cache import GenerationCache, cache_key, open_cache
from decodetune.config import DecodingConfig
from decodetune.errors import UserError
from decodetune.evaluation.candidates import candidate_config, generate_candidates, select_row
from decodetune.evaluation.result import (
    Comparison,
    EvalResult,
    MetricSummary,
    MetricTable,
    PairedDifference,
    json_row,
)
from decodetune.metrics import Metric, MetricInput, get_metric
from decodetune.metrics.stats import bootstrap_ci, item_means, paired_compare, row_grid
from decodetune.tasks import Task, TaskItem, load_task

ConfigLike = DecodingConfig | dict | str | Path | None


def row_seed(base_seed: int, item_id: str, repeat: int) -> int:
    """Seed of one (item, repeat) row: a hash of (base seed, item id, repeat), 31 bits."""
    digest = hashlib.sha256(f"{base_seed}\x1f{item_id}\x1f{repeat}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def resolve_config(config: ConfigLike, task: Task) -> DecodingConfig:
    """A DecodingConfig from an object, dict or file, with the task's defaults filled in.

    A task default (e.g. ``max_new_tokens=12``) applies where a dict leaves the field out, or where a
    DecodingConfig has the field at its class default.
    """
    if config is None:
        given: dict[str, Any] = {}
    elif isinstance(config, DecodingConfig):
        given = config.to_dict(only_set=True)
    elif isinstance(config, dict):
        given = dict(config)
    elif isinstance(config, str | Path):
        return resolve_config(DecodingConfig.load(config), task)
    else:
        raise UserError(f"config: expected a DecodingConfig, dict or file path, got {type(config).__name__}")
    explicit = _explicit_fields(given)
    merged = {k: v for k, v in task.defaults.items() if k not in explicit}
    merged.update(given)
    return DecodingConfig.from_dict(merged, source="config")


def _explicit_fields(config: dict[str, Any]) -> set[str]:
    from decodetune.config import ALIASES

    return {ALIASES.get(k, k) for k in config}


def resolve_items(task: Task, split: str, limit: int | None, item_indices: Sequence[int] | None) -> list[TaskItem]:
    """The split's items: the first ``limit``, then ``item_indices`` picked in the given order."""
    items = task.items(split)
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit: must be >= 1, got {limit}")
        items = items[:limit]
    if item_indices is not None:
        picked = []
        for i in item_indices:
            if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= int(i) < len(items):
                raise UserError(f"item_indices: {i!r} is not an index of the {len(items)} items of split {split!r}")
            picked.append(items[int(i)])
        if not picked:
            raise UserError("item_indices: empty selection")
        items = picked
    return items


@dataclass
class _Row:
    config_index: int
    item_index: int
    repeat: int
    seed: int
    key: str
    prompt_ids: Any  # token ids, or the text / messages for a backend that tokenises server-side


def _generate(backend: Backend, prompts: list[Any], configs: list[DecodingConfig], seeds: list[int], *,
              batch_size: int | None, progress: bool) -> list[Any]:
    """The backend call (a module-level seam so tests can substitute the engine); a candidate strategy's
    row asks for its candidates (:mod:`decodetune.evaluation.candidates`)."""
    return generate_candidates(backend, requests_of(prompts, configs, seeds), batch_size=batch_size,
                               progress=progress)


def _gen_to_dict(g: Any) -> dict[str, Any]:
    d = {"text": g.text, "token_ids": [int(t) for t in g.token_ids], "num_tokens": int(g.num_tokens),
         "finish_reason": g.finish_reason, "timings": {k: float(v) for k, v in (g.timings or {}).items()},
         "num_prompt_tokens": int(g.num_prompt_tokens), "score": float(g.score),
         "sequence_index": int(g.sequence_index)}
    return d


def _complete(gens: list[Any], keys: list[str], rows: list[_Row],
              cfgs: list[DecodingConfig]) -> dict[str, list[dict[str, Any]]]:
    """Cache entries of the rows whose every sequence came back (a partial batch of a failed call)."""
    grouped: dict[int, list[dict[str, Any]]] = {}
    for g in gens:
        grouped.setdefault(int(g.prompt_index), []).append(_gen_to_dict(g))
    out = {}
    for i, key in enumerate(keys):
        seqs = grouped.get(i, [])
        if seqs and len(seqs) == candidate_config(cfgs[rows[i].config_index]).num_return_sequences:
            out[key] = sorted(seqs, key=lambda d: d["sequence_index"])
    return out


def _num_tokens(gen: dict[str, Any]) -> int:
    """Generated tokens of a stored generation (rows cached before ``num_tokens`` existed have ids)."""
    return int(gen.get("num_tokens", len(gen["token_ids"])))


def _load(model: Any) -> Backend:
    return as_backend(model)


def evaluate_many(model: Any, task: str | Path | Task, configs: Sequence[ConfigLike], *, split: str = "dev",
                  repeats: int = 1, limit: int | None = None, item_indices: Sequence[int] | None = None,
                  metrics: Sequence[str | Metric] | None = None, seed: int = 0, batch_size: int | None = None,
                  cache: str | Path | GenerationCache | None = None, scorer: Any = None, bootstrap: int = 1000,
                  confidence: float = 0.95, output: str | Path | None = None,
                  progress: bool = False) -> list[EvalResult]:
    """Evaluate several configs on the same items and seeds in one generate() call; one result each.

    Arguments are those of :func:`evaluate`. ``output`` receives the rows of every config (with a
    ``config_index`` field).
    """
    t0 = time.perf_counter()
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise UserError(f"repeats: must be a positive integer, got {repeats!r}")
    if not configs:
        raise UserError("configs: give at least one config")
    task_obj = load_task(task)
    cfgs = [resolve_config(c, task_obj) for c in configs]
    items = resolve_items(task_obj, split, limit, item_indices)
    metric_objs = [get_metric(m) for m in (metrics if metrics else task_obj.metrics)]
    names = [m if isinstance(m, str) else get_metric(m).name for m in (metrics or task_obj.metrics)]
    for metric in metric_objs:  # fail before generating, not after
        if metric.needs_references:
            bare = next((it for it in items if not it.references), None)
            if bare is not None:
                raise UserError(f"metric {metric.name!r} needs references, but item {bare.id!r} of task "
                                f"{task_obj.name!r} has none")
    backend = _load(model)
    for ci, cfg in enumerate(cfgs):  # refused before any generation, naming the field
        check_config(cfg, backend, where="config" if len(cfgs) == 1 else f"config #{ci + 1}")
    store = open_cache(cache)
    # hashing the weights costs a second; without a store the key only de-duplicates rows of this run
    model_id = backend.identity() if store is not None else f"{backend.name}:{backend.model_name}"

    # ---- rows: config-major, then item, then repeat (deterministic configs run once)
    prompt_ids = [backend.render(it.prompt) for it in items]
    reps = [repeats if c.is_sampling else 1 for c in cfgs]
    rows: list[_Row] = []
    for ci, cfg in enumerate(cfgs):
        for ii, it in enumerate(items):
            for r in range(reps[ci]):
                s = cfg.seed if cfg.seed is not None else seed
                rs = row_seed(s, it.id, r)
                rows.append(_Row(ci, ii, r, rs, cache_key(model_id, prompt_ids[ii], cfg, rs), prompt_ids[ii]))

    # ---- generate what neither the cache nor another row of this run provides
    unique_keys = list(dict.fromkeys(r.key for r in rows))
    stored = store.get_many(unique_keys) if store is not None else {}
    todo = [k for k in unique_keys if k not in stored]
    first_row = {}
    for r in rows:
        first_row.setdefault(r.key, r)
    generate_s = 0.0
    fresh: dict[str, list[dict[str, Any]]] = {}
    if todo:
        req = [first_row[k] for k in todo]
        tg = time.perf_counter()
        try:
            gens = _generate(backend, [items[r.item_index].prompt for r in req],
                             [cfgs[r.config_index] for r in req], [r.seed for r in req], batch_size=batch_size,
                             progress=progress)
        except Exception as e:  # a server that died mid-call: keep what it finished, then fail
            partial = getattr(e, "partial", None)
            if store is not None and partial:
                store.put_many(_complete(partial, todo, req, cfgs), model=backend.model_name)
            raise
        generate_s = time.perf_counter() - tg
        grouped: dict[int, list[dict[str, Any]]] = {}
        for g in gens:
            grouped.setdefault(int(g.prompt_index), []).append(_gen_to_dict(g))
        for k_i, key in enumerate(todo):
            if k_i not in grouped:
                raise RuntimeError(f"generate() returned nothing for prompt {k_i}")
            fresh[key] = sorted(grouped[k_i], key=lambda d: d["sequence_index"])
        if store is not None:
            store.put_many(fresh, model=backend.model_name)
    values = {**stored, **fresh}

    # ---- row records, written before any metric can fail
    records = []
    for r in rows:
        it = items[r.item_index]
        # sequence 0 (the best beam, or the first sample), or the candidate a candidate strategy selects
        gen, others = select_row(cfgs[r.config_index], values[r.key], task_obj, it.prompt)
        records.append({
            "config_index": r.config_index, "item_id": it.id, "item_index": r.item_index, "repeat": r.repeat,
            "seed": r.seed, "prompt": it.prompt, "prediction": gen["text"],
            "extracted": task_obj.extract_answer(gen["text"]), "references": list(it.references),
            "finish_reason": gen["finish_reason"], "num_tokens": _num_tokens(gen),
            "token_ids": gen["token_ids"], "num_prompt_tokens": gen["num_prompt_tokens"],
            "gen_s": float(gen["timings"].get("total_s", 0.0)), "cached": r.key in stored,
            "other_sequences": [g["text"] for g in others],
        })
    if output is not None:
        _write_rows(output, records, cfgs)

    # ---- metrics per config
    scorer_loader = _scorer_loader(backend, scorer)
    # gen_ppl reuses the generated ids only when the scorer is the generating torch model
    metric_model = backend.model_name if backend.name == "torch" else backend.identity()
    results = []
    for ci, cfg in enumerate(cfgs):
        recs = [rec for rec in records if rec["config_index"] == ci]
        grid = row_grid(len(items), reps[ci])
        inp = MetricInput(
            predictions=[rec["extracted"] for rec in recs], references=[rec["references"] for rec in recs],
            items=[items[rec["item_index"]] for rec in recs], texts=[rec["prediction"] for rec in recs],
            token_ids=[rec["token_ids"] for rec in recs], prompts=[rec["prompt"] for rec in recs],
            prompt_token_ids=[prompt_ids[rec["item_index"]] for rec in recs],
            gen_seconds=[rec["gen_s"] for rec in recs], scorer_loader=scorer_loader, model_name=metric_model,
            num_tokens=[rec["num_tokens"] for rec in recs])
        table, scores = MetricTable(), {}
        for name, metric in zip(names, metric_objs, strict=True):
            sc = metric(inp)
            scores[name] = sc
            lo, hi = bootstrap_ci(sc, grid, n_boot=bootstrap, confidence=confidence, seed=seed)
            table[name] = MetricSummary(
                name=name, value=sc.value(), ci_low=lo, ci_high=hi, direction=metric.direction,
                corpus=sc.is_corpus, per_item=[float(v) for v in item_means(sc.per_row, grid)],
                per_row=[float(v) for v in sc.per_row])
            for rec, v in zip(recs, sc.per_row, strict=True):
                rec.setdefault("scores", {})[name] = float(v)
        cached = sum(1 for rec in recs if rec["cached"])
        results.append(EvalResult(
            task=task_obj.name, split=split, model=backend.model_name, config=cfg, backend=backend.name,
            item_ids=[it.id for it in items],
            repeats=reps[ci], primary=names[0], metrics=table, rows=recs,
            num_tokens=sum(rec["num_tokens"] for rec in recs),
            num_tokens_generated=sum(_num_tokens(g) for r in rows
                                     if r.config_index == ci and r.key in fresh and first_row[r.key] is r
                                     for g in fresh[r.key]),
            wall_s=0.0, generate_s=generate_s, cache_hits=cached, cache_misses=len(recs) - cached, seed=seed,
            scores=scores, grid=grid))
    if output is not None:
        _write_rows(output, records, cfgs)
    wall = time.perf_counter() - t0
    for res in results:
        res.wall_s = wall
    return results


def _write_rows(path: str | Path, records: list[dict[str, Any]], cfgs: list[DecodingConfig]) -> None:
    from decodetune.io import write_jsonl

    out = []
    for rec in records:
        row = json_row({k: v for k, v in rec.items() if k != "token_ids"})
        if len(cfgs) > 1:
            row["config"] = cfgs[rec["config_index"]].to_dict(only_set=True)
        else:
            row.pop("config_index", None)
        out.append(row)
    write_jsonl(path, out)


def _scorer_loader(backend: Backend, scorer: Any) -> Any:
    def load() -> Any:
        if scorer is not None:
            from decodetune.models import load_model

            return load_model(scorer)
        own = getattr(backend, "scorer", None)
        if own is not None:
            return own()
        # an engine without a torch model (llama.cpp, a server): score with the same model in torch
        from decodetune.models import load_model

        try:
            return load_model(backend.model_name)
        except UserError as e:
            raise UserError(f"--scorer: backend {backend.name!r} cannot score gen_ppl itself and its model "
                            f"{backend.model_name!r} does not load in torch ({e}); give --scorer MODEL") from None

    return load


def evaluate(model: Any, task: str | Path | Task, config: ConfigLike = None, *, split: str = "dev",
             repeats: int = 1, limit: int | None = None, item_indices: Sequence[int] | None = None,
             metrics: Sequence[str | Metric] | None = None, seed: int = 0, batch_size: int | None = None,
             cache: str | Path | GenerationCache | None = None, scorer: Any = None, bootstrap: int = 1000,
             confidence: float = 0.95, output: str | Path | None = None, progress: bool = False) -> EvalResult:
    """Generate answers for a task's items with one config and score them.

    ``model``: anything :func:`decodetune.models.load_model` accepts. ``task``: builtin name, task file or
    :class:`~decodetune.tasks.Task`. ``config``: DecodingConfig, dict or JSON/YAML path (task defaults
    fill the rest). ``split``: dev or test. ``repeats``: samples per item for sampling configs
    (deterministic configs run once). ``limit``: first N items; ``item_indices``: pick items of the split
    in this order (after ``limit``). ``metrics``: names, ``pkg.module:function`` or Metric objects
    (default: the task's; the first is the primary). ``seed``: base of the per-row seeds (``config.seed``
    replaces it). ``cache``: generation cache path or object. ``scorer``: model for ``gen_ppl`` (default
    the model itself). ``bootstrap``: resamples for the CIs (0 = none). ``output``: JSONL of the rows.
    """
    return evaluate_many(model, task, [config], split=split, repeats=repeats, limit=limit,
                         item_indices=item_indices, metrics=metrics, seed=seed, batch_size=batch_size,
                         cache=cache, scorer=scorer, bootstrap=bootstrap, confidence=confidence,
                         output=output, progress=progress)[0]


def compare(model: Any, task: str | Path | Task, configs: Sequence[ConfigLike], **kwargs: Any) -> Comparison:
    """Evaluate configs on the same items with the same seeds; paired differences vs ``configs[0]``.

    Takes :func:`evaluate`'s keyword arguments. Per-item metrics get a Wilcoxon signed-rank test on the
    per-item differences, corpus metrics a paired bootstrap; both get a paired-bootstrap CI. With more
    than two configs, each metric's p-values against ``configs[0]`` are also Holm-adjusted (``p_holm``):
    "is any of these k configs better?" asked k times at 0.05 would find a winner by chance too often.
    """
    if len(configs) < 2:
        raise UserError("compare: give at least two configs")
    results = evaluate_many(model, task, configs, **kwargs)
    n_boot = kwargs.get("bootstrap", 1000)
    confidence = kwargs.get("confidence", 0.95)
    seed = kwargs.get("seed", 0)
    base = results[0]
    diffs = []
    for ci, res in enumerate(results[1:], start=1):
        for name in base.metrics:
            p = paired_compare(name, base.scores[name], base.grid, res.scores[name], res.grid,
                               n_boot=n_boot, confidence=confidence, seed=seed)
            diffs.append(PairedDifference(**p.__dict__, config_index=ci))
    from decodetune.metrics.stats import holm

    for name in base.metrics:  # the family: one metric, every config against the baseline
        family = [d for d in diffs if d.metric == name]
        for d, adjusted in zip(family, holm([d.p_value for d in family]), strict=True):
            d.p_holm = float(adjusted)
    return Comparison(results=results, differences=diffs)
