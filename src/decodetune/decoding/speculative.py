"""Speculative decoding at batch 1: a draft proposes ``k`` tokens, the target checks them in one forward.

Entry: ``generate(model, prompts, config, draft_model=..., num_draft_tokens=4)`` or
``generate(..., prompt_lookup_num_tokens=k)`` (:func:`generate_speculative`). ``draft_model`` is what
transformers calls ``assistant_model``: anything :func:`decodetune.models.load_model` accepts (a builtin
name, a folder such as a ``decodetune distill`` student, a LoadedModel), sharing the target's tokenizer.
``prompt_lookup_num_tokens`` is transformers' prompt-lookup decoding: the draft is the continuation of the
most recent earlier occurrence of the sequence's last n-gram (n = 3, 2, 1) in prompt + output.

Each round: the draft proposes ``x_1..x_k`` (each from its distribution ``q_i``); the target runs once on
``[last token, x_1..x_k]`` and gives ``p_1..p_{k+1}``, where ``p`` and ``q`` are the *full processed*
distributions, after the config's processors and samplers, exactly what the plain engine draws from.

* greedy: ``x_i`` is accepted while it is the argmax of ``p_i``; the first mismatch is replaced by that
  argmax, and when all are accepted ``argmax p_{k+1}`` is added. Token-exact against plain greedy in
  fp32. A bf16 or int8 target rounds differently in a (k+1)-token forward than in one-token steps
  (accumulation order; int8's activation scales), so there greedy can part where two tokens nearly tie;
  the draft's precision never matters.
* sampling (Leviathan et al. 2023, Chen et al. 2023): ``x_i`` is accepted with probability
  ``min(1, p_i(x_i) / q_i(x_i))``; the first rejected one is replaced by a draw from
  ``norm(max(0, p_i - q_i))``, and when all are accepted a bonus token is drawn from ``p_{k+1}``. Every
  token is then distributed exactly as under plain sampling. With prompt lookup ``q_i`` is a point mass.

Randomness comes from the row's own generator (``row_seed(seed, sequence_index)``), so a (prompt, config,
seed, draft, k) gives the same tokens every time, but not the tokens the plain engine draws with that seed:
the same distribution, another stream.

Scope: greedy and sample configs, one row at a time; the processors and samplers that depend only on the
tokens so far. Others (beams, contrastive, mirostat, XTC, stop_token_ids, ignore_eos, top_logprobs) are
refused naming the field. Every :class:`Generation` carries ``extra["speculative"]``: proposed and
accepted draft tokens, the acceptance rate and the target / draft forward counts.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from decodetune.config import DecodingConfig
from decodetune.decoding.fast_linear import fast_linears
from decodetune.decoding.processors import RowParams, TokenState, apply_processors
from decodetune.decoding.runner import ModelRunner
from decodetune.decoding.sampler import apply_samplers, draw, make_generator, row_seed
from decodetune.decoding.stopping import RowStopper, StopStrings, final_text
from decodetune.decoding.token_rules import use_tokenizer
from decodetune.decoding.types import Generation
from decodetune.errors import UserError

#: Draft tokens per round with a draft model when ``num_draft_tokens`` is not given.
DEFAULT_NUM_DRAFT_TOKENS = 4
#: Longest and shortest n-gram that prompt lookup matches (longest first).
PROMPT_LOOKUP_NGRAMS = (3, 2, 1)
#: Config fields the speculative path honours; any other field away from its default is refused.
SUPPORTED_FIELDS = frozenset({
    "strategy", "max_new_tokens", "min_new_tokens", "stop", "temperature", "top_k", "top_p", "min_p",
    "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "no_repeat_ngram_size", "num_return_sequences", "seed", "sampler_order", "logit_bias", "bad_words",
    "penalty_last_n", "top_n_sigma", "dynatemp_range", "dynatemp_exponent", "dry_multiplier", "dry_base",
    "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers",
})
_DEFAULT = DecodingConfig()


@dataclass
class SpecStats:
    """What one sequence's speculation did."""

    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    def to_dict(self) -> dict[str, float]:
        """The counts and the acceptance rate, for ``Generation.extra["speculative"]``."""
        return {**dataclasses.asdict(self), "acceptance_rate": self.acceptance_rate}


