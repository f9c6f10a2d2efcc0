"""Training data for distillation: prompt rows, completions (given, teacher-generated, or sampled from
the student on-policy), tokenisation and padding.

Rows are plain dicts ``{"prompt": str | messages, "completion": str (optional), "_line": int}`` so that
other parts (data augmentation) can transform them: :func:`prepare_rows` accepts an optional
``augment(rows) -> rows`` callable.

Sampling goes through :func:`sample_completions`, which uses ``decodetune.decoding.generate`` when that
package is installed and a small plain-torch sampler otherwise (greedy / temperature / top-k / top-p /
min-p, one seeded generator per row so that a row's tokens do not depend on the rest of the batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decodetune.config import DecodingConfig
from decodetune.errors import UserError

Row = dict[str, Any]
Augment = Callable[[list[Row]], list[Row]]


@dataclass
class Example:
    """One training/eval sequence: prompt token ids, completion token ids, and its row index."""

    prompt_ids: list[int]
    completion_ids: list[int]
    index: int


def load_rows(spec: str, split: str = "dev") -> list[Row]:
    """Prompt rows from a JSONL file (``prompt`` and optional ``completion``, or ``text``) or a task
    (a builtin name or anything else ``decodetune.tasks.load_task`` accepts, e.g. a CSV file).

    For a task, each item's prompt is used and its first reference becomes the row's ``completion``
    (used only with ``--source data``).
    """
    from decodetune.io import read_jsonl

    path = Path(spec)
    if path.suffix == ".jsonl":
        rows = []
        for row in read_jsonl(path):
            line = row.get("_line")
            if "prompt" not in row and "text" not in row:
                raise UserError(f"{path}:{line}: a row needs a 'prompt' (and optional 'completion') or a 'text'")
            prompt = row.get("prompt", "")
            completion = row.get("completion", row.get("text") if "prompt" not in row else None)
            if not isinstance(prompt, str | list):
                raise UserError(f"{path}:{line}: 'prompt' must be a string or a list of chat messages")
            if completion is not None and not isinstance(completion, str):
                raise UserError(f"{path}:{line}: 'completion' must be a string")
            rows.append({"prompt": prompt, "completion": completion, "_line": line})
        if not rows:
            raise UserError(f"{path}: no rows")
        return rows
    try:
        from decodetune.tasks import load_task
    except ImportError:
        raise UserError(f"--data {spec}: no such file, and task loading (decodetune.tasks) is not "
                        "installed") from None
    task = load_task(spec)
    rows = []
    for i, item in enumerate(task.items(split)):
        refs = list(getattr(item, "references", []) or [])
        rows.append({"prompt": item.prompt, "completion": refs[0] if refs else None, "_line": i + 1,
                     "id": str(getattr(item, "id", i))})
    if not rows:
        raise UserError(f"task {spec}: split {split!r} has no items")
    return rows


def prepare_rows(rows: list[Row], augment: Augment | None = None) -> list[Row]:
    """Apply an optional augmentation ``augment(rows) -> rows`` (e.g. from decodetune.train.augment)."""
    if augment is None:
        return list(rows)
    out = augment(list(rows))
    if not isinstance(out, list) or not all(isinstance(r, dict) and "prompt" in r for r in out):
        raise UserError("augment must return a list of rows with a 'prompt' each")
    return out


def completion_to_ids(tokenizer: Any, text: str, eos_id: int | None) -> list[int]:
    """Token ids of a completion text, ending with EOS (the student learns to stop)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids + [eos_id] if eos_id is not None else ids


def eos_id_of(loaded: Any) -> int | None:
    """The EOS id appended to completions: the tokenizer's, else the model's first."""
    tok_eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        return int(tok_eos)
    return loaded.eos_token_ids[0] if loaded.eos_token_ids else None


