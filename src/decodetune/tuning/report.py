"""One self-contained HTML report of a study, and the terminal summary, from the storage alone.

Everything comes from the study: trial params/values/user attributes (metrics with CIs, tokens, pruning,
per-item dev scores) and study user attributes written by :func:`decodetune.tuning.tune` (model, task,
objectives, totals, and ``final``: the test-split comparison, dev-to-test gap, minimum detectable effect and
example generations). Both start with the headline (:mod:`decodetune.tuning.headline`), show configs as
short ``k=v`` text, and say which knobs matter (:mod:`decodetune.tuning.importance`). Plots are
Optuna's plotly figures, sized to the page; plotly.js is inlined once, so the page opens offline.
"""

from __future__ import annotations

import html
import math
import warnings
from pathlib import Path
from typing import Any

from decodetune.errors import UserError
from decodetune.io import atomic_write


def load_study(storage: str, study_name: str | None) -> Any:
    """Open a stored study; without a name, the storage's only study. Errors name what exists."""
    import optuna

    from decodetune.tuning.study import resolve_storage

    if "://" not in storage and not Path(storage).exists():
        raise UserError(f"--storage: {storage} does not exist")
    info = resolve_storage(storage, Path("."))
    names = [s.study_name for s in optuna.get_all_study_summaries(info.storage, include_best_trial=False)]
    if study_name is None:
        if len(names) != 1:
            raise UserError(f"--study-name: the storage holds {len(names)} studies"
                            + (f" ({', '.join(names)}); name one" if names else ""))
        study_name = names[0]
    if study_name not in names:
        raise UserError(f"--study-name: no study {study_name!r} in the storage"
                        + (f"; it has {', '.join(names)}" if names else " (it is empty)"))
    return optuna.load_study(study_name=study_name, storage=info.storage)


def _objectives(study: Any) -> list[tuple[str, str]]:
    objs = study.user_attrs.get("objectives") or []
    out = []
    for i, d in enumerate(study.directions):
        name, _, direction = (objs[i] if i < len(objs) else f"objective_{i}").partition(":")
        out.append((name, direction or ("max" if d.name == "MAXIMIZE" else "min")))
    return out


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def _ci(m: dict[str, Any] | None) -> str:
    if not m:
        return "–"
    s = _fmt(m.get("value"))
    if m.get("ci_low") is not None and m.get("ci_high") is not None:
        s += f" [{_fmt(m['ci_low'], 3)}, {_fmt(m['ci_high'], 3)}]"
    return s


def is_pruned(t: Any) -> bool:
    """PRUNED, or (studies written before pruned trials were stored PRUNED) COMPLETE with ``pruned`` set."""
    from optuna.trial import TrialState

    return t.state == TrialState.PRUNED or bool(t.user_attrs.get("pruned"))


def _dev_value(t: Any, objs: list[tuple[str, str]]) -> float:
    """The first objective's dev value: a pruned trial's running mean is in its metrics, not its value."""
    v = (t.user_attrs.get("metrics", {}).get(objs[0][0]) or {}).get("value")
    if v is None and t.values:
        v = t.values[0]
    return float(v) if v is not None and math.isfinite(float(v)) else math.nan


def collect(study: Any) -> dict[str, Any]:
    """Plain data the HTML page and the terminal summary both show."""
    from optuna.trial import TrialState

    from decodetune.tuning.core import best_trials
    from decodetune.tuning.headline import headline
    from decodetune.tuning.objectives import Objective

    objs = _objectives(study)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    winners = best_trials(study, [Objective(n, d) for n, d in objs])
    sign = 1 if objs[0][1] == "max" else -1

    def rank(t: Any) -> tuple[bool, float]:
        v = _dev_value(t, objs)
        return is_pruned(t), (-sign * v if math.isfinite(v) else math.inf)

    attrs = dict(study.user_attrs)
    return {
        "name": study.study_name, "attrs": attrs, "objectives": objs,
        "n_complete": sum(1 for t in done if not is_pruned(t)),
        "n_pruned": sum(1 for t in done if is_pruned(t)),
        "n_failed": sum(1 for t in trials if t.state == TrialState.FAIL),
        "n_running": sum(1 for t in trials if t.state == TrialState.RUNNING),
        "best": winners, "ranked": sorted(done, key=rank), "done": done,
        "failed": [t for t in trials if t.state == TrialState.FAIL],
        "headline": headline(attrs.get("final"), objs), "knobs": _knobs(study),
    }