def generate_speculative(model: Any, prompts: Any, config: DecodingConfig | Sequence[DecodingConfig] | None = None,
                         *, seeds: Sequence[int | None] | None = None, logprobs: bool = False,
                         draft_model: Any = None, num_draft_tokens: int | None = None,
                         prompt_lookup_num_tokens: int | None = None) -> list[Generation]:
    """Like :func:`decodetune.decoding.generate`, one row at a time with a draft model or prompt lookup.

    Give ``draft_model`` (with ``num_draft_tokens``, default :data:`DEFAULT_NUM_DRAFT_TOKENS`) or
    ``prompt_lookup_num_tokens``, not both. Returns a flat list in prompt order, n entries for n sequences.
    """
    from decodetune.decoding import engine  # its argument checks; imported here (engine imports this module)

    lm = engine._resolve_model(model)
    prompts = engine._check_prompts(prompts)
    configs = engine._check_configs(config, len(prompts))
    seeds = engine._check_seeds(seeds, len(prompts))
    for c in configs:
        check_config(c)
    drafter = _drafter(lm, draft_model, num_draft_tokens, prompt_lookup_num_tokens)
    out: list[Generation] = []
    draft = drafter[0].model if isinstance(drafter, tuple) else None
    with (torch.inference_mode(), use_tokenizer(lm.tokenizer), fast_linears(lm.model),
          fast_linears(draft) if draft is not None else nullcontext()):
        for i, (prompt, cfg, seed) in enumerate(zip(prompts, configs, seeds, strict=True)):
            ids = lm.encode(prompt)
            if not ids:
                raise UserError(f"prompts[{i}]: encodes to no tokens")
            seed = seed if seed is not None else cfg.seed
            if seed is None and cfg.is_sampling:
                import secrets

                seed = secrets.randbits(63)
            for j in range(cfg.num_return_sequences):
                out.append(_Row(lm, drafter, ids, cfg, seed, i, j).run(logprobs))
    return out


def check_config(cfg: DecodingConfig) -> None:
    """Refuse, naming the field, what the speculative path does not do."""
    if cfg.strategy not in ("greedy", "sample"):
        raise UserError(f"strategy: speculative decoding runs greedy and sample configs, got {cfg.strategy!r}")
    for f in dataclasses.fields(DecodingConfig):
        if f.name not in SUPPORTED_FIELDS and getattr(cfg, f.name) != getattr(_DEFAULT, f.name):
            raise UserError(f"{f.name}: not supported with speculative decoding (draft_model / "
                            "prompt_lookup_num_tokens); drop it or decode without speculation")


def _drafter(lm: Any, draft_model: Any, num_draft_tokens: int | None, lookup: int | None) -> Any:
    if draft_model is not None and lookup is not None:
        raise UserError("draft_model: give a draft model or prompt_lookup_num_tokens, not both")
    if lookup is not None:
        if num_draft_tokens is not None:
            raise UserError("num_draft_tokens: is for draft_model; prompt lookup drafts prompt_lookup_num_tokens")
        return PromptLookup(_positive("prompt_lookup_num_tokens", lookup))
    if draft_model is None:
        raise UserError("draft_model: speculative decoding needs draft_model or prompt_lookup_num_tokens")
    from decodetune.models import load_model

    k = _positive("num_draft_tokens", DEFAULT_NUM_DRAFT_TOKENS if num_draft_tokens is None else num_draft_tokens)
    draft = load_model(draft_model)
    if draft.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
        raise UserError(f"draft_model: {draft.name!r} has another tokenizer than the target {lm.name!r}; a draft "
                        "must share the target's vocabulary (a decodetune distill student does)")
    return draft, k


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name}: must be a positive integer, got {value!r}")
    return value


class _Causal:
    """One causal LM at batch 1 over its own KV cache: feed tokens, get float32 logits, crop back."""

    def __init__(self, model: Any):
        self.runner = ModelRunner(model)
        self.model = model
        self.cache = self.runner.new_cache()
        self.length = 0  # tokens in the cache
        self.forwards = 0

    def feed(self, ids: Sequence[int], keep: int = 1) -> torch.Tensor:
        """Run ``ids`` after the cached tokens; the float32 logits of the last ``keep`` positions."""
        r, device, n = self.runner, self.runner.device, len(ids)
        kwargs: dict[str, Any] = {r.cache_kwarg: self.cache, "use_cache": True}
        if r.keep_kwarg is not None:
            kwargs[r.keep_kwarg] = keep
        if r.takes_positions:
            kwargs["position_ids"] = torch.arange(self.length, self.length + n, device=device).unsqueeze(0)
        mask = torch.ones((1, self.length + n), dtype=torch.long, device=device)
        out = self.model(input_ids=torch.tensor([list(ids)], device=device), attention_mask=mask, **kwargs)
        self.length += n
        self.forwards += 1
        return out.logits[0, -keep:, :].float()  # reduced-precision weights: processors see float32

    def crop(self, length: int) -> None:
        """Forget every cached token after the first ``length``."""
        if length < self.length:
            # a negative count removes that many tokens in transformers 4 and 5 alike (5 refuses a size)
            self.cache.crop(length - self.length)
            self.length = length


