"""`tune()`: open or resume a study, run the search loop, check the winner on the test split, write outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decodetune.config import DecodingConfig
from decodetune.errors import UserError
from decodetune.tuning.distributed import (
    Heartbeat,
    check_parallel_safe,
    has_heartbeat,
    reap_stale_trials,
    study_lock,
)
from decodetune.tuning.objectives import Objective, parse_objectives
from decodetune.tuning.runner import (
    DEFAULT_BATCH,
    RunStats,
    TrialBatchEvaluator,
    make_splits,
    trial_values,
)
from decodetune.tuning.space import SearchSpace, check_space_against, default_space_for, load_space
from decodetune.tuning.study import (
    default_study_name,
    discard_unused,
    make_pruner,
    make_sampler,
    open_study,
    resolve_storage,
)

log = logging.getLogger("decodetune.tuning")


@dataclass
class TuneResult:
    """What a tuning run produced. ``best_config`` is None when no trial completed."""

    study: Any
    study_name: str
    storage_url: str
    out_dir: Path
    objectives: list[Objective]
    best_trials: list[Any]
    best_config: DecodingConfig | None
    stats: RunStats
    test: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def best_trial(self) -> Any:
        """The best (single objective) or first Pareto-optimal trial."""
        return self.best_trials[0] if self.best_trials else None


def finished_trials(study: Any) -> list[Any]:
    """COMPLETE and PRUNED trials: what counts toward ``n_trials`` and the token budget."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def best_trials(study: Any, objectives: list[Objective]) -> list[Any]:
    """Fully evaluated best trial (one objective) or the Pareto front of fully evaluated trials."""
    from optuna.trial import TrialState

    # the attribute: studies written before pruned trials were stored as PRUNED
    done = [t for t in finished_trials(study) if t.state == TrialState.COMPLETE and not t.user_attrs.get("pruned")
            and t.values is not None]
    if not done:
        return []
    if len(objectives) == 1:
        sign = 1 if objectives[0].direction == "max" else -1
        return [max(done, key=lambda t: (sign * t.values[0], -t.number))]
    signs = [1 if o.direction == "max" else -1 for o in objectives]

    def dominated(a: Any) -> bool:
        return any(all(s * x >= s * y for s, x, y in zip(signs, b.values, a.values, strict=True))
                   and any(s * x > s * y for s, x, y in zip(signs, b.values, a.values, strict=True))
                   for b in done)

    front = [t for t in done if not dominated(t)]
    return sorted(front, key=lambda t: (-signs[0] * t.values[0], t.number))