def _knobs(study: Any) -> list[Any]:
    """Importance and equivalence verdicts per parameter; [] if they can't be computed (never fails a report)."""
    from decodetune.tuning.importance import knob_verdicts

    try:
        return knob_verdicts(study)
    except Exception:  # a report without the table beats no report
        return []


def _trial_row(t: Any, objs: list[tuple[str, str]]) -> list[str]:
    from decodetune.tuning.headline import short_config

    metrics = t.user_attrs.get("metrics", {})
    vals = [_ci(metrics.get(n)) for n, _ in objs]
    flags = f"pruned after {t.user_attrs.get('items_evaluated')} items" if is_pruned(t) else ""
    if t.user_attrs.get("baseline"):
        flags = (flags + "; " if flags else "") + "default config"
    cfg = t.user_attrs.get("config") or t.params
    return [str(t.number), *vals, short_config(cfg), str(t.user_attrs.get("tokens_generated", "")), flags]


def _knob_rows(knobs: list[Any]) -> list[list[str]]:
    """Rows of the which-knobs-matter table (the same in the terminal and the page)."""
    from decodetune.tuning.headline import short_value

    rows = []
    for k in knobs:
        pair = (f"#{k.trial_a} ({short_value(k.value_a)}) vs #{k.trial_b} ({short_value(k.value_b)})"
                if k.trial_a is not None else "no pair differing mainly in it")
        diff = f"{k.diff:+.3g}" if k.diff is not None else "–"
        rows.append([k.param, _fmt(k.importance, 3), k.verdict, pair, diff,
                     f"±{k.margin:.3g}" if k.margin is not None else "–", _fmt(k.p_diff, 3), _fmt(k.p_tost, 3),
                     str(k.n_items or "–")])
    return rows


KNOB_HEADER = ["parameter", "importance (PED-ANOVA)", "verdict", "trials compared", "Δ (b − a)", "margin",
               "p (diff, Holm)", "p (TOST, Holm)", "items"]
_KNOB_NOTE = ("Per parameter: Optuna's PED-ANOVA importance, and the two fully evaluated trials that differ "
              "most in it and least in the rest, compared item by item on the dev split: a paired t-test for a "
              "difference and two one-sided tests (TOST) for equivalence within the margin (2% of the metric's "
              "range), both Holm-corrected over the parameters.")