class PromptLookup:
    """Prompt-lookup drafting: the tokens that followed the latest earlier match of the last n-gram."""

    def __init__(self, k: int):
        self.k = k

    def propose(self, seq: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens continuing ``seq`` (none when no n-gram of it occurred before)."""
        n_seq = len(seq)
        for n in PROMPT_LOOKUP_NGRAMS:
            if n >= n_seq:
                continue
            tail = seq[-n:]
            for start in range(n_seq - n - 1, -1, -1):  # the latest match first
                if seq[start:start + n] == tail:
                    return seq[start + n:start + n + k]
        return []


class _Row:
    """One sequence decoded speculatively."""

    def __init__(self, lm: Any, drafter: Any, ids: list[int], cfg: DecodingConfig, seed: int | None,
                 prompt_index: int, sequence_index: int):
        self.lm, self.ids, self.cfg, self.seed = lm, ids, cfg, seed
        self.prompt_index, self.sequence_index = prompt_index, sequence_index
        self.lookup = drafter if isinstance(drafter, PromptLookup) else None
        self.draft, self.k = (None, drafter.k) if self.lookup else (_Causal(drafter[0].model), drafter[1])
        self.target = _Causal(lm.model)
        self.eos = list(lm.eos_token_ids)
        self.eos_set = frozenset(self.eos)
        self.device = self.target.runner.device
        self.params = RowParams.from_configs([cfg], self.device)
        self.sampling = bool(self.params.sampling[0])
        self.gen = make_generator(row_seed(seed, sequence_index), self.device) if self.sampling else None
        self.stopper = RowStopper(StopStrings(cfg.stop), lm.decode, cfg.min_new_tokens) if cfg.stop else None
        self.stats = SpecStats()
        self.tokens: list[int] = []
        self.lps: list[float] = []

    def run(self, want_logprobs: bool) -> Generation:
        """Decode to the end; the :class:`Generation` with the speculation stats in ``extra``."""
        t0 = time.perf_counter()
        if len(self.ids) > 1:  # the last prompt token is fed with the first round's drafts
            self.target.feed(self.ids[:-1])
        prefill_s = time.perf_counter() - t0
        self.state = TokenState([self.ids], self.cfg.max_new_tokens, _out_width(self.target.model), self.params,
                                self.eos, self.device)
        reason, cut = None, None
        while reason is None:
            reason, cut = self._round()
        decode_s = time.perf_counter() - t0 - prefill_s
        self.stats.target_forwards = self.target.forwards - (len(self.ids) > 1)
        self.stats.draft_forwards = self.draft.forwards if self.draft is not None else 0
        text = final_text(self.lm.decode, self.tokens, reason, cut, self.eos)
        return Generation(text=text, token_ids=list(self.tokens), logprobs=list(self.lps) if want_logprobs else None,
                          finish_reason=reason, timings={"prefill_s": prefill_s, "decode_s": decode_s,
                                                         "total_s": prefill_s + decode_s},
                          prompt_index=self.prompt_index, sequence_index=self.sequence_index,
                          num_prompt_tokens=len(self.ids), score=float(sum(self.lps)), seed=self.seed,
                          extra={"speculative": self.stats.to_dict()})

    # ---- one round

    def _round(self) -> tuple[str | None, int | None]:
        """Propose, verify, commit; returns (finish reason, stop cut) once the row has ended."""
        room = self.cfg.max_new_tokens - len(self.tokens)
        seq = self.ids + self.tokens
        drafts, qs = self._propose(seq, min(self.k, room - 1))
        logits = self.target.feed([seq[-1], *drafts], keep=len(drafts) + 1)
        new = self._verify(logits, drafts, qs)
        self.stats.proposed += len(drafts)
        self.stats.accepted += len(new) - 1
        # the cache keeps the prompt, the accepted tokens, not the replacement / bonus token (fed next round)
        self.target.crop(len(seq) + len(new) - 1)
        if self.draft is not None:
            self.draft.crop(len(seq) + len(new) - 1)
        return self._commit(new, logits)

    def _propose(self, seq: list[int], k: int) -> tuple[list[int], list[torch.Tensor | None]]:
        """Draft tokens and, from a draft model while sampling, each one's distribution q."""
        if k <= 0:
            return [], []
        if self.lookup is not None:
            drafts = self.lookup.propose(seq, k)
            return drafts, [None] * len(drafts)
        assert self.draft is not None
        state = self._clone_state()
        width = state.vocab_size
        drafts: list[int] = []
        qs: list[torch.Tensor | None] = []
        logits = self.draft.feed(seq[self.draft.length:])
        while True:
            scores = apply_processors(_fit(logits, width), state)
            if self.sampling:
                q = apply_samplers(scores, self.params).softmax(dim=1)
                tok = int(draw(q, [self.gen])[0])  # type: ignore[list-item]
                qs.append(q[0])
            else:
                tok = int(scores.argmax(dim=1)[0])
                qs.append(None)
            drafts.append(tok)
            if len(drafts) == k or tok in self.eos_set:  # nothing after an EOS can be accepted
                return drafts, qs
            state.append(torch.tensor([tok], device=self.device))
            logits = self.draft.feed([tok])

    def _verify(self, logits: torch.Tensor, drafts: list[int], qs: list[torch.Tensor | None]) -> list[int]:
        """The accepted draft tokens plus one token from the target (replacement or bonus)."""
        state = self._clone_state()
        accepted: list[int] = []
        for i in range(len(drafts) + 1):
            scores = apply_processors(logits[i:i + 1], state)
            if not self.sampling:
                tok = int(scores.argmax(dim=1)[0])
                if i < len(drafts) and tok == drafts[i]:
                    accepted.append(tok)
                    state.append(torch.tensor([tok], device=self.device))
                    continue
                return [*accepted, tok]
            p = apply_samplers(scores, self.params).softmax(dim=1)[0]
            if i == len(drafts):
                return [*accepted, self._draw(p)]  # every draft accepted: the bonus token
            x, q = drafts[i], qs[i]
            qx = 1.0 if q is None else float(q[x])
            u = float(torch.rand(1, generator=self.gen, dtype=torch.float64, device=self.device))
            if u * qx < float(p[x]):  # accept with probability min(1, p(x) / q(x))
                accepted.append(x)
                state.append(torch.tensor([x], device=self.device))
                continue
            if q is None:  # point mass: the residual is p without x
                residual = p.clone()
                residual[x] = 0
            else:
                residual = (p - q).clamp_(min=0)
            if float(residual.sum()) <= 0:  # p == q up to rounding: rejection had probability ~0
                residual = p
            return [*accepted, self._draw(residual)]
        raise AssertionError("unreachable: the last position always returns")

    def _draw(self, weights: torch.Tensor) -> int:
        return int(draw(weights.unsqueeze(0), [self.gen])[0])  # type: ignore[list-item]

    def _clone_state(self) -> TokenState:
        """A copy of the committed token state to run ahead on (the row parameters shared, not copied)."""
        return copy.deepcopy(self.state, memo={id(self.state.rows): self.state.rows})

    def _commit(self, new: list[int], logits: torch.Tensor) -> tuple[str | None, int | None]:
        """Append the round's tokens up to the first that ends the row."""
        logp = logits.log_softmax(dim=1)
        for i, tok in enumerate(new):
            self.tokens.append(tok)
            self.lps.append(float(logp[i, tok]))
            self.state.append(torch.tensor([tok], device=self.device))
            if tok in self.eos_set:
                return "eos", None
            if self.stopper is not None and (cut := self.stopper.check(self.tokens)) is not None:
                return "stop", cut
            if len(self.tokens) >= self.cfg.max_new_tokens:
                return "length", None
        return None, None


def _out_width(model: Any) -> int:
    """Width of the model's logits: its LM head's outputs (a quantised head has them too)."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or model.config.vocab_size)


def _fit(logits: torch.Tensor, width: int) -> torch.Tensor:
    """A draft's logits over the target's vocabulary width (ids it lacks get -inf, extra ids are cut)."""
    if logits.shape[1] == width:
        return logits
    if logits.shape[1] > width:
        return logits[:, :width]
    pad = logits.new_full((logits.shape[0], width - logits.shape[1]), float("-inf"))
    return torch.cat([logits, pad], dim=1)
