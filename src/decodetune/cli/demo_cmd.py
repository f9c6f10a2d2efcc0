"""`decodetune demo`: the whole loop in one command, no arguments needed.

A small TPE search (with pruning) over greedy / beam / sampling for the embedded model on the builtin
closed-ended ``arith`` task, then the winner against greedy on the held-out test split with a paired test,
and ``report.html``. The search stops starting trials after ``--timeout`` seconds, so the demo stays within
about five minutes on two CPU cores. Re-running it continues the same study.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from decodetune.cli.backend_options import backend_options, with_model_flags
from decodetune.errors import UserError

#: Compact space: the three strategies and the knobs that matter most for short answers.
DEMO_SPACE = {
    "strategy": ["greedy", "beam", "sample"],
    "num_beams": {"low": 2, "high": 5},
    "length_penalty": {"low": 0.0, "high": 1.5},
    "temperature": {"low": 0.1, "high": 1.5, "log": True},
    "top_p": {"low": 0.7, "high": 1.0},
    "repetition_penalty": {"low": 1.0, "high": 1.3},
}


@backend_options
def demo_command(
    out: Path = typer.Option(Path("decodetune-demo"), "--out", "--output", "-o", metavar="FOLDER",
                             help="folder for the study and report"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="model to tune"),
    task: str = typer.Option("arith", "--task", "-t", help="builtin task (closed-ended works best)"),
    trials: int = typer.Option(12, "--trials", help="TPE trials"),
    limit: int = typer.Option(32, "--limit", help="items per split (dev and test)"),
    timeout: float = typer.Option(150.0, "--timeout", help="stop starting trials after S seconds"),
    seed: int = typer.Option(0, "--seed", help="sampler and row seed"),
    space: Optional[Path] = typer.Option(None, "--space", help="search space YAML (default: a compact one)"),  # noqa: UP045
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: the idle cores, at least 1)"),
    fresh: bool = typer.Option(False, "--fresh", help="delete the demo's stored study and start over"),
    *,
    backend: Any,
) -> None:
    """Tune the embedded model on a builtin task, compare with greedy on the test split, write a report."""
    from decodetune.cli.tune_cmd import resume_line, run_tune
    from decodetune.io import check_output_dir

    # checked before the demo space is written into --out, so bad input leaves no folder behind
    check_output_dir(out, "--out")
    for flag, value, ok in (("--trials", trials, trials >= 1), ("--limit", limit, limit >= 1),
                            ("--timeout", timeout, timeout > 0)):
        if not ok:
            raise UserError(f"{flag}: must be {'> 0' if flag == '--timeout' else '>= 1'}, got {value}")
    if space is not None:
        from decodetune.tuning.space import load_space

        load_space(str(space))  # a bad file is one error line, not one after the banner
    t0 = time.monotonic()
    resuming = None if fresh else resume_line(out, f"demo-{task}")
    if resuming:  # the first line: a re-run continues the study (and reuses its cached generations)
        print(resuming, file=sys.stderr, flush=True)
    n_threads = set_threads(threads)
    kinds = "greedy / beam / sampling" if backend.name == "torch" else f"greedy / sampling on {backend.name}"
    print(f"decodetune demo: TPE search over {kinds} for {model} on task {task} "
          f"({trials} trials, {limit} dev + {limit} test items, {n_threads} CPU thread(s))", file=sys.stderr)
    options = with_model_flags(backend, threads=n_threads)
    result = run_tune(task=task, model=model, search="tpe", trials=trials,
                      space=space or _space_file(out, options.name),
                      objective=None, storage=None, study_name=f"demo-{task}", timeout=timeout,
                      budget_tokens=None, repeats=1, seed=seed, limit=limit, out=out, batch_trials=4,
                      prune=True, test=True, report=True, backend=options, fresh=fresh,
                      resume_said=resuming is not None)
    _verdict(result)
    print(f"demo finished in {time.monotonic() - t0:.0f} s; open {Path(out) / 'report.html'}", file=sys.stderr)


def set_threads(threads: int) -> int:
    """Set torch's CPU threads: ``threads``, or (0) as many as there are idle cores, at least one.

    Small models on a busy machine run several times faster on one thread than on threads that wait for
    cores other processes hold; OMP_NUM_THREADS, when set, wins.
    """
    import os

    import torch

    if threads < 0:
        raise UserError(f"--threads: must be >= 0, got {threads}")
    if threads == 0:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = max(1, min(cores, round(cores - busy)))
    torch.set_num_threads(threads)
    return threads


def _space_file(out: Path, backend: str) -> Path:
    import yaml

    from decodetune.backends.capabilities import static_capabilities
    from decodetune.io import atomic_write
    from decodetune.tuning.space import restrict_spec

    path = Path(out) / "demo_space.yaml"
    with atomic_write(path) as f:  # what this backend can run: no beams on llama.cpp or a server
        f.write(yaml.safe_dump(restrict_spec(DEMO_SPACE, static_capabilities(backend)), sort_keys=False))
    return path


def _verdict(result: object) -> None:
    """One plain sentence: the tuned config against greedy on the test split."""
    test = getattr(result, "test", None)
    if not test:
        print("no test-split comparison (no trial completed)")
        return
    metric = test["objectives"][0].partition(":")[0]
    base = next((r for r in test["rows"] if r.get("vs") is None), None)
    tuned = next((r for r in test["rows"] if r["name"].startswith("tuned") and r.get("vs") == base["name"]),
                 None) if base else None
    if base is None or tuned is None:
        return
    p = tuned["paired"].get(metric, {})
    tv, bv = tuned["metrics"][metric]["value"], base["metrics"][metric]["value"]
    cfg = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuned["config"].items())
    sig = "" if not p else (f"; paired difference {p['diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}], "
                            f"{p.get('test', 'test')} p = {p['p_value']:.3g}")
    print(f"\ntest split ({test['n_items']} items never seen by the search): tuned {metric} = {tv:.3f} "
          f"vs greedy {bv:.3f}{sig}\ntuned config: {cfg}")
    if (test.get("power") or {}).get("sentence"):  # how much this split can tell apart at all
        print(test["power"]["sentence"])


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("demo", help="Tune the embedded model on a builtin task in a few minutes, with a report.")(
        demo_command)