def make_example(prompt_ids: list[int], completion_ids: list[int], index: int, max_length: int) -> Example:
    """Truncate to ``max_length`` tokens: the prompt keeps at most half (its end), the completion the rest.

    An empty prompt (a plain ``text`` row without BOS) borrows the completion's first token, which has
    nothing to be predicted from.
    """
    if not prompt_ids:
        prompt_ids, completion_ids = completion_ids[:1], completion_ids[1:]
    if len(prompt_ids) + len(completion_ids) > max_length:
        prompt_ids = prompt_ids[-max(1, min(len(prompt_ids), max_length // 2)):]
        completion_ids = completion_ids[: max_length - len(prompt_ids)]
    return Example(list(prompt_ids), list(completion_ids), index)


# --------------------------------------------------------------------------------------------- sampling
def sample_completions(loaded: Any, prompts: Sequence[Any], config: DecodingConfig, seeds: Sequence[int],
                       engine: str = "auto", batch_size: int = 16) -> list[list[int]]:
    """One completion (token ids, EOS appended when the model stopped) per prompt.

    ``engine``: ``auto`` uses ``decodetune.decoding.generate`` when importable, else the plain sampler;
    ``plain`` forces the plain sampler.
    """
    config = config.replace(num_return_sequences=1) if config.num_return_sequences != 1 else config
    eos = set(loaded.eos_token_ids)
    if engine == "auto":
        try:
            from decodetune.decoding import generate
        except ImportError:
            generate = None
        if generate is not None:
            gens = generate(loaded, list(prompts), config, seeds=list(seeds), batch_size=batch_size)
            out = []
            for g in gens:
                ids = list(g.token_ids)
                if g.finish_reason == "eos" and (not ids or ids[-1] not in eos):
                    ids.append(eos_id_of(loaded))
                out.append(ids)
            return out
    if config.is_beam:
        raise UserError("beam search for distillation data needs decodetune.decoding (not installed)")
    prompt_ids = [loaded.encode(p) for p in prompts]
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        out += plain_sample(loaded.model, prompt_ids[start:start + batch_size], config,
                            list(seeds[start:start + batch_size]), sorted(eos), loaded.tokenizer.pad_token_id)
    return out


def _pick(logits: torch.Tensor, config: DecodingConfig, gen: torch.Generator) -> int:
    if not config.is_sampling or config.temperature == 0:
        return int(logits.argmax())
    logits = logits / config.temperature
    if config.top_k and config.top_k < logits.numel():
        kth = torch.topk(logits, config.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if config.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= config.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    if config.min_p > 0:
        probs = probs.masked_fill(probs < config.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


@torch.no_grad()
def plain_sample(model: Any, prompt_ids: list[list[int]], config: DecodingConfig, seeds: list[int],
                 eos_ids: list[int], pad_id: int | None) -> list[list[int]]:
    """Batched left-padded sampling with a KV cache; each row draws from its own seeded generator."""
    device = next(model.parameters()).device
    pad = 0 if pad_id is None else int(pad_id)
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    cache_kw, cache = _cache_of(model, out)
    results: list[list[int]] = [[] for _ in prompt_ids]
    done = [False] * len(prompt_ids)
    eos = set(eos_ids)
    for step in range(config.max_new_tokens):
        logits = out.logits[:, -1, :].float().cpu()
        nxt = []
        for i in range(len(prompt_ids)):
            if done[i]:
                nxt.append(pad)
                continue
            if step < config.min_new_tokens and eos:
                logits[i, list(eos)] = float("-inf")
            tok = _pick(logits[i], config, gens[i])
            results[i].append(tok)
            done[i] = tok in eos
            nxt.append(tok)
        if all(done) or step + 1 == config.max_new_tokens:
            break
        step_ids = torch.tensor(nxt, device=device).unsqueeze(1)
        attn = torch.cat([attn, torch.ones_like(step_ids)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=step_ids, attention_mask=attn, position_ids=pos, use_cache=True,
                    **{cache_kw: cache})
        cache = _cache_of(model, out)[1]
    return results


def _cache_of(model: Any, out: Any) -> tuple[str, Any]:
    """(keyword, cache object): transformers 5 calls the KV cache ``cache``, 4.x ``past_key_values``."""
    cache = getattr(out, "cache", None)
    if cache is not None:
        return "cache", cache
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError(f"{type(model).__name__} returned no KV cache")
    return "past_key_values", cache


# --------------------------------------------------------------------------------------------- batching
def collate(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded batch. ``target_mask[b, t]`` is True where position t predicts a completion token;
    ``labels`` are those tokens, flattened in (b, t) order (aligned with ``logits[target_mask]``)."""
    width = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    ids = torch.full((len(examples), width), int(pad_id), dtype=torch.long)
    attn = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for b, e in enumerate(examples):
        seq = e.prompt_ids + e.completion_ids
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
        if e.completion_ids:
            target[b, len(e.prompt_ids) - 1: len(seq) - 1] = True
    labels = ids[:, 1:][target[:, :-1]]
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "target_mask": target.to(device),
            "labels": labels.to(device)}


def completion_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``(N, V)`` at the completion positions only: the LM head runs on those rows alone,
    which saves most of its cost (the vocabulary projection dominates small students)."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[batch["target_mask"]])


class TeacherLogitCache:
    """In-memory teacher logits at completion positions, per example (fp32, ``tokens x vocab``).

    Off-policy data does not change between epochs or between runs on the same data, so the teacher's
    forward pass can be paid once. Memory is ``4 * vocab`` bytes per completion token (about 200 kB
    for a 49k vocabulary): meant for small data sets and for benchmarks comparing several students.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def key(e: Example) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(e.prompt_ids), tuple(e.completion_ids)

    def logits(self, model: Any, batch: dict[str, torch.Tensor], examples: Sequence[Example],
               store: bool = True) -> torch.Tensor:
        """The teacher's completion logits for ``batch`` (built from ``examples`` by :func:`collate`)."""
        keys = [self.key(e) for e in examples]
        if all(k in self._store for k in keys):
            return torch.cat([self._store[k] for k in keys]).to(batch["input_ids"].device)
        with torch.no_grad():
            out = completion_logits(model, batch)
        if store:
            parts = out.detach().float().cpu().split([len(e.completion_ids) for e in examples])
            for k, part in zip(keys, parts, strict=True):
                self._store[k] = part.clone()
        return out
