"""Where synonym replacement and insertion get their words: a user's table, or the model's own suggestions.

Nothing is downloaded: EDA used WordNet (an nltk download); here the words come either from a table the
user supplies (TSV or JSON) or from the causal LM itself, which is asked which words fit a masked slot
(contextual augmentation, Kobayashi 2018). The LM proposes words that *fit the context*; these are often but
not always synonyms (an antonym fits a context too) -- filters and a look at the output are the safeguard.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import re
from pathlib import Path
from typing import Any, Protocol

from decodetune.errors import UserError
from decodetune.io import read_text
from decodetune.train.augment.text import STOP_WORDS, WordText, match_case


class SynonymSource(Protocol):
    """What the synonym and insertion ops need from a source of words."""

    def replacement(self, doc: WordText, i: int, rng: random.Random) -> str | None:
        """A word to put in place of word ``i`` (case already matched), or None if there is none."""

    def insertion(self, doc: WordText, rng: random.Random) -> tuple[int, str] | None:
        """A ``(slot, word)`` to insert, or None if the source has nothing to offer for this text."""

    def can_replace(self, word: str) -> bool:
        """Whether :meth:`replacement` may have something for this word (cheap check, no model call)."""


class SynonymTable:
    """Synonyms from a table: ``word -> [synonyms]``, looked up case-insensitively.

    Replacement follows the replaced word's case (``Quick`` -> ``Fast``). Insertion is EDA's: a synonym
    of a random word of the text, put at a random position.
    """

    def __init__(self, table: dict[str, list[str]]):
        self.table: dict[str, list[str]] = {}
        for word, syns in table.items():
            key = word.strip().lower()
            merged = self.table.setdefault(key, [])
            for s in syns:
                s = s.strip()
                if s and s.lower() != key and s not in merged:
                    merged.append(s)

    @classmethod
    def load(cls, path: str | Path) -> SynonymTable:
        """Read a ``.json`` object (``{"word": ["syn", ...]}``) or a TSV (``word<TAB>syn<TAB>syn...``)."""
        p = Path(path)
        text = read_text(p)
        if p.suffix.lower() == ".json":
            return cls(_parse_json_table(text, p))
        return cls(_parse_tsv_table(text, p))

    def synonyms(self, word: str) -> list[str]:
        """The synonyms of ``word`` (case-insensitive), possibly empty."""
        return self.table.get(word.lower(), [])

    def can_replace(self, word: str) -> bool:
        """True when the table has an entry for ``word``."""
        return bool(self.synonyms(word))

    def replacement(self, doc: WordText, i: int, rng: random.Random) -> str | None:
        """A random synonym of word ``i``, in its case."""
        syns = self.synonyms(doc.words[i])
        return match_case(doc.words[i], rng.choice(syns)) if syns else None

    def insertion(self, doc: WordText, rng: random.Random) -> tuple[int, str] | None:
        """EDA insertion: a synonym of a random non-stop word, at a random slot."""
        candidates = [w for w in doc.words if w.lower() not in STOP_WORDS and self.synonyms(w)]
        if not candidates:
            return None
        syn = rng.choice(self.synonyms(rng.choice(candidates)))
        return rng.randint(0, len(doc.words)), syn


def _parse_json_table(text: str, path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object mapping words to lists of synonyms")
    table: dict[str, list[str]] = {}
    for word, syns in data.items():
        if isinstance(syns, str):
            syns = [syns]
        if not isinstance(syns, list) or not all(isinstance(s, str) for s in syns):
            raise UserError(f"{path}: entry {word!r} must be a string or a list of strings")
        table[word] = syns
    return table


def _parse_tsv_table(text: str, path: Path) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) < 2 or not cols[0] or not any(cols[1:]):
            raise UserError(f"{path}:{lineno}: expected 'word<TAB>synonym[<TAB>synonym...]'")
        table.setdefault(cols[0], []).extend(c for c in cols[1:] if c)
    return table


_ALPHA = re.compile(r"[A-Za-z]{2,}")


class LMSuggestions:
    """Words the causal LM finds likely in a masked slot, re-ranked with the text after the slot.

    For a slot between ``prefix`` and ``suffix``: the ``top_k`` most likely next tokens after ``prefix``
    that are whole alphabetic words (single tokens, not stop words, not the word being replaced) are
    candidates; the best ``rescore`` of them are re-scored by ``log p(word, next window tokens | prefix)``,
    so the words after the slot have a say (a causal LM cannot see them otherwise). The prefix is run once
    and its KV cache shared by the candidates. A word is drawn from the softmax of those scores with the op's
    own RNG. Results are cached per slot, so ``n`` variants of a row cost one pass per slot.
    The first word of a text is never replaced and nothing is inserted before it: with no left context,
    the model's guesses there are mostly word fragments.
    """

    def __init__(self, model: Any, top_k: int = 50, rescore: int = 6, window: int = 6):
        from decodetune.models import load_model

        self.loaded = load_model(model)
        self.top_k = top_k
        self.rescore = rescore
        self.window = window
        self._cache: dict[tuple[str, str, str], list[tuple[str, float]]] = {}
        self._vocab: tuple[Any, Any, Any, list[str]] | None = None
        params = inspect.signature(self.loaded.model.forward).parameters
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name is deprecated)
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def new_cache(self) -> Any:
        """An empty KV cache for the model (``DynamicCache``)."""
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.loaded.model.config)
        except TypeError:  # transformers < 4.56 takes no config
            return DynamicCache()

    # --------------------------------------------------------------------- SynonymSource
    def can_replace(self, word: str) -> bool:
        """Alphabetic, non-stop words can be replaced."""
        return bool(_ALPHA.fullmatch(word)) and word.lower() not in STOP_WORDS

    def replacement(self, doc: WordText, i: int, rng: random.Random) -> str | None:
        """A context-fitting word for slot ``i``, in the case of the word it replaces (None for a first word
        with nothing before it: there the model only guesses word fragments such as "Ne" or "Ad")."""
        if not any(c.isalnum() for c in doc.before(i)):
            return None
        cands = self.suggest(doc.before(i), doc.after(i), exclude=doc.words[i])
        return match_case(doc.words[i], _draw(cands, rng)) if cands else None

    def insertion(self, doc: WordText, rng: random.Random) -> tuple[int, str] | None:
        """A word that fits a random slot after the first word."""
        n = len(doc.words)
        if n == 0:
            return None
        slot = rng.randint(1, n)
        if slot < n:  # new word, a space, then word `slot` (see WordText.insert)
            prefix, suffix = doc.before(slot), " " + doc.words[slot] + doc.after(slot)
        else:  # last word, a space, the new word, then the trailing gap
            prefix, suffix = doc.before(n - 1) + doc.words[n - 1] + " ", doc.gaps[n]
        cands = self.suggest(prefix, suffix, exclude="")
        return (slot, _draw(cands, rng)) if cands else None

    # --------------------------------------------------------------------- scoring
    def suggest(self, prefix: str, suffix: str, exclude: str) -> list[tuple[str, float]]:
        """Candidate words for the slot between ``prefix`` and ``suffix``, best first, with their scores."""
        key = (prefix, suffix, exclude.lower())
        if key not in self._cache:
            self._cache[key] = self._suggest(prefix, suffix, exclude.lower())
        return self._cache[key]

    def prefix_ids(self, head: str) -> list[int]:
        """Token ids of the text before a slot (a start token when it is empty or has none)."""
        tok = self.loaded.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = list(tok(head, add_special_tokens=True)["input_ids"]) if head else []
        return ids if ids and ids[0] == start else [int(start), *ids]

    def _suggest(self, prefix: str, suffix: str, exclude: str) -> list[tuple[str, float]]:
        import torch

        tok, model = self.loaded.tokenizer, self.loaded.model
        space_mask, bare_mask, cap_mask, words = self._vocabulary()
        head = prefix.rstrip()
        spaced = len(head) < len(prefix)
        ids = self.prefix_ids(head)
        cache = self.new_cache()
        with torch.inference_mode():
            out = model(torch.tensor([ids], device=self.loaded.device), use_cache=True, **{self._cache_kwarg: cache})
        last = out.logits[0, -1].float()
        # with nothing before the slot only capitalised pieces (lowercase ones there are fragments, "ke")
        allowed = (space_mask if spaced else bare_mask if head.strip() else cap_mask).to(last.device)
        masked = last.masked_fill(~allowed, float("-inf"))
        picked: list[int] = []
        for tid in torch.topk(masked, min(self.top_k, int(allowed.sum()))).indices.tolist():
            word = words[tid]
            if word.lower() == exclude or word.lower() in STOP_WORDS or any(words[p] == word for p in picked):
                continue
            picked.append(tid)
            if len(picked) == self.rescore:
                break
        if not picked:
            return []
        suffix_ids = list(tok(suffix, add_special_tokens=False)["input_ids"])[: self.window] if suffix else []
        scores = self.continuation_logprobs(cache, last, picked, suffix_ids)
        return sorted(((words[t], sc) for t, sc in zip(picked, scores, strict=True)), key=lambda t: -t[1])

    def continuation_logprobs(self, cache: Any, last_logits: Any, token_ids: list[int],
                              suffix_ids: list[int]) -> list[float]:
        """``log p(token, *suffix_ids | prefix)`` for each candidate token, from the prefix's KV cache and its
        last logits (the cache is expanded in place, one copy per candidate)."""
        import torch

        first = torch.log_softmax(last_logits, dim=-1)[token_ids]
        if not suffix_ids:
            return first.tolist()
        dev = self.loaded.device
        cont = torch.tensor([[t, *suffix_ids] for t in token_ids], device=dev)
        cache.batch_repeat_interleave(len(token_ids))
        past = cache.get_seq_length()
        mask = torch.ones((len(token_ids), past + cont.shape[1]), dtype=torch.long, device=dev)
        with torch.inference_mode():
            logits = self.loaded.model(cont, attention_mask=mask, use_cache=True,
                                       **{self._cache_kwarg: cache}).logits.float()
        rest = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, cont[:, 1:, None])[..., 0].sum(dim=1)
        return (first + rest).tolist()

    def _vocabulary(self) -> tuple[Any, Any, Any, list[str]]:
        """Per token id: is it ``" word"``, ``"word"``, ``"Word"``, and the word (decoded once per model)."""
        if self._vocab is None:
            import torch

            tok = self.loaded.tokenizer
            size = int(self.loaded.model.get_output_embeddings().weight.shape[0])
            special = set(getattr(tok, "all_special_ids", []) or [])
            space = torch.zeros(size, dtype=torch.bool)
            bare = torch.zeros(size, dtype=torch.bool)
            words = [""] * size
            for tid in range(min(size, len(tok))):
                if tid in special:
                    continue
                text = tok.decode([tid])
                if text.startswith(" ") and _ALPHA.fullmatch(text[1:]):
                    space[tid] = True
                    words[tid] = text[1:]
                elif _ALPHA.fullmatch(text):
                    bare[tid] = True
                    words[tid] = text
            cap = bare & torch.tensor([w[:1].isupper() for w in words], dtype=torch.bool)
            self._vocab = (space, bare, cap, words)
        return self._vocab


def _draw(cands: list[tuple[str, float]], rng: random.Random) -> str:
    """A word drawn from the softmax of the candidates' log-probabilities."""
    top = max(s for _, s in cands)
    weights = [math.exp(s - top) for _, s in cands]
    return rng.choices([w for w, _ in cands], weights=weights, k=1)[0]
