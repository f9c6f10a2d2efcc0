"""`decodetune distill` (teacher -> smaller student) and `decodetune distill-eval` (student vs teacher).

Data-parallel: ``torchrun --nproc_per_node N -m decodetune distill ...`` (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from decodetune.errors import UserError


def _decoding_dict(path: Optional[Path], default: dict[str, Any], max_new_tokens: Optional[int]) -> dict[str, Any]:  # noqa: UP045
    from decodetune.config import DecodingConfig

    data = DecodingConfig.load(path).to_dict(only_set=True) if path is not None else dict(default)
    if max_new_tokens is not None:
        data["max_new_tokens"] = max_new_tokens
    return data


def _load(spec: str) -> Any:
    from decodetune.models import load_model

    return load_model(spec)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def distill_command(
    teacher: str = typer.Option("smollm2-135m", "--teacher", help="teacher: builtin name, HF folder, .gguf"),
    student: Path = typer.Option(..., "--student", help="student spec YAML (layers, sizes, norm, init)"),
    data: str = typer.Option(..., "--data", help="prompts JSONL ('prompt' [+ 'completion'] or 'text') or a task"),
    out: Path = typer.Option(..., "--out", "--output", "-o", metavar="FOLDER",
                             help="output Hugging Face model folder"),
    split: str = typer.Option("dev", "--split", help="task split to train on (when --data is a task)"),
    loss: str = typer.Option("fkl", "--loss", help="ce | fkl (forward KL) | rkl (reverse KL) | jsd"),
    alpha: float = typer.Option(0.0, "--alpha", help="loss = alpha*CE + (1-alpha)*KD"),
    tau: float = typer.Option(1.0, "--tau", help="soft-target temperature (KD terms scaled by tau^2)"),
    beta: float = typer.Option(0.5, "--beta", help="generalized JSD beta (0 = forward KL, 1 = reverse KL)"),
    on_policy: float = typer.Option(0.0, "--on-policy", help="fraction of examples the student samples (GKD lambda)"),
    source: str = typer.Option("auto", "--source", help="completions: data | teacher (sequence KD) | auto"),
    teacher_config: Optional[Path] = typer.Option(None, "--teacher-config", help="teacher DecodingConfig"),  # noqa: UP045
    student_config: Optional[Path] = typer.Option(None, "--student-config", help="on-policy DecodingConfig"),  # noqa: UP045
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="override both configs' length"),  # noqa: UP045
    steps: int = typer.Option(100, "--steps", help="optimizer steps"),
    batch_size: int = typer.Option(8, "--batch-size", help="global examples per optimizer step"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro-batches per optimizer step"),
    lr: float = typer.Option(3e-4, "--lr", help="peak learning rate (AdamW)"),
    warmup: int = typer.Option(0, "--warmup", help="linear warmup steps"),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine | constant"),
    max_length: int = typer.Option(256, "--max-length", help="max tokens per example (prompt + completion)"),
    seed: int = typer.Option(0, "--seed", help="seed: student init, batch order, samples"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="checkpoint every K steps (0 = never)"),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="default: OUT.checkpoints"),  # noqa: UP045
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out directory"),
    max_student_fraction: float = typer.Option(1.0, "--max-student-fraction",
                                               help="max share of teacher non-embedding params"),
    augment: Optional[str] = typer.Option(  # noqa: UP045
        None, "--augment", help="expand the prompts with `decodetune augment` ops first (e.g. swap,delete)"),
    augment_n: int = typer.Option(1, "--augment-n", help="variants per prompt and op (with --augment)"),
) -> None:
    """Distil a teacher into a smaller Llama student; writes a HF model directory."""
    from decodetune.train.distill.data import load_rows
    from decodetune.train.distill.student import StudentSpec
    from decodetune.train.distill.trainer import DistillConfig

    spec = StudentSpec.load(student)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists; pass --overwrite to replace it")
    defaults = DistillConfig()
    cfg = DistillConfig(loss=loss, alpha=alpha, tau=tau, beta=beta, on_policy=on_policy, steps=steps,
                        batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup, schedule=schedule,
                        max_length=max_length, seed=seed, source=source, checkpoint_every=checkpoint_every,
                        teacher_decoding=_decoding_dict(teacher_config, defaults.teacher_decoding, max_new_tokens),
                        student_decoding=_decoding_dict(student_config, defaults.student_decoding, max_new_tokens))
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    rows = load_rows(data, split)
    augmenter = None
    if augment:  # originals are kept; LM ops and 'lm' synonyms use the teacher (see decodetune augment)
        from decodetune.train.augment import row_augmenter

        augmenter = row_augmenter(augment, n=augment_n, seed=seed, model=teacher)
    run_distill(teacher, spec, rows, cfg, out, checkpoint_dir or out.with_name(out.name + ".checkpoints"),
                resume, overwrite, max_student_fraction, augment=augmenter)


def run_distill(teacher: str, spec: Any, rows: list[dict[str, Any]], cfg: Any, out: Path, checkpoint_dir: Path,
                resume: bool, overwrite: bool, max_student_fraction: float = 1.0,
                augment: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None) -> Any:
    """Load the teacher and train; ``augment(rows) -> rows`` (optional) transforms the prompt rows first.

    This is the entry for ``distill --augment``: pass the augmentation as ``augment``.
    """
    from decodetune.train.distill.data import prepare_rows
    from decodetune.train.distill.student import build_student, check_param_budget
    from decodetune.train.distill.trainer import distill

    rows = prepare_rows(rows, augment)
    lm = _load(teacher)
    if max_student_fraction < 1.0:
        probe, info = build_student(lm.model, spec, seed=cfg.seed)
        del probe
        check_param_budget(info, max_student_fraction)
    result = distill(lm, spec, rows, cfg, out_dir=out, checkpoint_dir=checkpoint_dir, resume=resume, progress=True,
                     overwrite=overwrite)
    if _rank() == 0:
        last = result.history[-1]
        info = result.info
        typer.echo(f"student: {info['non_embedding_params']:,} non-embedding params "
                   f"({info['non_embedding_params'] / info['teacher_non_embedding_params']:.3f} of the teacher), "
                   f"init {info['init']}, norm {info['norm']}, {info['world_size']} process(es)")
        typer.echo(f"step {last['step']}: loss {last['loss']:.4f} (ce {last['ce']:.4f}, kd {last['kd']:.4f})")
        typer.echo(f"wrote {out} (loss curve: {out / 'loss.png'})")
    return result


def distill_eval_command(
    student: str = typer.Option(..., "--student", help="student model directory (or any model spec)"),
    teacher: str = typer.Option("smollm2-135m", "--teacher", help="teacher model spec"),
    data: str = typer.Option(..., "--data", help="held-out JSONL ('prompt' + 'completion', or 'text') or a task"),
    split: str = typer.Option("test", "--split", help="task split (when --data or --task is a task)"),
    source: str = typer.Option("auto", "--source", help="held-out completions: data | teacher | auto"),
    teacher_config: Optional[Path] = typer.Option(None, "--teacher-config", help="teacher DecodingConfig"),  # noqa: UP045
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="length of teacher completions"),  # noqa: UP045
    max_length: int = typer.Option(256, "--max-length", help="max tokens per example"),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="use the first N rows / task items"),  # noqa: UP045
    task: Optional[str] = typer.Option(None, "--task", help="also score the task metric with decodetune's evaluate"),  # noqa: UP045
    task_config: Optional[Path] = typer.Option(None, "--task-config", help="DecodingConfig for the task metric"),  # noqa: UP045
    batch_size: int = typer.Option(8, "--batch-size", help="examples per forward pass"),
    seed: int = typer.Option(0, "--seed", help="seed of teacher completions"),
    output: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--output", "--out", "-o", metavar="FILE", help="write the report as JSON here"),
) -> None:
    """Compare a student with its teacher: perplexity, top-1 agreement, KL, tokens/s, task metric."""
    from decodetune.config import DecodingConfig
    from decodetune.io import check_output_path, write_json
    from decodetune.train.distill.data import load_rows
    from decodetune.train.distill.evaluate import compare_to_teacher, generation_speed, task_scores
    from decodetune.train.distill.trainer import DistillConfig, build_examples, resolve_source, teacher_completions

    check_output_path(output, "--output")
    if batch_size < 1:
        raise UserError(f"--batch-size: must be >= 1, got {batch_size}")
    rows = load_rows(data, split)[: limit if limit is not None else None]
    t_decoding = _decoding_dict(teacher_config, DistillConfig().teacher_decoding, max_new_tokens)
    cfg = DistillConfig(seed=seed, source=source, max_length=max_length, teacher_decoding=t_decoding)
    cfg.validate()
    t_lm, s_lm = _load(teacher), _load(student)
    if len(s_lm.tokenizer) != len(t_lm.tokenizer):
        raise UserError(f"--student {student}: tokenizer has {len(s_lm.tokenizer)} tokens, the teacher's "
                        f"{len(t_lm.tokenizer)}; a student must share the teacher's tokenizer")
    src = resolve_source(rows, source)
    comps = teacher_completions(t_lm, rows, cfg, 0, 1, None, True) if src == "teacher" else None
    examples = build_examples(t_lm, rows, comps, max_length)
    report: dict[str, Any] = {"student": student, "teacher": teacher, "data": data, "source": src, "rows": len(rows)}
    report.update(compare_to_teacher(s_lm, t_lm, examples, batch_size=batch_size, progress=True))
    if getattr(s_lm.model.config, "decodetune_norm", None) == "batchnorm":
        report["batch_statistics"] = compare_to_teacher(s_lm, t_lm, examples, batch_size=batch_size)
    prompts = [r["prompt"] for r in rows[:16]]
    report["student"].update(generation_speed(s_lm, prompts, batch_size=batch_size))
    report["teacher"].update(generation_speed(t_lm, prompts, batch_size=batch_size))
    if task is not None:
        try:
            conf = DecodingConfig.load(task_config) if task_config is not None else None
            report["task"] = task_scores({"student": s_lm, "teacher": t_lm}, task, conf, limit, split, seed)
        except ImportError:
            report["task"] = {"error": "decodetune.eval is not installed; task metric not computed"}
    _print_report(report)
    if output is not None:
        write_json(output, report)


def _print_report(r: dict[str, Any]) -> None:
    s, t = r["student"], r["teacher"]
    typer.echo(f"held-out completion tokens: {r['completion_tokens']} ({r['rows']} rows, source {r['source']})")
    typer.echo(f"{'':10}{'perplexity':>12}{'fwd tok/s':>12}{'gen tok/s':>12}")
    for name, m in (("student", s), ("teacher", t)):
        typer.echo(f"{name:10}{m['perplexity']:>12.3f}{m['forward_tokens_per_s']:>12.1f}"
                   f"{m.get('generate_tokens_per_s', float('nan')):>12.1f}")
    typer.echo(f"top-1 agreement with teacher: {r['top1_agreement']:.4f}; KL(teacher||student): "
               f"{r['kl_teacher_student']:.4f} nats/token")
    if "batch_statistics" in r:
        b = r["batch_statistics"]
        typer.echo(f"batchnorm with batch statistics (training behaviour): perplexity "
                   f"{b['student']['perplexity']:.3f}, agreement {b['top1_agreement']:.4f}")
    if "task" in r:
        typer.echo(f"task: {json.dumps(r['task'])}")


def register(app: typer.Typer) -> None:
    """Add ``distill`` and ``distill-eval`` to the CLI."""
    app.command("distill", help="Distil a teacher into a smaller Llama student (HF directory).")(distill_command)
    app.command("distill-eval", help="Compare a distilled student with its teacher on held-out text.")(
        distill_eval_command)