def tune(model: Any, task: Any, *, search: str = "tpe", n_trials: int = 20,
         space: SearchSpace | str | Path | dict | None = None, objectives: list[str] | None = None,
         storage: str | None = None, study_name: str | None = None, timeout: float | None = None,
         budget_tokens: int | None = None, repeats: int = 1, seed: int = 0, limit: int | None = None,
         out_dir: str | Path = "decodetune-out", batch_trials: int | None = None, prune: bool = True,
         final_test: bool = True, progress: bool = False, console: Any = None,
         model_options: dict[str, Any] | None = None, evaluate_many: Callable[..., list[Any]] | None = None,
         compare: Callable[..., Any] | None = None, per_worker: bool = False,
         cache: str | Path | None = None, eval_seed: int | None = None,
         backend: Any = None, fresh: bool = False, announce: Callable[[str], None] | None = None) -> TuneResult:
    """Search decoding hyperparameters of ``model`` on ``task``'s dev split.

    Re-running with the same study (name and storage) continues it: completed trials count toward
    ``n_trials``. Ctrl-C marks in-flight trials failed (``interrupted``) and leaves the storage usable.
    Returns a :class:`TuneResult`; with ``final_test`` the best config is re-evaluated on the test
    split against the defaults, stored in the study, and ``best_config.json`` plus exports are written.
    ``per_worker``: ``n_trials`` counts this process's trials only (``decodetune worker``), so N workers
    sharing one storage run N x n_trials trials; grid workers run until every point is done.
    ``cache``: generation cache file to use instead of the one next to the study (shared by studies).
    ``seed`` seeds the sampler and the item order; ``eval_seed`` (default ``seed``) is the base of the
    generation row seeds, so studies with different sampler seeds can share cached generations.
    ``backend``: a :class:`~decodetune.backends.BackendOptions` (or an open backend) to generate with;
    default the torch engine. The default space is cut down to what it can do, a user space that sets a
    field it cannot honour is refused before the first trial, and the final test-split check runs on it.
    ``fresh``: delete the study of that name in the storage first (its cached generations are kept).
    ``announce``: called with one line, before any trial runs, when the study resumes or ``fresh`` deleted it.
    With ``progress``, a rich bar on a terminal console, else one plain line per told trial on stderr.
    """
    import optuna

    if n_trials < 1:
        raise UserError(f"--trials: must be >= 1, got {n_trials}")
    if repeats < 1:
        raise UserError(f"--repeats: must be >= 1, got {repeats}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit: must be >= 1, got {limit}")
    # ---- everything the user typed is checked before the model is even loaded
    task = _load_task(task)
    objs = parse_objectives(objectives, task)
    options = _backend_options(backend, model_options)
    # a user space is checked against what the backend kind can do before anything loads, and
    # again against what the opened backend (a probed server) really does
    space_obj = _resolve_space(space, search, _capabilities_of(backend, options),
                               options.name if options else backend.name, task)
    check_space_against(space_obj, dict(getattr(task, "defaults", {}) or {}))
    if search == "grid":
        grid_points = space_obj.grid(seed=seed)
    out = Path(out_dir)
    info = resolve_storage(storage, out)
    splits = make_splits(task, limit, seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    from decodetune.backends import open_backend

    try:
        loaded = backend if options is None else open_backend(model, options)
    except BaseException:
        discard_unused(info)  # a bad --model leaves no empty study.db behind
        raise
    space_obj = _resolve_space(space_obj if space is not None else None, search, loaded.capabilities(),
                               loaded.name, task)
    if search == "grid":
        grid_points = space_obj.grid(seed=seed)
    dtype = getattr(getattr(loaded, "lm", None), "dtype", None) or getattr(loaded, "dtype", None)
    # a reduced-precision torch run is another study by default (fp32 keeps the names it always had)
    suffix = f"-{dtype}" if loaded.name == "torch" and dtype not in (None, "fp32") else ""
    name = study_name or default_study_name(f"{loaded.model_name}{suffix}", task.name, search)
    n_obj = len(objs)
    pruning = bool(prune and n_obj == 1 and not objs[0].corpus and len(splits.dev_indices) > 8)
    sampler_options = {"n_startup_trials": max(4, min(10, n_trials // 3)),
                       "population_size": max(4, min(50, n_trials // 3))}
    identity = {"model": loaded.model_name, "task": task.name,
                "objectives": [str(o) for o in objs], "space": space_obj.to_dict(), "limit": limit,
                "repeats": repeats}
    if loaded.name != "torch":  # studies made before backends existed carry no backend key
        identity["backend"] = loaded.name
    if dtype:  # the weight precision (torch: fp32 | bf16 | int8; vLLM: what it resolved)
        identity["dtype"] = str(dtype)
    sampler = make_sampler(search, seed, space_obj, n_obj, n_trials, sampler_options)
    if fresh:
        _delete_study(info, name, announce)
    study = open_study(info, name, [o.optuna_direction for o in objs], sampler, make_pruner(pruning), identity)
    resumed = bool(study.trials)  # before the baseline is enqueued
    baseline = space_obj.baseline_point()
    if search == "grid":
        grid_points = _baseline_first(grid_points, baseline, space_obj)
    elif baseline is not None and not study.trials:
        # the default config first: the pruner gets a reference, the report a baseline trial
        study.enqueue_trial(baseline, user_attrs={"baseline": True})
    for key, value in (("search", search), ("seed", seed), ("dev_split", splits.dev),
                       ("n_dev_items", len(splits.dev_indices)), ("test_split", splits.test),
                       ("n_test_items", len(splits.test_indices)), ("held_out", splits.held_out),
                       ("pruning", pruning), ("backend", loaded.name),
                       ("backend_capabilities", loaded.capabilities().to_dict())):
        if key not in study.user_attrs:
            study.set_user_attr(key, value)

    # a path: each evaluate call opens it (safe across processes); by default next to the study
    cache = str(cache or info.cache_path)
    if evaluate_many is None:
        from decodetune.eval import evaluate_many as _em

        evaluate_many = _em
    stats = RunStats()
    started = time.monotonic()
    base = base_config(loaded.capabilities())

    last_batch_s = 0.0

    def stop_reason() -> str:
        # checked before a batch starts; a started trial always finishes (as Optuna's own timeout)
        elapsed = time.monotonic() - started
        if timeout is not None and (elapsed >= timeout or elapsed + last_batch_s > timeout * 1.05):
            return "timeout"  # ... and so is one that would very likely run past it
        if budget_tokens is not None and _study_tokens(study) >= budget_tokens:
            return "token budget"
        return ""

    row_seed = seed if eval_seed is None else eval_seed
    evaluator = TrialBatchEvaluator(loaded, task, splits, objs, repeats=repeats, seed=row_seed, cache=cache,
                                    pruning=pruning, evaluate_many=evaluate_many, stats=stats)
    already = 0 if per_worker else len(finished_trials(study))
    remaining = max(0, n_trials - already)
    if announce is not None and resumed:
        announce(resume_text(study))
    parallel_warning = check_parallel_safe(study, info.url)
    if parallel_warning:
        log.warning(parallel_warning)
    batch = max(1, batch_trials or DEFAULT_BATCH[search])
    if search == "nsga2" and batch_trials is None:
        batch = sampler_options["population_size"]
    if batch_trials is None and any(o.metric == "tokens_per_s" for o in objs):
        # a speed objective is measured per config: rows of other configs in the batch would share its time
        batch = 1
    bar = _Progress(remaining, progress, console, already)

    def on_done(trial: Any, attrs: dict[str, Any] | None, error: str | None) -> None:
        if error is not None:
            failed_here.add(_key(space_obj.active_values(trial.params), space_obj))
            trial.set_user_attr("error", error)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            stats.trials_failed += 1
            stats.failures.append(f"trial {trial.number}: {error}")
            log.warning("trial %d failed: %s", trial.number, error)
            bar.advance(study, objs, trial.number, "failed")
            return
        values = trial_values(attrs, objs)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if attrs.get("pruned"):  # PRUNED, not a COMPLETE partial mean: see tuning/runner.py's docstring
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            stats.trials_told += 1
            note = f"pruned after {attrs.get('items_evaluated')} items"
        elif values is None:
            trial.set_user_attr("error", "objective value is missing or not finite")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            stats.trials_failed += 1
            note = "failed: no finite objective value"
        else:
            study.tell(trial, values if n_obj > 1 else values[0])
            stats.trials_told += 1
            note = ", ".join(f"{o.metric}={v:.4g}" for o, v in zip(objs, values, strict=True))
        bar.advance(study, objs, trial.number, note)

    in_flight: list[Any] = []
    failed_here: set[tuple] = set()  # grid points that failed in this run are not retried in it
    try:
        with bar:
            while remaining > 0:
                reason = stop_reason()
                if reason:
                    stats.stop_reason = reason
                    break
                k = min(batch, remaining)
                if search == "grid":
                    in_flight = _ask_grid_points(study, info.url, space_obj, grid_points, failed_here, k)
                    if in_flight is None:
                        stats.stop_reason = "grid exhausted"
                        break
                    if not in_flight:  # other workers hold the last points: wait for them (or their death)
                        time.sleep(_GRID_POLL_S)
                        continue
                    k = len(in_flight)
                else:
                    reap_stale_trials(study)  # trials of dead workers fail; their retries are enqueued
                    in_flight = [study.ask() for _ in range(k)]
                remaining -= k
                trials, configs = [], []
                for t in in_flight:
                    try:
                        values = space_obj.suggest(t)
                        configs.append(space_obj.config(values, base))
                        trials.append(t)
                    except UserError as e:  # a point of the space that makes an invalid config
                        on_done(t, None, str(e))
                if trials:
                    batch_started = time.monotonic()
                    with Heartbeat(study, trials):
                        evaluator.run(trials, configs, order_seed=seed * 100003 + trials[0].number,
                                      on_done=on_done)
                    last_batch_s = time.monotonic() - batch_started
                in_flight = []
            else:
                stats.stop_reason = stats.stop_reason or "trials done"
    except KeyboardInterrupt:
        _fail_unfinished(study, in_flight, "interrupted")
        raise
    except BaseException as e:  # a dead server, a refused config...: no trial stays RUNNING
        _fail_unfinished(study, in_flight, f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    stats.wall_s = time.monotonic() - started
    _accumulate_run_stats(study, stats)
    winners = best_trials(study, objs)
    best_cfg = DecodingConfig.from_dict(winners[0].user_attrs["config"]) if winners else None
    result = TuneResult(study, name, info.url, out, objs, winners, best_cfg, stats)
    if winners:
        from decodetune.tuning.final import final_check, write_outputs

        if final_test:
            try:
                result.test = final_check(loaded, task, study, splits, objs, winners, repeats=repeats,
                                          seed=row_seed, cache=cache, progress=progress, compare=compare)
            except (KeyboardInterrupt, UserError):
                raise
            except Exception as e:  # the search result stands; say why the check is missing
                msg = f"{type(e).__name__}: {e}".splitlines()[0]
                log.warning("test-split check failed: %s", msg)
                study.set_user_attr("final_error", msg)
        result.files = write_outputs(result)
    return result


def resume_text(study: Any) -> str:
    """'resuming study S: 12 trials already done' (and how many failed, if any)."""
    from optuna.trial import TrialState

    failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    return (f"resuming study {study.study_name}: {len(finished_trials(study))} trials already done"
            + (f" ({failed} failed)" if failed else ""))


def _delete_study(info: Any, name: str, announce: Callable[[str], None] | None) -> None:
    """``--fresh``: delete the stored study ``name`` (if there is one) and say so."""
    import optuna

    from decodetune.tuning.study import _redact

    found = [s for s in optuna.get_all_study_summaries(info.storage, include_best_trial=False)
             if s.study_name == name]
    if not found:
        return
    optuna.delete_study(study_name=name, storage=info.storage)
    if announce is not None:
        announce(f"--fresh: deleted study {name} ({found[0].n_trials} trials) from {_redact(info.url)}; "
                 "starting over (cached generations are kept)")


def base_config(caps: Any) -> DecodingConfig:
    """What every trial's config starts from: the defaults, in the backend's sampler order if it is fixed."""
    if caps.sampler_order is None:
        return DecodingConfig()
    from decodetune.config import DEFAULT_SAMPLER_ORDER

    order = list(caps.sampler_order) + [s for s in DEFAULT_SAMPLER_ORDER if s not in caps.sampler_order]
    return DecodingConfig(sampler_order=order)


def _load_task(task: Any) -> Any:
    if hasattr(task, "items") and hasattr(task, "metrics"):
        return task
    from decodetune.tasks import load_task

    return load_task(task)


def _resolve_space(space: Any, search: str, caps: Any, backend_name: str, task: Any = None) -> SearchSpace:
    """The user's space checked against the backend, or the task's default space cut down to it
    (:func:`~decodetune.tuning.space_caps.default_space_for`: candidate strategies where the task fits)."""
    from decodetune.tuning.space_caps import check_space_capabilities

    if space is None:
        return default_space_for(task, grid=search == "grid", capabilities=caps)
    if isinstance(space, SearchSpace):
        space_obj = space
    elif isinstance(space, dict):
        from decodetune.tuning.space import parse_space

        space_obj = parse_space(space)
    else:
        space_obj = load_space(str(space))
    check_space_capabilities(space_obj, caps, backend_name)
    return space_obj


def _backend_options(backend: Any, model_options: dict[str, Any] | None) -> Any:
    """BackendOptions to open (None when ``backend`` is already an open backend)."""
    from decodetune.backends import Backend, BackendOptions

    if isinstance(backend, Backend):
        return None
    opts = backend if isinstance(backend, BackendOptions) else BackendOptions()
    if model_options:
        opts = dataclasses.replace(opts, **{k: v for k, v in model_options.items() if k in ("raw",
                                            "trust_remote_code", "device", "dtype")})
    return opts


def _capabilities_of(backend: Any, options: Any) -> Any:
    """Capabilities known before the model loads (a server's are probed when it is opened)."""
    if options is None:
        return backend.capabilities()
    from decodetune.backends.capabilities import static_capabilities

    return static_capabilities(options.name)


def _unexplored(study: Any, space: SearchSpace, points: list[dict[str, Any]],
                skip: set[tuple] | None = None) -> list[dict[str, Any]]:
    """Grid points no trial has covered yet (complete, pruned, running or waiting: other workers' too).

    Failed points are tried again (an interrupted run's trials are failed), except those in ``skip``.
    """
    from optuna.trial import TrialState

    taken = set(skip or ())
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                                      TrialState.WAITING)):
        # an enqueued point carries fixed_params from the start; its params only appear once suggested,
        # which another worker may not have done yet (a retried stale trial carries params only)
        params = {**t.params, **t.system_attrs.get("fixed_params", {})}
        taken.add(_key(space.active_values(params), space))
    return [p for p in points if _key(space.active_values(p), space) not in taken]


_GRID_POLL_S = 2.0


def _ask_grid_points(study: Any, url: str, space: SearchSpace, points: list[dict[str, Any]],
                     skip: set[tuple], k: int) -> list[Any] | None:
    """Up to ``k`` grid trials, enqueued and asked under the study lock so no point runs twice.

    Returns None when the grid is done (nothing waiting, running or left), [] when only other workers'
    running trials remain (they may still die and be retried).
    """
    from optuna.trial import TrialState

    with study_lock(study, url):
        # under the lock: between failing a dead worker's trial and enqueueing its retry, its point
        # must not look free to another worker
        reap_stale_trials(study)
        todo = _unexplored(study, space, points, skip)
        for point in todo[:k]:
            # not skip_if_exists: that also skips points whose earlier trial failed
            study.enqueue_trial(point)
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        if waiting:
            return [study.ask() for _ in range(min(k, waiting))]
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    # without heartbeats a dead worker's RUNNING trial never ends: waiting for it could hang for ever
    return [] if running and has_heartbeat(study) else None


def _baseline_first(points: list[dict[str, Any]], baseline: dict[str, Any] | None,
                    space: SearchSpace) -> list[dict[str, Any]]:
    if baseline is None:
        return points
    key = _key(baseline, space)
    return sorted(points, key=lambda p: _key(space.active_values(p), space) != key)


def _key(values: dict[str, Any], space: SearchSpace) -> tuple:
    return tuple(sorted((k, round(v, 9) if isinstance(v, float) else v) for k, v in values.items()
                        if k in space and space[k].searched))


def _fail_unfinished(study: Any, trials: list[Any], why: str) -> None:
    from optuna.trial import TrialState

    for t in trials:
        with contextlib.suppress(Exception):  # already told
            t.set_user_attr("error", why)
            study.tell(t, state=TrialState.FAIL, skip_if_finished=True)


def _study_tokens(study: Any) -> int:
    return int(sum(t.user_attrs.get("tokens_generated", t.user_attrs.get("tokens_evaluated", 0)) or 0
                   for t in finished_trials(study)))


def _accumulate_run_stats(study: Any, stats: RunStats) -> None:
    """Add this run's counters to the study totals (the report reads them)."""
    totals = dict(study.user_attrs.get("totals", {}))
    for key in ("trials_told", "trials_failed", "trials_pruned", "tokens_generated", "tokens_evaluated",
                "cache_hits", "cache_misses", "generate_calls", "wall_s"):
        totals[key] = totals.get(key, 0) + getattr(stats, key)
    totals["tokens_saved_by_pruning"] = round(totals.get("tokens_saved_by_pruning", 0)
                                              + stats.tokens_saved_by_pruning)
    study.set_user_attr("totals", totals)


class _Progress:
    """Rich progress bar with ETA over the trials of this run on a terminal; without one, a plain line per
    told trial on stderr (a log or CI shows progress instead of nothing for minutes); silent when disabled."""

    def __init__(self, total: int, enabled: bool, console: Any, already: int):
        import sys

        self.enabled, self.total, self.already = enabled and total > 0, total, already
        self._p = None
        self._task = None
        tty = console.is_terminal if console is not None else sys.stderr.isatty()
        self.plain, self.done, self.t0 = self.enabled and not tty, 0, time.monotonic()
        if self.enabled and tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._p = Progress(TextColumn("[bold]tuning"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                               TextColumn("{task.description}"), console=console, transient=False)

    def __enter__(self) -> _Progress:
        if self._p is not None:
            self._p.__enter__()
            self._task = self._p.add_task("", total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def advance(self, study: Any, objs: list[Objective], number: int | None = None, note: str = "") -> None:
        """One more trial told; show the best value so far."""
        if self._p is None and not self.plain:
            return
        self.done += 1
        desc = ""
        if len(objs) == 1:
            best = best_trials(study, objs)
            if best:
                desc = f"best {objs[0].metric}={best[0].values[0]:.4g} (trial {best[0].number})"
        if self._p is not None:
            self._p.update(self._task, advance=1, description=desc)
            return
        import sys

        print(f"trial {number} ({self.done}/{self.total} this run): {note or 'done'}"
              + (f"; {desc}" if desc else "") + f"; {time.monotonic() - self.t0:.0f} s", file=sys.stderr, flush=True)
