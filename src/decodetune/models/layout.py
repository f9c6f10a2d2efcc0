"""Model folders written exactly the way ``save_pretrained`` writes them.

Other engines read the folders we produce, and they are stricter than transformers: vLLM loads the tensor
names it finds in ``model.safetensors`` and does not re-tie embeddings, so a folder that keeps only
``lm_head.weight`` of a tied pair (what ``safetensors.torch.save_model`` keeps) serves nothing but
``<|endoftext|>`` there. So every folder goes through :func:`save_model_folder`: ``save_pretrained`` itself
where transformers allows it, else the same tensor names written by hand.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import torch

from decodetune.errors import UserError


def clear_quantizer(model: Any) -> None:
    """Forget that ``model`` was loaded through a quantizer (GGUF) once its weights are dense.

    transformers refuses ``save_pretrained`` on any model carrying an ``hf_quantizer`` whose method is not
    serialisable (GGUF's never is), even when every weight was de-quantised at load time, and the
    ``quantization_config`` would make config.json claim GGUF weights. Packed weights are refused: saving
    them as dense would be wrong.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if getattr(quantizer, "packed_modules", None):
            raise UserError("model: its weights are still quantized (packed GGUF blocks); "
                            "load it with GgufConfig(dequantize=True) before writing a model folder")
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _tied_kept(model: Any, names: list[str]) -> str:
    """Which of several names sharing one storage save_pretrained keeps: the input embedding's."""
    emb = model.get_input_embeddings()
    wanted = {f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is emb}
    kept = [n for n in names if n in wanted]
    return kept[0] if kept else sorted(names)[0]


def _drop_tied(state: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """Tied copies removed, by transformers' own helper where it has one (transformers >= 5)."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        remove_tied_weights_from_state_dict = None
    if remove_tied_weights_from_state_dict is not None:
        return remove_tied_weights_from_state_dict(state, model)
    groups: dict[Any, list[str]] = collections.defaultdict(list)
    for name, t in state.items():
        groups[(t.device, t.untyped_storage().data_ptr())].append(name)
    drop = {n for names in groups.values() if len(names) > 1 for n in names if n != _tied_kept(model, names)}
    return {k: v for k, v in state.items() if k not in drop}


def pretrained_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes, under its names: ignored keys and tied copies dropped,
    load-time renamings reverted."""
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = _drop_tied(state, model)
    try:
        from transformers.modeling_utils import revert_weight_conversion
    except ImportError:  # transformers 4 renames nothing at load time
        return state
    return revert_weight_conversion(model, state)


def _write_by_hand(model: Any, out: Path) -> None:
    """What save_pretrained writes for an unsharded safetensors model, for when it refuses the model."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in pretrained_state_dict(model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.dtype = str(next(model.parameters()).dtype).split(".")[1]
    model.config.save_pretrained(str(out))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))


def save_model_folder(model: Any, out: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (and ``tokenizer``) into folder ``out`` as ``save_pretrained`` would (safetensors)."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    clear_quantizer(model)
    try:
        model.save_pretrained(str(path), safe_serialization=True)
    except ValueError as e:
        if "serializ" not in str(e):  # only the "quantized ... not serializable" refusal has a way round
            raise
        _write_by_hand(model, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


__all__ = ["clear_quantizer", "pretrained_state_dict", "save_model_folder"]
