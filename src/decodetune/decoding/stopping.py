"""When a sequence ends, and the text it reports.

A row ends on the first of: one of the model's EOS ids (``finish_reason="eos"``; not with ``ignore_eos``),
one of the config's ``stop_token_ids`` or a stop string (``"stop"``), or ``max_new_tokens`` tokens
(``"length"``). Ending one row never stops the others. A stop token, like EOS, stays in the token ids and
is left out of the text; like stop strings, it counts only once ``min_new_tokens`` tokens exist.

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
    """Checks one flat (non-beam) row for its stop strings after each new token, decoding only a tail.

    A stop string that the newest token completes lies in the last ``len(stop) - 1 + len(newest text)``
    characters of the output; each step decodes just enough of the last tokens to cover that plus
    :attr:`MARGIN` characters (decoding a suffix of the ids can differ from the full text only at its start:
    a character split over the window's first tokens, a leading space a tokenizer strips). Only when a
    stop string shows in that window is the whole output decoded and searched as before, so the result is
    the same as decoding everything at every step, at a cost that no longer grows with the output.
    """

    #: characters decoded beyond what a stop string needs, for a window start decoded differently
    MARGIN = 8

    def __init__(self, stops: StopStrings, decode: Callable[[list[int]], str], min_new_tokens: int):
        self.stops = stops
        self.decode = decode
        self.min_new_tokens = min_new_tokens
        self.boundary = 0
        self.longest = max((len(s) for s in stops.stops), default=0)
        self.window = self.longest + 4  # tokens; doubled whenever their text is too short

    def check(self, token_ids: list[int]) -> int | None:
        """Cut position in ``decode(token_ids)`` if the newest token completed a stop string."""
        if len(token_ids) < self.min_new_tokens:
            return None
        if len(token_ids) == self.min_new_tokens and self.min_new_tokens > 0:
            self.boundary = len(self.decode(token_ids))
            return None
        if not self._in_tail(token_ids):
            return None
        return self.stops.find(self.decode(token_ids), self.boundary)

    def _in_tail(self, token_ids: list[int]) -> bool:
        """Whether some stop string occurs in a decoded tail window long enough to hold a new occurrence."""
        need = self.longest + len(self.decode(token_ids[-1:])) + self.MARGIN
        while True:
            start = max(0, len(token_ids) - self.window)
            text = self.decode(token_ids[start:])
            if start == 0 or len(text) >= need:
                return any(s in text for s in self.stops.stops)
            self.window *= 2


def stop_in_hypothesis(stops: StopStrings, decode: Callable[[list[int]], str], token_ids: list[int],
                       min_new_tokens: int) -> int | None:
    """Stateless version of :class:`RowStopper` for beam hypotheses (whose prefixes get reordered)."""
    if len(token_ids) <= min_new_tokens and min_new_tokens > 0:
        return None
    boundary = len(decode(token_ids[:min_new_tokens])) if min_new_tokens > 0 else 0
    return stops.find(decode(token_ids), boundary)


def final_text(decode: Callable[[list[int]], str], token_ids: list[int], reason: str, cut: int | None,
               eos_token_ids: Sequence[int], *, stop_token: bool = False) -> str:
    """The text a finished sequence reports: EOS dropped, stop strings cut off.

    ``stop_token``: the row ended on one of its ``stop_token_ids``, which stays in the ids, not in the text.
    """
    if stop_token or (reason == "eos" and token_ids and token_ids[-1] in eos_token_ids):
        return decode(token_ids[:-1])
    text = decode(token_ids)
    if reason == "stop" and cut is not None:
        return text[:cut]
    return text
