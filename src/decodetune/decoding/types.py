"""Result type of :func:`decodetune.decoding.generate`."""

from __future__ import annotations

from dataclasses import dataclass

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class Generation:
    """One generated sequence.

    ``token_ids`` are the generated ids only (no prompt). They include the EOS token when the sequence ended
    on one (as transformers' ``generate`` does) and the tokens that completed a stop string; ``text`` never
    contains either: it is decoded without special tokens and cut just *before* the first stop string (as
    vLLM and the OpenAI API do).

    ``logprobs`` (when asked for) are per generated token, the log-softmax of the *raw* model logits, i.e.
    before penalties, temperature and truncation (vLLM's default "raw logprobs").

    ``score`` is the beam score for beam strategies (sum of processed log-probs divided by
    ``length ** length_penalty``, transformers' ``sequences_scores``) and the sum of the raw logprobs
    otherwise.

    ``seed`` is the seed the prompt was decoded with (``config.seed``, the ``seeds=`` override, or a fresh
    random seed recorded here); passing it again reproduces the sequence whatever else is in the batch.
    Sequence ``j`` of a prompt draws its randomness from ``(seed, j)``.

    ``timings`` (seconds): ``prefill_s`` of the batch the row ran in, ``decode_s`` from the end of the
    prefill to the step at which this row finished, ``total_s`` their sum.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str
    timings: dict[str, float]
    prompt_index: int
    sequence_index: int
    num_prompt_tokens: int
    score: float
    seed: int | None = None
    #: generated tokens when ``token_ids`` is not known (chat endpoints return counts, not ids)
    completion_tokens: int | None = None
    #: backend-specific facts about the row (e.g. HTTP latency and usage for a server)
    extra: dict | None = None
    #: with ``config.top_logprobs = N``: per generated token, the N most likely token ids and their raw
    #: logprobs (model distribution before any processor or sampler; vLLM's ``logprobs=N`` without the
    #: chosen token, which ``logprobs`` has), most likely first
    top_logprobs: list[dict[int, float]] | None = None

    @property
    def num_tokens(self) -> int:
        """Number of generated tokens."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.token_ids)
