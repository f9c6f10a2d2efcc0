"""Generate the builtin tasks' data with fixed seeds: ``python -m decodetune.tasks.builtin_data``.

The shipped files under ``tasks/data/`` are exactly what this module writes (a test regenerates them and
compares), so the data is reproducible and owes nothing to any outside data set. Dev and test items are
drawn from one shuffled pool without replacement, so the two splits never share an item.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
SPLIT_SIZES = {"dev": 150, "test": 150}
STORY_SPLIT_SIZES = {"dev": 100, "test": 100}

# ----------------------------------------------------------------------------------------------- arith
ARITH_PROMPT = "What is {a} {op} {b}? Answer with just the number."


def arith_rows(seed: int = 1234) -> list[dict[str, Any]]:
    """All distinct a+b and a-b (a >= b) questions with operands 0..20, shuffled."""
    rows = []
    for a in range(21):
        for b in range(21):
            rows.append({"a": a, "op": "+", "b": b, "answer": str(a + b)})
            if a >= b:
                rows.append({"a": a, "op": "-", "b": b, "answer": str(a - b)})
    random.Random(seed).shuffle(rows)
    for r in rows:
        r["prompt"] = ARITH_PROMPT.format(**r)
    return rows


# ----------------------------------------------------------------------------------------------- story
NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Nora", "Max", "Lily", "Ben", "Ruby", "Finn", "Ella", "Omar",
         "Ivy", "Kai", "Rosa", "Theo", "Lena", "Jack"]
CHARACTERS = ["a curious fox", "an old sailor", "a shy robot", "a little dragon", "a young baker",
              "a clumsy wizard", "a brave mouse", "a retired astronaut", "a lonely lighthouse keeper",
              "a talking cat", "a forgetful inventor", "a travelling musician", "a tiny elephant",
              "a night-shift nurse", "a stubborn goat", "a gentle giant"]
PLACES = ["in a quiet village by the sea", "at the edge of a dark forest", "in a busy city full of lights",
          "on a small island far away", "in a castle high in the mountains", "in a cottage next to a river",
          "on a farm with red barns", "in a desert town", "under a big old bridge", "on a spaceship near Mars"]
EVENTS = ["found a strange key buried in the sand", "heard a knock at the door at midnight",
          "received a letter with no name on it", "saw a light blinking in the sky",
          "discovered a map hidden inside a book", "met a stranger who knew their name",
          "woke up to find the whole world covered in snow", "lost the most precious thing they owned",
          "decided to build something nobody had ever seen", "followed a trail of glowing footprints"]
STORY_PROMPT = "Continue this story:\n\n{name} was {character} who lived {place}. One day, {name} {event}."


def story_rows(seed: int = 4321) -> list[dict[str, Any]]:
    """Story openings: every (name, character, place, event) combination, shuffled."""
    rows = [{"name": n, "character": c, "place": p, "event": e}
            for n in NAMES for c in CHARACTERS for p in PLACES for e in EVENTS]
    rng = random.Random(seed)
    rng.shuffle(rows)
    # Use each name/character pair at most once so the openings differ in more than one slot.
    seen, picked = set(), []
    for r in rows:
        key = (r["name"], r["character"])
        if key in seen:
            continue
        seen.add(key)
        r["prompt"] = STORY_PROMPT.format(**r)
        picked.append(r)
    return picked


# -------------------------------------------------------------------------------------------- describe
NAME_FIRST = ["The Golden", "The Blue", "The Little", "The Old", "The Green", "The Silver", "The Red", "The Hidden",
              "The Happy", "The Lucky", "The Royal", "The Rustic", "The Copper", "The Wild", "The Quiet", "The Sunny",
              "The Crooked", "The White", "The Painted", "The Merry"]
NAME_SECOND = ["Fork", "Spoon", "Lantern", "Oak", "Anchor", "Kettle", "Garden", "Mill", "Harbour", "Table", "Olive",
               "Crown", "Pear", "Lemon", "Swan", "Bell", "Barrel", "Pepper", "Orchard", "Fox"]
FOODS = ["Italian", "Chinese", "Indian", "French", "Japanese", "Mexican", "Greek", "Thai", "English", "Spanish"]
AREAS = ["city centre", "riverside", "old town", "harbour area", "university district"]
PRICES = ["cheap", "moderately priced", "expensive"]
DESCRIBE_PROMPT = ("Write one sentence describing this restaurant.\n"
                   "Name: {name}\nFood: {food}\nArea: {area}\nPrice: {price}")
DESCRIBE_REFERENCES = [
    "{name} is {a_price} {food} restaurant in the {area}.",
    "In the {area}, there is {a_price} restaurant called {name} that serves {food} food.",
    "{name} serves {food} food in the {area}, and it is {price}.",
]


def describe_rows(seed: int = 2468) -> list[dict[str, Any]]:
    """Restaurant descriptions: random (name, food, area, price) with three template references each."""
    rng = random.Random(seed)
    names = [f"{a} {b}" for a in NAME_FIRST for b in NAME_SECOND]
    rng.shuffle(names)
    rows = []
    for name in names:
        r = {"name": name, "food": rng.choice(FOODS), "area": rng.choice(AREAS), "price": rng.choice(PRICES)}
        r["prompt"] = DESCRIBE_PROMPT.format(**r)
        article = "an" if r["price"][0] in "aeiou" else "a"
        r["references"] = [t.format(a_price=f"{article} {r['price']}", **r) for t in DESCRIBE_REFERENCES]
        rows.append(r)
    return rows


# ----------------------------------------------------------------------------------------------- files
GENERATORS = {"arith": (arith_rows, SPLIT_SIZES), "story": (story_rows, STORY_SPLIT_SIZES),
              "describe": (describe_rows, SPLIT_SIZES)}


def split_rows(task: str) -> dict[str, list[dict[str, Any]]]:
    """The dev and test rows of a builtin task, with ids ``<task>-<split>-<n>``."""
    make, sizes = GENERATORS[task]
    pool = make()
    need = sum(sizes.values())
    if len(pool) < need:
        raise RuntimeError(f"{task}: generator made {len(pool)} items, splits need {need}")
    out, start = {}, 0
    for split, n in sizes.items():
        rows = []
        for k, r in enumerate(pool[start:start + n]):
            rows.append({"id": f"{task}-{split}-{k:03d}", **r})
        out[split] = rows
        start += n
    return out


def render(rows: list[dict[str, Any]]) -> str:
    """JSONL text of rows (stable key order, UTF-8)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_all(data_dir: Path = DATA_DIR) -> list[Path]:
    """(Re)write every builtin data file; returns their paths."""
    from decodetune.io import atomic_write

    paths = []
    for task in GENERATORS:
        for split, rows in split_rows(task).items():
            path = data_dir / f"{task}_{split}.jsonl"
            with atomic_write(path) as f:
                f.write(render(rows))
            paths.append(path)
    return paths


if __name__ == "__main__":  # pragma: no cover
    for p in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA_DIR):
        print(p)
