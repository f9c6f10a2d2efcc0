"""Wall time of one fixed 24-config grid study with 1, 2 and 4 `decodetune worker` processes on PostgreSQL.

Each run gets its own study in one scratch database; workers split the machine's cores
(`--threads = cores // workers`, at least 1). Prints wall time (process start to last exit, model loads
included), the span from the first trial start to the last trial end (from the storage), speed-up against
one worker measured in the same run, and what the database did per trial (commits and rows written,
from pg_stat_database) for the scaling estimate in BENCHMARKS.md.

    python benchmarks/distributed.py [--model smollm2-135m] [--task arith] [--limit 8] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

PG = os.environ.get("DECODETUNE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
SPACE = """\
strategy: sample
temperature: [0.1, 0.4, 0.7, 1.0, 1.3, 1.6]
top_p: [0.5, 0.8, 0.95, 1.0]
"""


def db_counters(conn, db: str) -> tuple[int, int]:
    row = conn.execute("SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database "
                       "WHERE datname = %s", (db,)).fetchone()
    return int(row[0]), int(row[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arith")
    ap.add_argument("--limit", type=int, default=8, help="dev items per trial")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()

    import optuna
    import psycopg
    from optuna.trial import TrialState

    from decodetune.models import load_model

    load_model(args.model)  # fetch/convert once, outside the timings
    admin = psycopg.connect(f"{PG}/test", autocommit=True)
    db = f"decodetune_bench_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE DATABASE {db}")
    url = f"{PG}/{db}"
    cores = os.cpu_count() or 1
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            space = Path(tmp) / "space.yaml"
            space.write_text(SPACE)
            for n in args.workers:
                study = f"bench-{n}w-{uuid.uuid4().hex[:6]}"
                threads = max(1, cores // n)
                cmd = [sys.executable, "-m", "decodetune", "worker", "--storage", url, "--study-name", study,
                       "--model", args.model, "--task", args.task, "--search", "grid", "--space", str(space),
                       "--limit", str(args.limit), "--no-prune", "--threads", str(threads), "--batch-trials", "2",
                       "--out", str(Path(tmp) / study)]
                before = db_counters(admin, db)
                t0 = time.perf_counter()
                procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                         for _ in range(n)]
                errs = [p.communicate()[1] for p in procs]
                wall = time.perf_counter() - t0
                if any(p.returncode for p in procs):
                    raise SystemExit(f"a worker failed:\n{errs[0][-2000:]}")
                after = db_counters(admin, db)
                s = optuna.load_study(study_name=study, storage=url)
                done = s.get_trials(states=(TrialState.COMPLETE,))
                span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
                rows.append((n, threads, len(done), len({tuple(sorted(t.params.items())) for t in done}), wall, span,
                             (after[0] - before[0]) / len(done), (after[1] - before[1]) / len(done)))
                print(f"{n} worker(s): {len(done)} trials, wall {wall:.1f} s, trial span {span:.1f} s", flush=True)
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    base_wall, base_span = rows[0][4], rows[0][5]
    print(f"\nmachine: {cores} cores; model {args.model}; task {args.task} (limit {args.limit}); 24-point grid")
    print("| workers | threads each | trials | distinct points | wall s | speed-up (wall) | trial span s | "
          "speed-up (span) | DB commits / trial | DB rows written / trial |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, threads, trials, distinct, wall, span, commits, written in rows:
        print(f"| {n} | {threads} | {trials} | {distinct} | {wall:.1f} | {base_wall / wall:.2f}x | {span:.1f} | "
              f"{base_span / span:.2f}x | {commits:.0f} | {written:.0f} |")


if __name__ == "__main__":
    main()
