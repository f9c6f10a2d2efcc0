"""Rules given as strings that must become token ids: vLLM's ``bad_words`` and llama.cpp's DRY sequence breakers.

The tokenizer comes from :class:`~decodetune.decoding.processors.RowParams` (``from_configs(...,
tokenizer=)``), which defaults to the one set with :func:`use_tokenizer` (``generate`` sets the model's for
the whole call, so beam search and the flat loop see it without passing it around).

``bad_words`` follow vLLM (``SamplingParams.update_from_tokenizer`` and ``v1/sample/ops/bad_words.py``):
each word is tokenized as ``word.lstrip()`` and as ``" " + word.lstrip()`` (the second kept only when it
gives a different first token and the same length), without special tokens; at each step a sequence's
last token is banned when the output's last ``len - 1`` tokens are its prefix (output only, like vLLM:
a bad word starting in the prompt is not caught).

DRY's breakers follow llama.cpp's ``get_overlapping_token_sequences``: every vocabulary token whose text
contains the breaker is a one-token breaker; a token whose text *ends* with a proper prefix of the breaker
is the head of a breaker whose tail is the tokenization of the rest (at most 20 tokens), so breakers that
span tokens are found. Token texts are compared as bytes (byte-level BPE tokens are mapped back to their
bytes, as llama.cpp's detokenizer does); breakers are cut to 40 bytes, as llama.cpp does.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from decodetune.errors import UserError

if TYPE_CHECKING:
    from decodetune.decoding.processors import RowParams, TokenState

_TOKENIZER: contextvars.ContextVar[Any] = contextvars.ContextVar("decodetune_tokenizer", default=None)
#: llama.cpp's limits on breakers: characters (bytes) per breaker and tokens per tail.
MAX_BREAKER_BYTES = 40
MAX_TAIL_TOKENS = 20
_BYTES_CACHE: weakref.WeakKeyDictionary[Any, list[bytes]] = weakref.WeakKeyDictionary()
_BREAKER_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], dict[int, list[tuple[int, ...]]]]] = \
    weakref.WeakKeyDictionary()


@contextlib.contextmanager
def use_tokenizer(tokenizer: Any) -> Iterator[None]:
    """Make ``tokenizer`` the default of :meth:`RowParams.from_configs` inside the ``with`` block."""
    token = _TOKENIZER.set(tokenizer)
    try:
        yield
    finally:
        _TOKENIZER.reset(token)


def current_tokenizer() -> Any:
    """The tokenizer set by :func:`use_tokenizer`, or None."""
    return _TOKENIZER.get()


def _need_tokenizer(rows: RowParams, field: str) -> Any:
    if rows.tokenizer is None:
        raise UserError(f"{field}: needs the model's tokenizer (pass tokenizer= to RowParams.from_configs, "
                        "or decode inside decoding.token_rules.use_tokenizer)")
    return rows.tokenizer


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def bad_word_sequences(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """vLLM's token sequences for ``words`` (see the module doc)."""
    out: list[list[int]] = []
    for word in words:
        for prefix_space in (False, True):
            ids = _encode(tokenizer, (" " if prefix_space else "") + word.lstrip())
            if not ids:
                continue  # vLLM would fail on an empty tokenization; a word of spaces bans nothing here
            if not prefix_space or (out and ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(ids)
    return out


class BadWords:
    """vLLM's bad-words processor, per row (rows grouped by nothing: each row's sequences are checked)."""

    name = "bad_words"

    def active(self, state: TokenState) -> bool:
        return state.rows.active("bad_words")

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        rows = state.rows
        tokenizer = _need_tokenizer(rows, "bad_words")
        per_row = rows.cached("bad_word_ids", lambda: [
            bad_word_sequences(tokenizer, words) if words else [] for words in rows.values["bad_words"]])
        longest = max((len(s) for seqs in per_row for s in seqs), default=1)
        out_lens = state.generated_counts()  # rows may be at different steps: each its own output
        # one small host copy of the output tail: bad words are short and rare
        width = min(longest - 1, max(out_lens, default=0))
        tail = state.history[:, state.length - width: state.length].tolist()
        ban_rows, ban_tokens = [], []
        for i, seqs in enumerate(per_row):
            for seq in seqs:
                prefix = len(seq) - 1
                if prefix > out_lens[i] or seq[-1] >= logits.shape[1]:
                    continue
                if prefix == 0 or tail[i][len(tail[i]) - prefix:] == seq[:-1]:
                    ban_rows.append(i)
                    ban_tokens.append(seq[-1])
        if not ban_rows:
            return logits
        dev = logits.device
        return logits.index_put((torch.tensor(ban_rows, device=dev), torch.tensor(ban_tokens, device=dev)),
                                torch.tensor(float("-inf"), dtype=logits.dtype, device=dev))


def token_bytes(tokenizer: Any) -> list[bytes]:
    """Each token id's text as bytes, as llama.cpp's ``detokenize({id}, special=true)`` gives it."""
    with contextlib.suppress(TypeError):  # some tokenizers cannot be weakly referenced: no cache then
        if tokenizer in _BYTES_CACHE:
            return _BYTES_CACHE[tokenizer]
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "ByteLevel":
        table = {c: b for b, c in _bytes_to_unicode().items()}
        out = [bytes(table[c] for c in p) if p and all(c in table for c in p) else
               tokenizer.decode([i]).encode() for i, p in enumerate(pieces)]
    else:
        out = [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False).encode()
               for i in range(n)]
    with contextlib.suppress(TypeError):
        _BYTES_CACHE[tokenizer] = out
    return out


def dry_breakers(tokenizer: Any, breakers: Sequence[str]) -> dict[int, list[tuple[int, ...]]]:
    """llama.cpp's processed DRY breakers: head token -> the tails (token tuples, () for one-token breakers)."""
    key = tuple(breakers)
    with contextlib.suppress(TypeError):
        cached = _BREAKER_CACHE.setdefault(tokenizer, {})
        if key in cached:
            return cached[key]
    words = token_bytes(tokenizer)
    out: dict[int, list[tuple[int, ...]]] = {}
    for breaker in breakers:
        brk = breaker.encode()[:MAX_BREAKER_BYTES]
        if brk:
            _overlaps(tokenizer, words, brk, out)
    with contextlib.suppress(TypeError):
        _BREAKER_CACHE.setdefault(tokenizer, {})[key] = out
    return out


def _overlaps(tokenizer: Any, words: list[bytes], brk: bytes, out: dict[int, list[tuple[int, ...]]]) -> None:
    """One breaker's entries (llama.cpp's loop over the vocabulary, same order and de-duplication)."""
    first = brk[:1]
    for tid, word in enumerate(words):
        if brk in word:
            _add(out, tid, ())
            continue
        pos = word.find(first)
        while pos >= 0:
            matched = min(len(brk), len(word) - pos)  # the word's suffix from pos is a prefix of the breaker
            if word[pos:pos + matched] == brk[:matched]:
                rest = brk[matched:].decode("utf-8", errors="ignore")
                _add(out, tid, tuple(_encode(tokenizer, rest)[:MAX_TAIL_TOKENS]))
            pos = word.find(first, pos + 1)


def _add(out: dict[int, list[tuple[int, ...]]], tid: int, tail: tuple[int, ...]) -> None:
    tails = out.setdefault(tid, [])
    if tail not in tails:
        tails.append(tail)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE token strings are spelled with it)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}
