"""When a sequence ends, and the text it reports.

A row ends on the first of: one of the model's EOS ids (``finish_reason="eos"``), a stop string
(``"stop"``), or ``max_new_tokens`` tokens (``"length"``). Ending one row never stops the others.

Stop strings are matched on the decoded text (so they work across token boundaries) and only once
``min_new_tokens`` tokens exist: an occurrence counts when it ends after the text of the first
``min_new_tokens`` tokens (as vLLM, which ignores stop strings before ``min_tokens``). The reported text is
cut just *before* the first counted occurrence (vLLM / OpenAI behaviour); the token ids keep every token
generated, including the ones that spelt the stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

FINISH_CODES = ("eos", "stop", "length")


class StopStrings:
    """The stop strings of one config."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, boundary: int = 0) -> int | None:
        """Start of the earliest occurrence that ends after character ``boundary``, or None."""
        best: int | None = None
        for s in self.stops:
            i = text.find(s, max(0, boundary - len(s) + 1))
            if i >= 0 and (best is None or i < best):
                best = i
        return best


class RowStopper:
    """Checks one flat (non-beam) row for its stop strings after each new token."""

    def __init__(self, stops: StopStrings, decode: Callable[[list[int]], str], min_new_tokens: int):
        self.stops = stops
        self.decode = decode
        self.min_new_tokens = min_new_tokens
        self.boundary = 0

    def check(self, token_ids: list[int]) -> int | None:
        """Cut position in ``decode(token_ids)`` if the newest token completed a stop string."""
        if len(token_ids) < self.min_new_tokens:
            return None
        text = self.decode(token_ids)
        if len(token_ids) == self.min_new_tokens and self.min_new_tokens > 0:
            self.boundary = len(text)
            return None
        return self.stops.find(text, self.boundary)


def stop_in_hypothesis(stops: StopStrings, decode: Callable[[list[int]], str], token_ids: list[int],
                       min_new_tokens: int) -> int | None:
    """Stateless version of :class:`RowStopper` for beam hypotheses (whose prefixes get reordered)."""
    if len(token_ids) <= min_new_tokens and min_new_tokens > 0:
        return None
    boundary = len(decode(token_ids[:min_new_tokens])) if min_new_tokens > 0 else 0
    return stops.find(decode(token_ids), boundary)


def final_text(decode: Callable[[list[int]], str], token_ids: list[int], reason: str, cut: int | None,
               eos_token_ids: Sequence[int]) -> str:
    """The text a finished sequence reports: EOS dropped, stop strings cut off."""
    if reason == "eos" and token_ids and token_ids[-1] in eos_token_ids:
        return decode(token_ids[:-1])
    text = decode(token_ids)
    if reason == "stop" and cut is not None:
        return text[:cut]
    return text