# ============================================================ terminal
def print_summary(study: Any, console: Any = None, top: int = 8) -> None:
    """The headline, then rich tables: best trials, totals, the test-split comparison, which knobs matter."""
    from rich.console import Console

    console = console or Console()
    d = collect(study)
    objs = d["objectives"]
    if d["headline"]:
        console.print(f"[bold]{d['headline']}[/]", highlight=False)
    header = ["#", *[f"{n} ({dr})" for n, dr in objs], "config", "tokens", "note"]
    print_table(console, f"study {d['name']}: best trials on {d['attrs'].get('dev_split', 'dev')}", header,
                [_trial_row(t, objs) for t in d["ranked"][:top]])
    totals = d["attrs"].get("totals", {})
    console.print(f"trials: {d['n_complete']} complete, {d['n_pruned']} pruned, {d['n_failed']} failed; "
                  f"generated tokens: {totals.get('tokens_generated', 0)}; saved by pruning (est.): "
                  f"{totals.get('tokens_saved_by_pruning', 0)}; rows from cache: {totals.get('cache_hits', 0)}")
    final = d["attrs"].get("final")
    if final:
        header = ["config"]
        for n, _ in objs:
            header += [n, f"Δ {n} vs default [95% CI]", "p (Holm)"]
        rows = []
        for row in final["rows"]:
            cells = [row["name"] + (f" vs {row['vs']}" if row.get("vs") else "")]
            for n, _ in objs:
                p = row.get("paired", {}).get(n, {})
                cells += [_ci(row["metrics"].get(n)), _diff(p), _p_cell(p)]
            rows.append(cells)
        print_table(console, f"{final['split']} split ({final['n_items']} items"
                    + ("" if final.get("held_out", True) else "; not a separate split") + ")", header, rows)
        for name, gap in (final.get("dev_to_test_gap") or {}).items():
            console.print(f"dev-to-test gap of {name}: "
                          + ", ".join(f"{k} {_fmt(v, 3)}" for k, v in gap.items()))
        if (final.get("power") or {}).get("sentence"):
            console.print(final["power"]["sentence"], highlight=False)
    if d["knobs"]:
        print_table(console, f"which knobs matter ({d['attrs'].get('dev_split', 'dev')}, paired per-item scores)",
                    KNOB_HEADER, _knob_rows(d["knobs"]))
    if d["attrs"].get("final_error"):
        console.print(f"[yellow]test-split check failed: {d['attrs']['final_error']}[/]")
    for line in export_lines(d["attrs"]):
        console.print(f"[yellow]{line}[/]", highlight=False)


def print_table(console: Any, title: str, header: list[str], rows: list[list[str]]) -> None:
    """A rich table that breaks cells only between words: a number or ``k=v`` item is never cut in two.

    Each column is at least as wide as its longest word (header included); the room left goes first to
    the columns that then fit on one line, the rest to the column with the most text (the config). When
    even the longest words are wider than the console together (many columns at 80), each row
    is printed as one wrapped line of ``header value`` pairs instead.
    """
    from rich.cells import cell_len
    from rich.markup import escape
    from rich.padding import Padding
    from rich.table import Table

    def longest_word(text: str) -> int:
        return max((cell_len(w) for w in str(text).split()), default=1)

    columns = list(zip(header, *rows, strict=True)) if rows else [(h,) for h in header]
    need = [max(longest_word(c) for c in col) for col in columns]
    want = [max(cell_len(str(c)) for c in col) for col in columns]
    room = console.width - (3 * len(header) + 1)  # a border before each column and after the last, padding 1+1
    if sum(need) > room:
        console.print(f"[italic]{escape(title)}[/]", justify="center", highlight=False)
        for r in rows:
            parts = [f"{h} {c}" for h, c in zip(header[1:], r[1:], strict=True) if str(c).strip()]
            label = ("#" if header[0] == "#" else "") + str(r[0])
            console.print(Padding(f"[bold]{escape(label)}[/]: " + escape("; ".join(parts)), (0, 0, 0, 2)))
        return
    widths = list(need)
    spare = room - sum(widths)
    for i in sorted(range(len(widths)), key=lambda j: want[j] - need[j]):  # short cells on one line first
        grow = min(spare, want[i] - widths[i])
        widths[i] += grow
        spare -= grow
    table = Table(title=title)
    for h, w, m in zip(header, widths, want, strict=True):
        table.add_column(h, width=None if w >= m else w, min_width=w, overflow="fold")
    for r in rows:
        table.add_row(*[escape(str(c)) for c in r])
    console.print(table)


def _p_cell(p: dict[str, Any]) -> str:
    """'0.012' or, when Holm changed it, '0.024 (raw 0.012)'; '' without a paired test."""
    if not p:
        return ""
    raw, adj = p.get("p_value"), p.get("p_holm")
    if adj is None or raw is None or math.isclose(adj, raw):
        return _fmt(raw if raw is not None else adj, 3)
    return f"{_fmt(adj, 3)} (raw {_fmt(raw, 3)})"


