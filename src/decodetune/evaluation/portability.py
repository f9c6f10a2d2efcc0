"""Is a config portable? The same config, items and seeds in two backends, paired item by item.

"Tuned in torch, served by llama.cpp: -0.03 [-0.09, +0.02], p = 0.4": the configs are identical, so a
difference is the engine's (its sampler semantics, its weights, its numerics), measured on the same
items with the same row seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from decodetune.backends import Backend, check_config
from decodetune.evaluation.result import EvalResult
from decodetune.metrics.stats import PairedResult, paired_compare


@dataclass
class Portability:
    """``reference`` is the backend the config was tuned in, ``target`` the one it will be served by."""

    reference: EvalResult
    target: EvalResult
    differences: list[PairedResult]

    def sentence(self, metric: str | None = None) -> str:
        """One line for a person: the paired difference of the primary (or given) metric."""
        name = metric or self.reference.primary
        d = next(p for p in self.differences if p.metric == name)
        return (f"tuned in {self.reference.backend}, served by {self.target.backend}: {name} "
                f"{d.value_a:.4g} -> {d.value_b:.4g}, difference {d.diff:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}], "
                f"p = {d.p_value:.2g} ({d.test}, {d.n_items} items)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"reference": self.reference.to_dict(per_item=False), "target": self.target.to_dict(per_item=False),
                "differences": [dict(p.__dict__) for p in self.differences]}


def verify(config: Any, task: Any, reference: Backend, target: Backend, **kwargs: Any) -> Portability:
    """Evaluate ``config`` in both backends on the same items and seeds; paired differences target - reference.

    Takes :func:`decodetune.eval.evaluate`'s keyword arguments. Both backends' capabilities are checked
    before either generates.
    """
    from decodetune.evaluation.runner import evaluate, resolve_config
    from decodetune.tasks import load_task

    task_obj = load_task(task)
    cfg = resolve_config(config, task_obj)
    check_config(cfg, reference, where="config")
    check_config(cfg, target, where="config")
    ref = evaluate(reference, task_obj, cfg, **kwargs)
    tgt = evaluate(target, task_obj, cfg, **kwargs)
    n_boot, confidence, seed = kwargs.get("bootstrap", 1000), kwargs.get("confidence", 0.95), kwargs.get("seed", 0)
    diffs = [paired_compare(name, ref.scores[name], ref.grid, tgt.scores[name], tgt.grid, n_boot=n_boot,
                            confidence=confidence, seed=seed) for name in ref.metrics]
    return Portability(ref, tgt, diffs)
