"""Words for a study's result: configs as short ``k=v`` text, and the one-sentence headline of the report.

One formatter for configs everywhere (terminal summary, HTML report): ``k=v`` pairs, floats with 3
significant digits, so the same config reads the same in every table. The headline states the test-split
result the way a person decides on it: which config beat the default, by how much (paired difference and
its CI), on how many held-out items, with the p-value the verdict used (Holm-adjusted when several tuned
configs were checked) - or that none did and the default stays.
"""

from __future__ import annotations

import math
from typing import Any

ALPHA = 0.05
#: fields a headline leaves out: the strategy words say them, or they are the task's, not the search's
_UNSAID = {"strategy", "num_beams", "max_new_tokens", "min_new_tokens", "sampler_order", "seed", "stop"}
_STRATEGY_WORDS = {"greedy": "greedy", "beam": "beam search", "sample": "sampling", "beam_sample": "beam sampling"}


def short_value(v: Any) -> str:
    """A value in a config: floats with 3 significant digits, lists joined with '/'."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    if isinstance(v, list | tuple):
        return "/".join(short_value(x) for x in v)
    return str(v)


def short_config(cfg: dict[str, Any] | None) -> str:
    """``strategy=sample, temperature=0.7, top_p=0.9``; '(defaults)' for an empty config."""
    if not cfg:
        return "(defaults)"
    return ", ".join(f"{k}={short_value(v)}" for k, v in cfg.items())


def describe_config(cfg: dict[str, Any] | None) -> str:
    """Plain words: 'beam search, 4 beams', 'sampling, temperature=0.7, top_p=0.9', 'greedy'."""
    cfg = dict(cfg or {})
    strategy = str(cfg.get("strategy", "greedy"))
    words = [_STRATEGY_WORDS.get(strategy, strategy.replace("_", " "))]
    if cfg.get("num_beams") and strategy in ("beam", "beam_sample"):
        words.append(f"{cfg['num_beams']} beams")
    rest = {k: v for k, v in cfg.items() if k not in _UNSAID}
    if rest:
        words.append(short_config(rest))
    return ", ".join(words)


def _p_used(paired: dict[str, Any]) -> float | None:
    """The p-value a verdict uses: Holm's when stored, else the raw one."""
    for key in ("p_holm", "p_value"):
        v = paired.get(key)
        if v is not None and math.isfinite(float(v)):
            return float(v)
    return None


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def headline(final: dict[str, Any] | None, objectives: list[tuple[str, str]]) -> str:
    """'beam search, 4 beams, beat greedy on exact_match by +0.22 [0.06, 0.41] on 32 held-out items
    (p = 0.02)', or 'no config beat the default; keep greedy'. '' without a test-split check."""
    if not final or not final.get("rows") or not objectives:
        return ""
    metric, direction = objectives[0]
    base = next((r for r in final["rows"] if not r.get("vs")), None)
    if base is None:
        return ""
    label = str(base["name"]).split(" (")[0]
    best: tuple[float, dict[str, Any], dict[str, Any], float] | None = None
    for row in final["rows"]:
        if row.get("vs") != base["name"]:
            continue
        paired = (row.get("paired") or {}).get(metric) or {}
        diff, p = paired.get("diff"), _p_used(paired)
        if diff is None or p is None or p >= ALPHA:
            continue
        gain = float(diff) if direction == "max" else -float(diff)
        if gain > 0 and (best is None or gain > best[0]):
            best = (gain, row, paired, p)
    if best is None:
        return f"no config beat the default; keep {label}"
    _, row, paired, p = best
    ci = ""
    if paired.get("ci_low") is not None and paired.get("ci_high") is not None:
        ci = f" [{paired['ci_low']:.2g}, {paired['ci_high']:.2g}]"
    where = "held-out" if final.get("held_out", True) else "kept-out"
    return (f"{describe_config(row.get('config'))} beat {label} on {metric} by {float(paired['diff']):+.2g}{ci} "
            f"on {final.get('n_items')} {where} items ({_p_text(p)})")
