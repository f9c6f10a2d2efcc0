"""The backend seam: one small protocol that evaluation, tuning, the estimator and the CLI talk to.

A backend is an engine that turns (prompt, DecodingConfig, seed) requests into
:class:`~decodetune.decoding.types.Generation` objects: our torch engine, llama.cpp in-process, any
OpenAI-compatible server, or vLLM's offline ``LLM``. Each declares its :class:`Capabilities` (which
strategies and config fields it honours, its sampler order, whether seeds reproduce), so that a config
it cannot run is refused *before* any generation, naming the field and the backend.

In the spirit of llama.cpp's ``llama_sampler_i``: few methods, the same for every engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from decodetune.config import TORCH_ONLY_STRATEGIES, DecodingConfig, candidate_config
from decodetune.decoding.types import Generation
from decodetune.errors import UserError

# what "off" means per field, and whether a field is in use: one definition, shared with the exporters
from decodetune.export import BEAM_FIELDS, NEUTRAL, PENALTIES, SAMPLING_FIELDS, active, stage_active

__all__ = ["BEAM_FIELDS", "NEUTRAL", "SAMPLING_FIELDS", "Backend", "Capabilities", "Request", "active",
           "check_config", "order_differs", "requests_of", "sequence_seed", "unsupported"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do.

    ``fields``: the DecodingConfig fields it honours when set away from their neutral value
    (``max_new_tokens`` and ``strategy`` are always honoured). ``sampler_order``: the fixed order in which
    it applies the distribution samplers, or None when it follows each config's ``sampler_order``.
    ``reproducible_seeds``: the same seed gives the same tokens. ``mirostat_alone``: see the field.
    ``notes``: semantics that differ from the torch engine's, per field, shown in summaries and reports.
    """

    strategies: frozenset[str]
    fields: frozenset[str]
    sampler_order: tuple[str, ...] | None = None
    reproducible_seeds: bool = True
    logprobs: bool = True
    token_ids: bool = True
    mixed_configs: bool = True
    n_candidates: bool = True
    #: with mirostat on, the engine runs logit_bias -> temperature -> mirostat only (llama.cpp), so the
    #: penalties and DRY set beside it are refused
    mirostat_alone: bool = False
    notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in studies and reports)."""
        return {"strategies": sorted(self.strategies), "fields": sorted(self.fields),
                "sampler_order": list(self.sampler_order) if self.sampler_order else None,
                "reproducible_seeds": self.reproducible_seeds, "logprobs": self.logprobs,
                "token_ids": self.token_ids, "n_candidates": self.n_candidates, "notes": dict(self.notes)}


@dataclass
class Request:
    """One prompt to decode with one config; ``seed`` None means a fresh random seed."""

    prompt: Any
    config: DecodingConfig
    seed: int | None = None


@runtime_checkable
class Backend(Protocol):
    """An engine that generates for decodetune. See the module docstring."""

    #: engine name: torch | llamacpp | openai | vllm
    name: str
    #: the model as the user named it (study names, reports)
    model_name: str

    def identity(self) -> str:
        """Engine + version + model weights (or served model): the generation cache's model key."""
        ...

    def capabilities(self) -> Capabilities:
        """What this backend honours."""
        ...

    def render(self, prompt: Any) -> list[int] | str | list[dict[str, str]]:
        """What the engine will see for ``prompt``: token ids after the chat template where known."""
        ...

    def generate(self, requests: Sequence[Request], *, logprobs: bool = False, batch_size: int | None = None,
                 progress: bool = False) -> list[Generation]:
        """Decode every request; a flat list in request order (``prompt_index`` = request index)."""
        ...

    def default_config(self) -> DecodingConfig | None:
        """The model's own generation defaults (e.g. its ``generation_config.json``), if any."""
        ...

    def close(self) -> None:
        """Release the engine (threads, sockets, contexts)."""
        ...


