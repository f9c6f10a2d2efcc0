"""The distillation loop: one process or torch.distributed DDP (gloo on CPU, nccl on CUDA).

Exactness choices (tests rely on them):

* Step ``s`` uses global examples ``order[s*B:(s+1)*B]`` of a seeded per-epoch permutation, split into
  ``grad_accum`` micro-batches, and rank ``r`` of ``W`` takes every W-th example of each micro-batch.
* The loss of a step is the mean over *all* completion tokens of the step (all micro-batches, all
  ranks): each micro-batch contributes ``sum(token losses) / global_token_count * W`` (DDP averages
  gradients over W ranks). So 2 ranks x B/2 compute the same update as 1 rank x B, up to float
  summation order.
* Which examples are on-policy, and the seed of each student sample, come from (seed, step, position),
  never from a global RNG stream, so they do not depend on the number of ranks or on resuming.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decodetune.config import DecodingConfig
from decodetune.errors import UserError
from decodetune.train.distill import checkpoint as ckpt
from decodetune.train.distill.data import (
    Example,
    Row,
    TeacherLogitCache,
    collate,
    completion_logits,
    completion_to_ids,
    eos_id_of,
    make_example,
    sample_completions,
)
from decodetune.train.distill.losses import LOSS_KINDS, distill_loss, needs_teacher_logits
from decodetune.train.distill.student import StudentSpec, build_student, save_student

SOURCES = ("auto", "data", "teacher")


@dataclass
class DistillConfig:
    """Training options. ``loss = alpha*CE + (1-alpha)*KD``; ``on_policy`` is GKD's lambda."""

    loss: str = "fkl"
    alpha: float = 0.0
    tau: float = 1.0
    beta: float = 0.5
    on_policy: float = 0.0
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    max_length: int = 256
    seed: int = 0
    source: str = "auto"
    teacher_decoding: dict[str, Any] = field(default_factory=lambda: {"strategy": "greedy", "max_new_tokens": 64})
    student_decoding: dict[str, Any] = field(default_factory=lambda: {"strategy": "sample", "temperature": 1.0,
                                                                      "max_new_tokens": 64})
    checkpoint_every: int = 0
    engine: str = "auto"

    def validate(self, world_size: int = 1) -> None:
        """Raise :class:`UserError` naming the first bad option."""
        checks = [
            (self.loss in LOSS_KINDS, "loss", f"must be one of {', '.join(LOSS_KINDS)}"),
            (0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]"),
            (self.tau > 0, "tau", "must be > 0"),
            (0.0 <= self.beta <= 1.0, "beta", "must be in [0, 1]"),
            (0.0 <= self.on_policy <= 1.0, "on_policy", "must be in [0, 1]"),
            (self.steps >= 1, "steps", "must be >= 1"),
            (self.grad_accum >= 1, "grad_accum", "must be >= 1"),
            (self.lr > 0, "lr", "must be > 0"),
            (self.schedule in ("cosine", "constant"), "schedule", "must be cosine or constant"),
            (self.max_length >= 4, "max_length", "must be >= 4"),
            (self.source in SOURCES, "source", f"must be one of {', '.join(SOURCES)}"),
            (self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0"),
            (self.batch_size >= 1 and self.batch_size % (self.grad_accum * world_size) == 0, "batch_size",
             f"{self.batch_size} must be a positive multiple of grad_accum x world size "
             f"({self.grad_accum} x {world_size})"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise UserError(f"{name}: {msg}")
        DecodingConfig.from_dict(self.teacher_decoding, source="teacher decoding config")
        DecodingConfig.from_dict(self.student_decoding, source="student decoding config")

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine to 10% of ``lr`` (or constant)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class DistillResult:
    """What a run produced: the student (unwrapped), its history and where it was written."""

    student: nn.Module
    history: list[dict[str, Any]]
    info: dict[str, Any]
    out_dir: Path | None = None
    examples: list[Example] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ distributed
def setup_distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, created) from torchrun's env; inits the process group when needed."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        rank, world, created = dist.get_rank(), dist.get_world_size(), False
    elif world > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, created = dist.get_rank(), True
    else:
        rank, created = 0, False
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device, created


def _all_reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _comm_device() -> torch.device:
    """Where collective tensors live: the current CUDA device under nccl, else CPU (gloo)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_objects(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------------------------------- data
def _derived(seed: int, *parts: Any) -> int:
    """A 63-bit integer from (seed, parts...): per-example randomness independent of process layout."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_source(rows: list[Row], source: str) -> str:
    """``auto`` means ``data`` when every row has a completion, else ``teacher``."""
    if source == "auto":
        return "data" if all(r.get("completion") is not None for r in rows) else "teacher"
    if source == "data":
        missing = next((r for r in rows if r.get("completion") is None), None)
        if missing is not None:
            raise UserError(f"data line {missing.get('_line')}: --source data needs a 'completion' in every row")
    return source


def teacher_completions(teacher: Any, rows: list[Row], cfg: DistillConfig, rank: int, world: int,
                        cache_dir: Path | None, progress: bool) -> list[list[int]]:
    """Sequence-level KD targets: the teacher's completions (token ids) for every row, generated
    with ``cfg.teacher_decoding`` and row seeds from (seed, row); split across ranks, then gathered.
    Cached in ``cache_dir`` so a resumed run does not regenerate them."""
    key = hashlib.sha256(json.dumps([teacher.name, cfg.teacher_decoding, cfg.seed,
                                     [r["prompt"] for r in rows]], sort_keys=True, default=str).encode())
    cache = cache_dir / f"teacher-{key.hexdigest()[:16]}.json" if cache_dir else None
    # every rank must take the same branch (a rank that skipped generation would miss the gather)
    have = float(cache is not None and cache.exists())
    if cache is not None and _all_reduce_sum([have], torch.device("cpu") if world == 1 else _comm_device(),
                                             world)[0] == world:
        return json.loads(cache.read_text())
    config = DecodingConfig.from_dict(cfg.teacher_decoding, source="teacher decoding config")
    mine = list(range(rank, len(rows), world))
    chunk = 16
    ids: list[list[int]] = []
    bar = _bar(progress and rank == 0, len(mine), "teacher generations")
    for start in range(0, len(mine), chunk):
        part = mine[start:start + chunk]
        ids += sample_completions(teacher, [rows[i]["prompt"] for i in part], config,
                                  [_derived(cfg.seed, "teacher", i) for i in part], engine=cfg.engine)
        bar.update(len(part))
    bar.close()
    merged: list[list[int]] = [[] for _ in rows]
    for part_idx, part_ids in _gather_objects((mine, ids), world):
        for i, seq in zip(part_idx, part_ids, strict=True):
            merged[i] = seq
    if cache is not None and rank == 0:
        from decodetune.io import write_json

        write_json(cache, merged)
    return merged


def build_examples(teacher: Any, rows: list[Row], completions: list[list[int]] | None,
                   max_length: int) -> list[Example]:
    """Tokenise rows into :class:`Example` (prompt via the teacher's encode, i.e. chat template)."""
    eos = eos_id_of(teacher)
    out = []
    for i, row in enumerate(rows):
        comp = completions[i] if completions is not None else completion_to_ids(teacher.tokenizer,
                                                                                row["completion"], eos)
        out.append(make_example(teacher.encode(row["prompt"]), comp, i, max_length))
    return out


class _CompletionLM(nn.Module):
    """Wraps the student so DDP sees one forward that returns completion-position logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return completion_logits(self.model, batch)


def _bar(enabled: bool, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------------------------------- loop
def distill(teacher: Any, spec: StudentSpec, rows: list[Row], cfg: DistillConfig, out_dir: str | Path | None = None,
            checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = False,
            stop_after: int | None = None, overwrite: bool = False,
            teacher_cache: TeacherLogitCache | None = None,
            completions: list[list[int]] | None = None) -> DistillResult:
    """Distil ``teacher`` (a LoadedModel) into a new student described by ``spec``.

    ``rows`` are prompt rows (see :mod:`.data`; augment them with :func:`.data.prepare_rows` first).
    ``teacher_cache`` keeps the teacher's logits of off-policy examples between epochs (and between
    runs sharing the cache); without it the teacher runs on every batch. ``completions`` (token ids, one
    list per row) replaces the rows' completions, e.g. teacher generations made beforehand.
    Writes a HF model directory to ``out_dir`` (atomically, rank 0) when given. ``stop_after`` ends the
    run after that many total steps as if interrupted (the last checkpoint stays), for tests and budgets.
    """
    rank, world, device, created = setup_distributed()
    try:
        return _distill(teacher, spec, rows, cfg, out_dir, checkpoint_dir, resume, progress, stop_after,
                        overwrite, rank, world, device, teacher_cache, completions)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _distill(teacher: Any, spec: StudentSpec, rows: list[Row], cfg: DistillConfig, out_dir: Any,
             checkpoint_dir: Any, resume: bool, progress: bool, stop_after: int | None, overwrite: bool,
             rank: int, world: int, device: torch.device, teacher_cache: TeacherLogitCache | None,
             given: list[list[int]] | None) -> DistillResult:
    cfg.validate(world)
    if out_dir is not None and Path(out_dir).exists() and not overwrite and any(Path(out_dir).iterdir()):
        raise UserError(f"{out_dir}: already exists; pass --overwrite to replace it")
    if resume and checkpoint_dir is None:
        raise UserError("--resume needs a checkpoint directory")
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    torch.use_deterministic_algorithms(True, warn_only=True)
    teacher.model.to(device).eval()
    if given is not None:
        if len(given) != len(rows):
            raise UserError(f"completions: {len(given)} given for {len(rows)} rows")
        source, completions = "given", given
    else:
        source = resolve_source(rows, cfg.source)
        completions = (teacher_completions(teacher, rows, cfg, rank, world, ckpt_root, progress)
                       if source == "teacher" else None)
    examples = build_examples(teacher, rows, completions, cfg.max_length)
    pad_id = teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else 0
    student, info = build_student(teacher.model, spec, seed=cfg.seed)
    student.to(device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    fingerprint = json.loads(json.dumps({"config": {k: v for k, v in dataclasses.asdict(cfg).items()
                                                    if k not in ("checkpoint_every", "engine")},
                                         "spec": {k: v for k, v in dataclasses.asdict(spec).items()
                                                  if k != "source"},
                                         "teacher": teacher.name, "source": source,
                                         "data": hashlib.sha256(json.dumps(
                                             [[e.prompt_ids, e.completion_ids] for e in examples]).encode()
                                         ).hexdigest()}, default=str))
    history: list[dict[str, Any]] = []
    start = 0
    if resume and ckpt_root is not None and (path := ckpt.latest_checkpoint(ckpt_root)) is not None:
        state = ckpt.load_checkpoint(path, student, optimizer, fingerprint)
        start, history = int(state["step"]), list(state["history"])
    wrapped: nn.Module = _CompletionLM(student)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    use_teacher = needs_teacher_logits(cfg.loss, cfg.alpha)
    student_cfg = DecodingConfig.from_dict(cfg.student_decoding, source="student decoding config")
    student_view = _student_view(student, teacher)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = _bar(progress and rank == 0, cfg.steps, "distill")
    bar.update(start)
    t_start = time.perf_counter()
    for step in range(start, end):
        positions = _step_positions(step, cfg.batch_size, len(examples), cfg.seed)
        micro = cfg.batch_size // cfg.grad_accum
        shares = [positions[m * micro:(m + 1) * micro][rank::world] for m in range(cfg.grad_accum)]
        batches = [_materialise(share, examples, rows, step, cfg, student, student_view, student_cfg)
                   for share in shares]
        local_tokens = sum(len(e.completion_ids) for b in batches for e in b[0])
        global_tokens = _all_reduce_sum([float(local_tokens)], device, world)[0]
        sums = [0.0, 0.0, 0.0]
        for m, (exs, n_on_micro) in enumerate(batches):
            batch = collate(exs, pad_id, device)
            sync = contextlib.nullcontext() if (world == 1 or m == len(batches) - 1) else wrapped.no_sync()
            with sync:
                s_logits = wrapped(batch)
                t_logits = None
                if use_teacher and teacher_cache is not None:
                    t_logits = teacher_cache.logits(teacher.model, batch, exs, store=n_on_micro == 0)
                elif use_teacher:
                    with torch.no_grad():
                        t_logits = completion_logits(teacher.model, batch)
                parts = distill_loss(s_logits, t_logits, batch["labels"], cfg.loss, cfg.alpha, cfg.tau, cfg.beta)
                (parts["loss"].sum() * (world / global_tokens)).backward()
            sums = [a + float(parts[k].detach().sum()) for a, k in zip(sums, ("loss", "ce", "kd"), strict=True)]
        lr = cfg.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n_on = sum(b[1] for b in batches)
        loss, ce, kd, on = _all_reduce_sum([*sums, float(n_on)], device, world)
        record = {"step": step + 1, "loss": loss / global_tokens, "ce": ce / global_tokens,
                  "kd": kd / global_tokens, "lr": lr, "grad_norm": grad_norm, "tokens": int(global_tokens),
                  "on_policy_examples": int(on), "elapsed_s": round(time.perf_counter() - t_start, 3)}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        bar.update(1)
        if ckpt_root is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            if rank == 0:
                ckpt.save_checkpoint(ckpt_root, step + 1, student, optimizer,
                                     {"history": history, "fingerprint": fingerprint})
            _barrier(world)
    bar.close()
    info.update(source=source, world_size=world, steps_done=len(history), examples=len(examples))
    written = None
    if out_dir is not None and rank == 0 and len(history) == cfg.steps:
        written = save_student(student.eval(), teacher.tokenizer, out_dir,
                               extra_files=_run_files(history, info, cfg, spec, teacher.name), overwrite=overwrite)
        student.train()
    _barrier(world)
    return DistillResult(student=student, history=history, info=info, out_dir=written, examples=examples)


def _step_positions(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Example indices of a step's global batch, from per-epoch seeded permutations."""
    out = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(k, n)
        order = list(range(n))
        random.Random(_derived(seed, "epoch", epoch)).shuffle(order)
        out.append(order[offset])
    return out


def _student_view(student: nn.Module, teacher: Any) -> Any:
    from decodetune.models.handle import LoadedModel

    view = LoadedModel(student, teacher.tokenizer, name="student", chat=teacher.chat)
    student.train()  # LoadedModel puts the model in eval mode; sampling below switches explicitly
    return view


def _materialise(indices: list[int], examples: list[Example], rows: list[Row], step: int, cfg: DistillConfig,
                 student: nn.Module, view: Any, decoding: DecodingConfig) -> tuple[list[Example], int]:
    """The micro-batch's examples, with on-policy ones' completions replaced by student samples."""
    exs = [examples[i] for i in indices]
    if cfg.on_policy <= 0:
        return exs, 0
    chosen = [j for j, i in enumerate(indices)
              if random.Random(_derived(cfg.seed, "on-policy", step, i)).random() < cfg.on_policy]
    if not chosen:
        return exs, 0
    student.eval()  # sample with eval-mode norms (BatchNorm: running statistics), no grad
    try:
        samples = sample_completions(view, [rows[exs[j].index]["prompt"] for j in chosen], decoding,
                                     [_derived(cfg.seed, "sample", step, indices[j]) for j in chosen],
                                     engine=cfg.engine)
    finally:
        student.train()
    for j, sample in zip(chosen, samples, strict=True):
        exs[j] = make_example(exs[j].prompt_ids, sample, exs[j].index, cfg.max_length)
    return exs, len(chosen)


def _run_files(history: list[dict[str, Any]], info: dict[str, Any], cfg: DistillConfig, spec: StudentSpec,
               teacher_name: str) -> dict[str, bytes]:
    meta = {"teacher": teacher_name, "config": dataclasses.asdict(cfg),
            "student": {k: v for k, v in dataclasses.asdict(spec).items() if k != "source"}, "info": info,
            "final": history[-1] if history else None}
    files = {"distill.json": json.dumps(meta, indent=2, default=str).encode(),
             "metrics.jsonl": "".join(json.dumps(h) + "\n" for h in history).encode()}
    png = loss_curve_png(history, title=f"{cfg.loss} from {teacher_name}")
    if png is not None:
        files["loss.png"] = png
    return files


def loss_curve_png(history: list[dict[str, Any]], title: str = "") -> bytes | None:
    """Loss / CE / KD per step as a PNG (matplotlib, Agg); None when there is no history."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    for key in ("loss", "ce", "kd"):
        ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("per-token loss")
    ax.set_title(title)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