def export_lines(attrs: dict[str, Any]) -> list[str]:
    """One line per export of the winner that would behave differently from what the study measured."""
    exports = attrs.get("exports") or {}
    backend = exports.get("backend", attrs.get("backend", "torch"))
    return [f"measured on backend {backend}; export to {e['engine']} changes behaviour: " + "; ".join(e["changes"])
            for e in (exports.get("targets") or {}).values() if not e.get("exact")]


def _diff(p: dict[str, Any]) -> str:
    if not p:
        return ""
    s = f"{p.get('diff', 0):+.3g}"
    if p.get("ci_low") is not None and p.get("ci_high") is not None:
        s += f" [{p['ci_low']:+.3g}, {p['ci_high']:+.3g}]"
    return s


# ============================================================ HTML
def _figures(study: Any, d: dict[str, Any]) -> list[tuple[str, Any]]:
    """(title, plotly figure) pairs; a plot that Optuna can't draw for this study is skipped."""
    import optuna.visualization as vis

    objs = d["objectives"]
    figs: list[tuple[str, Any]] = []

    def add(title: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = fn(*args, **kwargs)
        except Exception as e:  # e.g. importances need 2+ trials that vary a parameter
            figs.append((title, f"not available: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            return
        fig.update_layout(width=None, autosize=True)  # the page width, not a fixed 300 px per slice
        figs.append((title, fig))

    if len(d["done"]) < 1:
        return figs
    multi = len(objs) > 1
    if multi:
        add("Pareto front", vis.plot_pareto_front, study, target_names=[f"{n} ({dr})" for n, dr in objs])
    for i, (name, _) in enumerate(objs):
        kw = {"target": (lambda t, i=i: t.values[i]), "target_name": name} if multi else {"target_name": name}
        add(f"Optimisation history: {name}", vis.plot_optimization_history, study, **kw)
        add(f"Parameter importances: {name}", vis.plot_param_importances, study, **kw)
        add(f"Slice plot: {name}", vis.plot_slice, study, **kw)
        params = _contour_params(study)
        if len(params) >= 2:
            add(f"Contour plot: {name}", vis.plot_contour, study, params=params, **kw)
    return figs


def _contour_params(study: Any, k: int = 3) -> list[str]:
    """The numeric parameters most trials share (contours of conditional parameters are mostly empty)."""
    from collections import Counter

    from optuna.distributions import CategoricalDistribution

    counts: Counter[str] = Counter()
    for t in study.get_trials(deepcopy=False):
        for name, dist in t.distributions.items():
            if not isinstance(dist, CategoricalDistribution):
                counts[name] += 1
    return [n for n, _ in counts.most_common(k)]


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f3f3f3}pre{white-space:pre-wrap;margin:0}
.note{color:#666}h2{margin-top:2em}.headline{font-size:1.25em;font-weight:600;padding:.6em .8em;
background:#eef6ee;border-left:4px solid #3a3}.plotly-graph-div{max-width:100%}table{max-width:100%}
td{overflow-wrap:anywhere}pre.cmd{background:#f6f6f6;padding:.5em .7em;border:1px solid #ddd;
overflow-wrap:anywhere}.right{color:#173;font-weight:600}.wrong{color:#a22;font-weight:600}
tr.disagree td{background:#fffbe8}ul.changes{margin:.3em 0}"""


#: says on <body data-overflow="true|false"> whether the page is wider than the window (the browser test reads it)
_OVERFLOW_SCRIPT = ("<script>function dtOverflow(){document.body.dataset.overflow="
                    "String(document.documentElement.scrollWidth>window.innerWidth)}"
                    "dtOverflow();addEventListener('load',dtOverflow);addEventListener('resize',dtOverflow)</script>")


def _examples_html(examples: list[dict[str, Any]]) -> list[str]:
    """The example generations, where the default and the tuned config disagree first, right ones marked."""
    if not examples:
        return []
    names = list(examples[0]["outputs"])
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["prompt", "reference", *names])
    body = []
    for e in examples:
        cells = [html.escape(e["prompt"]), html.escape(" | ".join(e.get("references") or []))]
        for n in names:
            correct = (e.get("correct") or {}).get(n)
            answer = (e.get("extracted") or {}).get(n)
            score = (e.get("scores") or {}).get(n)
            mark = {True: "<span class=right>✓ right</span>", False: "<span class=wrong>✗ wrong</span>"}.get(
                correct, f"<span class=note>score {_fmt(score, 3)}</span>" if score is not None else "")
            extra = (f" <span class=note>answer: {html.escape(str(answer)) or '(none found)'}</span>"
                     if answer is not None and answer != e["outputs"].get(n) else "")
            cells.append(f"{mark}{extra}<pre>{html.escape(e['outputs'].get(n, ''))}</pre>")
        cls = " class=disagree" if e.get("disagree") else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    n_dis = sum(1 for e in examples if e.get("disagree"))
    note = ""
    if "disagree" in examples[0]:  # studies stored before examples were chosen by disagreement lack it
        note = (f"The answers differ on {n_dis} of these {len(examples)} items (highlighted)"
                + ("." if n_dis == len(examples) else "; on the rest the configs agree (too few items differ)."))
    return ["<h2>Example generations (test split)</h2>",
            f"<p class=note>Items where the default and the tuned config give different answers come first; "
            f"✓ marks an answer the metric scores as right. {note}</p>",
            f"<table id=examples><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"]


def deploy_steps(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """Per export target: its file, whether it is exact, what it drops or changes, and the commands to use it."""
    ex = attrs.get("exports") or {}
    targets = ex.get("targets") or {}
    model = str(attrs.get("model") or "MODEL")
    steps = []
    for target, e in targets.items():
        f = e.get("file")
        cmds = deploy_commands(target, f, model) if f else []
        steps.append({"target": target, "engine": e.get("engine", target), "file": f,
                      "exact": bool(e.get("exact")), "changes": list(e.get("changes") or []), "commands": cmds})
    return steps


#: the llama-server address the curl line talks to (its default port)
LLAMA_SERVER_URL = "http://localhost:8080"
#: the name the Ollama commands give the tuned model
OLLAMA_NAME = "decodetune-tuned"


def deploy_commands(target: str, f: str, model: str) -> list[str]:
    """The shell / Python lines that run the study's ``model`` with export file ``f`` of ``target``."""
    import shlex

    q = shlex.quote(f)
    gguf = model if model.endswith(".gguf") else "MODEL.gguf"
    if target == "llamacpp":
        return [f"llama-cli -m {shlex.quote(gguf)} $(cat {q})", f"llama-server -m {shlex.quote(gguf)} $(cat {q})"]
    if target == "llamacpp_server":  # the file is the request body's sampling fields; the prompt is added
        return [f"llama-server -m {shlex.quote(gguf)} &",
                f"jq --arg prompt \"$PROMPT\" '. + {{prompt: $prompt}}' {q} | curl -s {LLAMA_SERVER_URL}/completion "
                "-H 'Content-Type: application/json' -d @-"]
    if target == "ollama":  # the Modelfile says FROM MODEL: point it at the model first
        if model.endswith(".gguf"):
            tuned = shlex.quote(str(Path(f).with_name("Modelfile.tuned")))
            point = f"sed 's|^FROM .*|FROM {model}|' {q} > {tuned}"
        else:
            tuned, point = q, f"# edit the FROM MODEL line of {q}: a GGUF file or an Ollama model name"
        return [point, f"ollama create {OLLAMA_NAME} -f {tuned}", f"ollama run {OLLAMA_NAME}"]
    if target == "vllm":
        return ["import json; from vllm import LLM, SamplingParams",
                f"params = SamplingParams(**json.load(open({f!r})))",
                f"LLM(model={model!r}).generate(prompts, params)"]
    if target == "hf":
        folder = str(Path(f).parent)
        return ["from transformers import GenerationConfig",
                f"gen = GenerationConfig.from_pretrained({folder!r})  # reads {Path(f).name}",
                "model.generate(**inputs, generation_config=gen)",
                f"# or make it the model's default: cp {q} MODEL_DIR/generation_config.json"]
    if target == "openai":
        return ["import json; from openai import OpenAI",
                f"params = json.load(open({f!r}))",
                f"OpenAI(base_url=URL).chat.completions.create(model={model!r}, messages=messages, **params)"]
    return []


def verify_command(attrs: dict[str, Any]) -> str:
    """The portability check: ``decodetune verify`` of the winner in another engine than the study's."""
    import shlex

    ex = attrs.get("exports") or {}
    backend = str(ex.get("backend") or attrs.get("backend") or "torch")
    best = ex.get("best_config") or str(Path(ex.get("out") or "OUT") / "best_config.json")
    model = str(attrs.get("model") or "MODEL")
    target = "torch" if backend == "llamacpp" else "llamacpp"
    against = backend if backend in ("torch", "llamacpp", "vllm") else "torch"
    cmd = ["decodetune", "verify", "--backend", target]
    if target == "llamacpp" and not model.endswith(".gguf"):
        cmd += ["--model", "MODEL.gguf", "--against-model", model]
    else:
        cmd += ["--model", model]
    if against != "torch":
        cmd += ["--against", against]
    cmd += ["--config", best, "--task", str(attrs.get("task") or "T")]
    return " ".join(shlex.quote(c) for c in cmd)


def _what_next_html(attrs: dict[str, Any]) -> list[str]:
    steps = deploy_steps(attrs)
    if not steps:
        return []
    backend = (attrs.get("exports") or {}).get("backend", attrs.get("backend", "torch"))
    parts = ["<h2 id=what-next>What next: deploy the winner</h2>",
             f"<p>Every score above was measured on backend <b>{html.escape(str(backend))}</b>. Each engine gets "
             "its own file; an export that cannot say exactly the same config sits in "
             "<code>exports/approximate/</code> and names below every field it drops or changes.</p>"]
    if (attrs.get("exports") or {}).get("best_config"):
        parts.append(f"<p>The config itself: <code>{html.escape(attrs['exports']['best_config'])}</code></p>")
    for st in steps:
        parts.append(f"<h3>{html.escape(st['engine'])}</h3>")
        if st["file"]:
            parts.append(f"<p>file: <code>{html.escape(st['file'])}</code> &mdash; "
                         + ("exact: the same config, nothing dropped or changed" if st["exact"] else
                            "<b>approximate</b>: it behaves differently from what the study measured") + "</p>")
        else:
            parts.append("<p><b>no file</b>: the export failed</p>")
        if st["changes"]:
            parts.append("<ul class=changes>" + "".join(f"<li>{html.escape(c)}</li>" for c in st["changes"])
                         + "</ul>")
        if st["commands"]:
            parts.append(f"<pre class=cmd>{html.escape(chr(10).join(st['commands']))}</pre>")
    parts.append("<h3>Portability check</h3><p>Re-score the winner in the serving engine, paired item by item "
                 "against the engine it was tuned in, before relying on an export:</p>"
                 f"<pre class=cmd id=verify>{html.escape(verify_command(attrs))}</pre>")
    return parts


def render_html(study: Any) -> str:
    """The report page as a string (plotly.js inlined once)."""
    from plotly.offline import get_plotlyjs

    d = collect(study)
    a, objs = d["attrs"], d["objectives"]
    totals = a.get("totals", {})
    from decodetune.tuning.headline import short_config

    parts = [f"<h1>decodetune study {html.escape(d['name'])}</h1>"]
    if d["headline"]:
        parts.append(f"<p class=headline id=headline>{html.escape(d['headline'])}</p>")
    info = [["model", str(a.get("model", ""))], ["backend (measured every score)", str(a.get("backend", "torch"))],
            ["task", str(a.get("task", ""))],
            ["search", str(a.get("search", ""))], ["objectives", ", ".join(f"{n} ({dr})" for n, dr in objs)],
            ["dev items", str(a.get("n_dev_items", ""))], ["repeats", str(a.get("repeats", ""))],
            ["trials", f"{d['n_complete']} complete, {d['n_pruned']} pruned, {d['n_failed']} failed"],
            ["generated tokens", str(totals.get("tokens_generated", ""))],
            ["tokens saved by pruning (estimate)", str(totals.get("tokens_saved_by_pruning", ""))],
            ["rows served from the cache", str(totals.get("cache_hits", ""))]]
    parts.append(_table(["what", "value"], info))
    if d["best"]:
        title = "Best config" if len(objs) == 1 else "Pareto-optimal configs"
        parts.append(f"<h2>{title} (dev)</h2>")
        parts.append(_table(["#", *[n for n, _ in objs], "config", "tokens", "note"],
                            [_trial_row(t, objs) for t in d["best"]]))
    final = a.get("final")
    parts.append("<h2>Held-out test split: tuned vs defaults</h2>")
    if final:
        if not final.get("held_out", True):
            parts.append("<p class=note>The task has one split; the tuner kept half of it out of the search.</p>")
        header = ["config", "vs"]
        for n, _ in objs:
            header += [f"{n} [95% CI]", f"Δ {n} [95% CI]", "p-value (Holm)", "test"]
        rows = []
        for row in final["rows"]:
            cells = [f"{row['name']}: {short_config(row['config'])}", row.get("vs") or "–"]
            for n, _ in objs:
                p = row.get("paired", {}).get(n, {})
                cells += [_ci(row["metrics"].get(n)), _diff(p), _p_cell(p),
                          str(p.get("test", "")) if p else ""]
            rows.append(cells)
        parts.append(f"<p>{final['n_items']} items of split {html.escape(final['split'])}, never seen by the "
                     "search. Δ is the paired difference on the same items and seeds.</p>")
        parts.append(_table(header, rows))
        gap_rows = [[name, ", ".join(f"{k}: dev − test = {_fmt(v, 3)}" for k, v in gap.items())]
                    for name, gap in (final.get("dev_to_test_gap") or {}).items()]
        if (final.get("power") or {}).get("sentence"):
            parts.append(f"<p id=power>{html.escape(final['power']['sentence'])} (paired, two-sided alpha "
                         f"{final['power'].get('alpha', 0.05)}, power {final['power'].get('power', 0.8)}).</p>")
        parts.append("<h3>Dev-to-test gap</h3>" + _table(["config", "gap"], gap_rows))
        parts.extend(_examples_html(final.get("examples") or []))
    else:
        parts.append("<p class=note>No test-split check stored"
                     + (f": {html.escape(a['final_error'])}" if a.get("final_error") else "") + ".</p>")
    if d["knobs"]:
        parts.append("<h2>Which knobs matter</h2>")
        parts.append(f"<p class=note>{_KNOB_NOTE}</p>")
        parts.append(_table(KNOB_HEADER, _knob_rows(d["knobs"])))
    parts.extend(_what_next_html(a))
    parts.append("<h2>Plots</h2>")
    for title, fig in _figures(study, d):
        parts.append(f"<h3>{html.escape(title)}</h3>")
        if isinstance(fig, str):
            parts.append(f"<p class=note>{html.escape(fig)}</p>")
        else:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
    parts.append("<h2>All trials</h2>")
    parts.append(_table(["#", *[n for n, _ in objs], "config", "tokens", "note"],
                        [_trial_row(t, objs) for t in d["ranked"]]))
    if d["failed"]:
        parts.append("<h2>Failed trials</h2>")
        parts.append(_table(["#", "error"], [[str(t.number), str(t.user_attrs.get("error", ""))]
                                            for t in d["failed"]]))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>decodetune report: {html.escape(d['name'])}</title><style>{_CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts) + _OVERFLOW_SCRIPT + "</body></html>")


def write_report(study: Any, path: str | Path) -> Path:
    """Write the HTML report atomically; returns its path."""
    page = render_html(study)
    with atomic_write(path) as f:
        f.write(page)
    return Path(path)