def order_differs(cfg: DecodingConfig, fixed: Sequence[str]) -> bool:
    """True if the config's order of *active* samplers differs from a backend's fixed order.

    top_k commutes with temperature (it ranks logits, which temperature does not reorder), so only the
    order of the samplers that read tempered probabilities is compared.
    """
    mine = [s for s in cfg.full_sampler_order if stage_active(cfg, s) and s != "top_k"]
    theirs = [s for s in fixed if stage_active(cfg, s) and s != "top_k"]
    return set(mine) == set(theirs) and mine != theirs


def unsupported(cfg: DecodingConfig, caps: Capabilities) -> list[tuple[str, str]]:
    """``(field, why)`` for each thing in ``cfg`` that a backend with ``caps`` cannot honour.

    A candidate strategy (self_consistency, mbr, best_of_n) runs wherever the backend returns n sequences
    and honours the sampling config its candidates are drawn with (:func:`candidate_config`).
    """
    if cfg.is_candidate:
        return _unsupported_candidates(cfg, caps)
    out: list[tuple[str, str]] = []
    if cfg.strategy not in caps.strategies:
        where = ("it runs on the torch engine only" if cfg.strategy in TORCH_ONLY_STRATEGIES
                 else f"it has {', '.join(sorted(caps.strategies))}")
        out.append(("strategy", f"strategy {cfg.strategy!r} is not available ({where})"))
    for name in NEUTRAL:  # every field but the structural ones: a new field is refused until a backend lists it
        if name in caps.fields or not active(cfg, name):
            continue
        if name == "num_return_sequences" and caps.n_candidates:
            continue
        out.append((name, f"{name}={getattr(cfg, name)!r} is not supported"))
    if caps.sampler_order is not None and cfg.is_sampling and order_differs(cfg, caps.sampler_order):
        out.append(("sampler_order", f"its sampler order is fixed ({' -> '.join(caps.sampler_order)})"))
    if caps.mirostat_alone and cfg.is_sampling and active(cfg, "mirostat"):
        out += [(name, f"{name}={getattr(cfg, name)!r} with mirostat: its mirostat chain is logit_bias -> "
                       "temperature -> mirostat, no penalties")
                for name in (*PENALTIES, "dry_multiplier") if active(cfg, name)]
    return out


def _unsupported_candidates(cfg: DecodingConfig, caps: Capabilities) -> list[tuple[str, str]]:
    if not caps.n_candidates:
        return [("strategy", f"strategy {cfg.strategy!r} needs {cfg.num_candidates} candidates per prompt, "
                             "and it returns one sequence per request")]
    out = unsupported(candidate_config(cfg), caps)
    if cfg.strategy == "best_of_n" and cfg.rerank == "mean_logprob" and not caps.logprobs:
        out.append(("rerank", "rerank='mean_logprob' needs token logprobs, which it does not return"))
    return out


def check_config(cfg: DecodingConfig, backend: Backend, where: str = "config") -> None:
    """Raise one :class:`UserError` naming the first field ``backend`` cannot honour."""
    problems = unsupported(cfg, backend.capabilities())
    if problems:
        name, why = problems[0]
        raise UserError(f"{where}: {name}: backend {backend.name!r} cannot run this config ({why})")


def sequence_seed(seed: int, sequence_index: int) -> int:
    """The uint32 seed of sequence ``sequence_index`` of a prompt decoded with ``seed``.

    Sequence 0 uses the row's seed itself, so an exported ``--seed S`` / ``"seed": S`` reproduces it in
    the engine; the other candidates get seeds derived from (seed, j).
    """
    if sequence_index == 0:
        return seed & 0xFFFFFFFF
    digest = hashlib.blake2b(f"{seed}:{sequence_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def requests_of(prompts: Sequence[Any], configs: Sequence[DecodingConfig],
                seeds: Sequence[int | None]) -> list[Request]:
    """Zip parallel lists into requests (the evaluation's rows)."""
    return [Request(p, c, s) for p, c, s in zip(prompts, configs, seeds, strict=True)]
