"""`decodetune generate`: decode prompts with one DecodingConfig."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from decodetune.cli.backend_options import backend_options, with_model_flags
from decodetune.cli.options import build_config, config_options
from decodetune.errors import UserError


@config_options
@backend_options
def generate_command(
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="prompt text (repeatable)"),  # noqa: UP045
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="builtin name, HF folder, .gguf or hub id"),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="JSONL with 'prompt' or 'messages' per line"),  # noqa: UP045,A002
    output: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--output", "--out", "-o", metavar="FILE", help="write generations as JSONL here"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
    logprobs: bool = typer.Option(False, "--logprobs", help="include per-token logprobs of chosen tokens"),
    raw: bool = typer.Option(False, "--raw", help="send text as-is, without the chat template"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow model code from the hub"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="rows per forward batch"),  # noqa: UP045
    *,
    config_flags: dict[str, Any],
    backend: Any,
) -> None:
    """Generate text for prompts with any decoding strategy."""
    from decodetune.cli.eval_cmd import inline_config
    from decodetune.io import check_output_path

    check_output_path(output, "--output")  # before the model loads, not after all the generation
    if prompt and input is not None:
        raise UserError("--prompt, --input: give --prompt or --input, not both")
    config = build_config(inline_config(config_flags))
    rows = _read_prompts(prompt, input)
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size: must be >= 1, got {batch_size}")

    from decodetune.backends import Request, check_config, open_backend
    from decodetune.backends.capabilities import static_capabilities

    options = with_model_flags(backend, raw=raw, trust_remote_code=trust_remote_code)
    _check_static(config, options.name, static_capabilities(options.name))  # before the model loads
    engine = open_backend(model, options)
    check_config(config, engine)
    if logprobs and not engine.capabilities().logprobs:
        raise UserError(f"--logprobs: backend {engine.name!r} does not return logprobs")
    prompts = [r["messages"] if "messages" in r else r["prompt"] for r in rows]
    from decodetune.evaluation.candidates import generate_selected

    # a candidate strategy (self_consistency, mbr, best_of_n) prints its selected candidate
    gens = generate_selected(engine, [Request(p, config, config.seed) for p in prompts], logprobs=logprobs,
                             batch_size=batch_size, progress=len(prompts) > 4 or config.max_new_tokens > 128)
    records = []
    for g in gens:
        row = rows[g.prompt_index]
        rec: dict[str, Any] = {"id": row.get("id", g.prompt_index), "sequence_index": g.sequence_index,
                               "text": g.text, "finish_reason": g.finish_reason,
                               "num_tokens": g.num_tokens, "token_ids": g.token_ids}
        if logprobs:
            rec["logprobs"] = g.logprobs
        rec["timings"] = g.timings
        records.append(rec)
    if output is not None:
        from decodetune.io import write_jsonl

        write_jsonl(output, [{**{k: v for k, v in rows[r_i].items() if k != "_line"}, **rec}
                             for r_i, rec in ((g.prompt_index, rec) for g, rec in zip(gens, records, strict=True))])
        print(f"wrote {len(records)} generations to {output}", file=sys.stderr)
    if as_json:
        print(json.dumps({"config": config.to_dict(only_set=True), "generations": records}, ensure_ascii=False))
    elif output is None:
        for rec in records:
            if len(records) > 1:
                print(f"--- {rec['id']} [{rec['finish_reason']}, {rec['num_tokens']} tokens]")
            print(rec["text"])


def _check_static(config: Any, name: str, caps: Any) -> None:
    from decodetune.backends import unsupported

    problems = unsupported(config, caps)
    if problems:
        field, why = problems[0]
        raise UserError(f"config: {field}: backend {name!r} cannot run this config ({why})")


def _read_prompts(prompt: list[str] | None, input_path: Path | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, p in enumerate(prompt or [], start=1):
        if not p.strip():
            raise UserError(f"--prompt #{i}: empty prompt")
        rows.append({"id": i - 1, "prompt": p})
    if input_path is not None:
        from decodetune.io import read_jsonl

        for row in read_jsonl(input_path):
            line = row["_line"]
            if "messages" in row:
                msgs = row["messages"]
                if not isinstance(msgs, list) or not msgs or not all(
                        isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
                    raise UserError(f"{input_path}:{line}: 'messages' must be a non-empty list of "
                                    "{role, content} objects")
            elif not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise UserError(f"{input_path}:{line}: missing or empty 'prompt' (or 'messages') field")
            rows.append(row)
    if not rows:
        raise UserError("prompts: empty prompt list (give --prompt or a non-empty --input file)")
    return rows


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("generate", help="Generate text for prompts with any decoding strategy.")(generate_command)
