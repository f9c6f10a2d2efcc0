"""The student: a Llama-architecture model that shares the teacher's tokenizer.

A student spec (YAML) sets the layer count, hidden size, heads, intermediate size, the norm
(``rmsnorm | layernorm | batchnorm``) and the initialisation:

* ``init: extract`` copies a subset of the teacher's decoder layers (``teacher_layers``, default evenly
  spaced from the first to the last), the embeddings, the final norm and the LM head. It needs the
  same hidden size, intermediate size, head counts and head size as the teacher, because whole weight
  matrices are copied; anything else is a :class:`UserError` telling the user to pick ``init: random``.
* ``init: random`` draws every weight from the config's initialiser (seeded); when the hidden size
  equals the teacher's, the token embeddings (and an untied LM head) are still copied from the teacher,
  since they live in the same space; with another hidden size nothing is copied.

Saved students are plain Hugging Face directories (config.json, model.safetensors, tokenizer). An
RMSNorm student is a stock Llama. A layernorm/batchnorm student carries ``"decodetune_norm"`` in
config.json; stock transformers loads its RMSNorm gains and ignores the extra tensors (with an
"unexpected keys" warning) — which computes the wrong function, so loaders must call
:func:`maybe_patch_norm` after ``from_pretrained`` (``load_student`` does both). Only safetensors are
read; never pickle.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from decodetune.errors import UserError
from decodetune.models.norms import NORM_CONFIG_FIELD, NORMS, maybe_patch_norm, swap_norms

INITS = ("extract", "random")
_ALIASES = {"num_layers": "num_hidden_layers", "layers": "num_hidden_layers", "heads": "num_attention_heads",
            "kv_heads": "num_key_value_heads"}


@dataclass
class StudentSpec:
    """Architecture and initialisation of a student; unset sizes default to the teacher's."""

    num_hidden_layers: int
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    norm: str = "rmsnorm"
    init: str | None = None  # None: extract when the sizes allow it, else random
    teacher_layers: list[int] | None = None
    source: str = field(default="student spec", compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "student spec") -> StudentSpec:
        """Build from a mapping (YAML/JSON); unknown or ill-typed fields are a :class:`UserError`."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a mapping of student fields")
        known = {f for f in cls.__dataclass_fields__ if f != "source"}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = _ALIASES.get(key, key)
            if name not in known:
                raise UserError(f"{source}: unknown field {key!r} (known: {', '.join(sorted(known))})")
            kwargs[name] = value
        if "num_hidden_layers" not in kwargs:
            raise UserError(f"{source}: num_hidden_layers is required")
        for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads"):
            v = kwargs.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UserError(f"{source}: {name} must be a positive integer, got {v!r}")
        if kwargs.get("norm", "rmsnorm") not in NORMS:
            raise UserError(f"{source}: norm must be one of {', '.join(NORMS)}, got {kwargs['norm']!r}")
        if kwargs.get("init") is not None and kwargs["init"] not in INITS:
            raise UserError(f"{source}: init must be one of {', '.join(INITS)}, got {kwargs['init']!r}")
        layers = kwargs.get("teacher_layers")
        if layers is not None and (not isinstance(layers, list)
                                   or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise UserError(f"{source}: teacher_layers must be a list of integers")
        return cls(**kwargs, source=source)

    @classmethod
    def load(cls, path: str | Path) -> StudentSpec:
        """Read a YAML (or JSON) student spec file."""
        from decodetune.io import read_text

        try:
            data = yaml.safe_load(read_text(path))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise UserError(f"{path}{where}: malformed YAML") from None
        return cls.from_dict(data, source=str(path))


def default_teacher_layers(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers, always including the first and the last."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def student_config(teacher_config: Any, spec: StudentSpec) -> Any:
    """The student's LlamaConfig: the teacher's config with the spec's sizes (validated)."""
    from transformers import LlamaConfig

    t = teacher_config
    if getattr(t, "model_type", "llama") not in ("llama", "mistral", "qwen2"):
        raise UserError(f"teacher model_type {t.model_type!r}: students are Llama-architecture; "
                        "use a Llama-family teacher")
    hidden = spec.hidden_size or t.hidden_size
    heads = spec.num_attention_heads or t.num_attention_heads
    kv = spec.num_key_value_heads or (t.num_key_value_heads if spec.num_attention_heads is None else heads)
    inter = spec.intermediate_size or t.intermediate_size
    if hidden % heads:
        raise UserError(f"{spec.source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if heads % kv:
        raise UserError(f"{spec.source}: num_attention_heads {heads} is not divisible by "
                        f"num_key_value_heads {kv}")
    # quantization_config: a GGUF-loaded teacher's would make the student's config.json claim GGUF weights
    base = {k: v for k, v in t.to_dict().items()
            if k not in ("architectures", "model_type", "transformers_version", "_name_or_path",
                         "quantization_config")}
    base.update(num_hidden_layers=spec.num_hidden_layers, hidden_size=hidden, intermediate_size=inter,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                architectures=["LlamaForCausalLM"])
    base.pop("layer_types", None)
    base[NORM_CONFIG_FIELD] = spec.norm
    if spec.norm == "rmsnorm":
        base.pop(NORM_CONFIG_FIELD)
    return LlamaConfig(**base)


def _same_shapes(t: Any, s: Any) -> list[str]:
    names = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    return [n for n in names if getattr(t, n, None) != getattr(s, n, None)]


def build_student(teacher: nn.Module, spec: StudentSpec, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A new student for ``teacher`` (a HF causal LM) and a dict describing how it was made."""
    from transformers import LlamaForCausalLM

    cfg = student_config(teacher.config, spec)
    mismatched = _same_shapes(teacher.config, cfg)
    init = spec.init or ("extract" if not mismatched and spec.num_hidden_layers <= teacher.config.num_hidden_layers
                         else "random")
    n_teacher = teacher.config.num_hidden_layers
    layers: list[int] = []
    if init == "extract":
        if mismatched:
            raise UserError(f"{spec.source}: init: extract copies whole layers, so {', '.join(mismatched)} "
                            "must equal the teacher's; use init: random for other sizes")
        layers = spec.teacher_layers or default_teacher_layers(n_teacher, spec.num_hidden_layers)
        if len(layers) != spec.num_hidden_layers:
            raise UserError(f"{spec.source}: teacher_layers has {len(layers)} entries but "
                            f"num_hidden_layers is {spec.num_hidden_layers}")
        bad = [i for i in layers if not 0 <= i < n_teacher]
        if bad:
            raise UserError(f"{spec.source}: teacher_layers {bad} out of range (teacher has {n_teacher} layers)")
    elif spec.teacher_layers:
        raise UserError(f"{spec.source}: teacher_layers only applies to init: extract")
    torch.manual_seed(seed)
    param = next(teacher.parameters())
    student = LlamaForCausalLM(cfg).to(device=param.device, dtype=param.dtype)
    copied: list[str] = []
    with torch.no_grad():
        if cfg.hidden_size == teacher.config.hidden_size:
            student.get_input_embeddings().weight.copy_(teacher.get_input_embeddings().weight)
            copied.append("embed_tokens")
            if not cfg.tie_word_embeddings:
                student.get_output_embeddings().weight.copy_(teacher.get_output_embeddings().weight)
                copied.append("lm_head")
        if init == "extract":
            t_layers = teacher.get_decoder().layers
            for dst, src in zip(student.get_decoder().layers, layers, strict=True):
                dst.load_state_dict(t_layers[src].state_dict())
            student.get_decoder().norm.load_state_dict(teacher.get_decoder().norm.state_dict())
            copied += [f"layers {layers}", "final norm"]
    swap_norms(student, spec.norm, copy_weight=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    info = {"init": init, "teacher_layers": layers, "copied": copied, "norm": spec.norm,
            "non_embedding_params": non_embedding_params(student),
            "teacher_non_embedding_params": non_embedding_params(teacher)}
    return student, info


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the token embeddings and the LM head (counted once if tied)."""
    skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
            for p in m.parameters()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def load_student(model_dir: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, Any]:
    """Load a saved student (any norm) and its tokenizer from a HF directory; eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise UserError(f"{path}: not a model directory (no config.json)")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the extra norm tensors are expected; patched below
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    model = maybe_patch_norm(model, path)
    if device is not None:
        model = model.to(device)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


def save_student(model: nn.Module, tokenizer: Any, out_dir: str | Path, extra_files: dict[str, bytes] | None = None,
                 overwrite: bool = False) -> Path:
    """Write a HF model directory atomically: build it in a temp dir beside ``out_dir``, then rename.

    ``extra_files`` (name -> bytes) are written inside too (training log, loss curve...). An existing
    ``out_dir`` is replaced only with ``overwrite``; otherwise it is a :class:`UserError`.
    """
    from decodetune.models.layout import save_model_folder

    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_model_folder(model, tmp, tokenizer)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_param_budget(info: dict[str, Any], max_fraction: float) -> None:
    """Raise :class:`UserError` when the student has more than ``max_fraction`` of the teacher's
    non-embedding parameters."""
    ratio = info["non_embedding_params"] / max(1, info["teacher_non_embedding_params"])
    if ratio > max_fraction + 1e-12:
        raise UserError(f"student has {ratio:.3f} of the teacher's non-embedding parameters "
                        f"(limit {max_fraction}); use fewer layers or smaller sizes")


__all__ = ["StudentSpec", "build_student", "load_student", "maybe_patch_norm", "non_embedding_params",
           "save_student", "student_config", "default_teacher_layers", "check_param_budget"]
