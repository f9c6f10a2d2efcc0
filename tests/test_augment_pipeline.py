"""augment_rows: row layout, fields, determinism, filtering, bad input."""

from __future__ import annotations

import pytest

from decodetune.errors import UserError
from decodetune.train.augment import Filters, SynonymTable, augment, augment_rows, augment_texts, compile_preserve
from decodetune.train.augment.pipeline import parse_ops, parse_rates

ROWS = [
    {"id": "q1", "prompt": "What is 12 plus 7? Answer with one number.", "answer": "19", "meta": {"k": [1]},
     "_line": 1},
    {"id": "q2", "prompt": "Compute 30 minus 4, and give only the final result.", "answer": "26", "_line": 2},
    {"prompt": "Name three large rivers of Europe, please.", "references": ["Danube"], "_line": 4},
]
TABLE = SynonymTable({"answer": ["reply"], "compute": ["calculate"], "name": ["list"], "large": ["big"],
                      "number": ["figure"], "final": ["last"], "rivers": ["streams"]})


def test_layout_fields_ids_and_op_tags():
    out = augment_rows(ROWS, "swap,synonym", n=2, seed=3, synonyms=TABLE)
    assert [r["aug_op"] for r in out if r["aug_source"] == 0][0] == "original"
    for r in out:
        src = ROWS[r["aug_source"]]
        assert "_line" not in r
        # every field of the input row is kept; only the text and the id change
        for key, value in src.items():
            if key in ("_line", "prompt", "id"):
                continue
            assert r[key] == value
        if r["aug_op"] == "original":
            assert r["prompt"] == src["prompt"] and r.get("id") == src.get("id")
        else:
            assert r["prompt"] != src["prompt"]
            if "id" in src:
                assert r["id"].startswith(src["id"] + "~" + r["aug_op"])
            else:
                assert "id" not in r
    # grouped per input row, originals first, ops in the order given
    sources = [r["aug_source"] for r in out]
    assert sources == sorted(sources)
    ops0 = [r["aug_op"] for r in out if r["aug_source"] == 0]
    assert ops0[0] == "original" and ops0[1:] == sorted(ops0[1:], key=["swap", "synonym"].index)
    ids = [r["id"] for r in out if "id" in r]
    assert len(ids) == len(set(ids))


def test_outputs_do_not_share_mutable_fields_with_input():
    out = augment_rows(ROWS[:1], "swap", n=1, seed=0)
    out[-1]["meta"]["k"].append(2)
    assert ROWS[0]["meta"] == {"k": [1]}


def test_keep_original_off():
    out = augment_rows(ROWS, "delete", n=2, seed=0, keep_original=False)
    assert out and all(r["aug_op"] == "delete" for r in out)


def test_same_seed_same_rows_and_variants_independent_of_n_and_other_rows():
    a = augment_rows(ROWS, "swap,delete,insert,synonym", n=3, seed=11, synonyms=TABLE)
    b = augment_rows(ROWS, "swap,delete,insert,synonym", n=3, seed=11, synonyms=TABLE)
    assert a == b
    c = augment_rows(ROWS, "swap,delete,insert,synonym", n=3, seed=12, synonyms=TABLE)
    assert a != c
    # a variant depends on (seed, op, row index, k) only: not on n, nor on the rows after it
    n1 = augment(ROWS, "delete", n=1, seed=11, keep_original=False, filters=Filters())
    n5 = augment(ROWS[:2], "delete", n=5, seed=11, keep_original=False, filters=Filters())
    for i in (0, 1):
        first = [r for r in n1.rows if r["aug_source"] == i][0]
        assert first["id"].endswith("~delete1")
        assert [r for r in n5.rows if r["aug_source"] == i][0] == first


def test_chat_rows_edit_the_last_user_message_only():
    rows = [{"id": "c", "messages": [{"role": "system", "content": "Be brief, always."},
                                     {"role": "user", "content": "Tell me about large rivers in Europe."}]}]
    out = augment_rows(rows, "delete", n=2, seed=0, keep_original=False)
    assert out
    for r in out:
        assert r["messages"][0] == rows[0]["messages"][0]
        assert r["messages"][1]["content"] != rows[0]["messages"][1]["content"]
    assert rows[0]["messages"][1]["content"] == "Tell me about large rivers in Europe."


def test_counts_and_filters_applied():
    res = augment(ROWS, "swap,delete", n=6, seed=0, filters=Filters(preserve=compile_preserve("numbers"),
                                                                      min_len_ratio=0.8))
    for op in ("swap", "delete"):
        c = res.counts[op]
        assert c["candidates"] == 18
        assert c["kept"] + sum(v for k, v in c.items() if k not in ("candidates", "kept")) == 18
    for r in res.rows:
        if r["aug_op"] != "original":
            src = ROWS[r["aug_source"]]["prompt"]
            assert len(r["prompt"].split()) >= 0.8 * len(src.split()) - 1e-9
    # duplicates within a row are never kept
    for i in range(len(ROWS)):
        texts = [r["prompt"] for r in res.rows if r["aug_source"] == i]
        assert len(texts) == len(set(texts))


def test_augment_texts():
    out = augment_texts(["alpha beta gamma delta", "one two three four"], "swap", n=2, seed=0)
    assert out[0] == "alpha beta gamma delta" and "one two three four" in out
    assert all(sorted(t.split()) in (sorted("alpha beta gamma delta".split()), sorted("one two three four".split()))
               for t in out)


def test_row_augmenter_for_hooks_keeps_line_numbers():
    from decodetune.train.augment import row_augmenter

    rows = [{"prompt": "alpha beta gamma delta", "completion": "x", "_line": 3},
            {"prompt": "one two three four", "completion": None, "_line": 9}]
    run = row_augmenter("swap,delete", n=2, seed=0)
    out = run(rows)
    assert [r["_line"] for r in out] == [3 if r["aug_source"] == 0 else 9 for r in out]
    assert all(r["completion"] == rows[r["aug_source"]]["completion"] for r in out)
    assert rows[0] == {"prompt": "alpha beta gamma delta", "completion": "x", "_line": 3}
    with pytest.raises(UserError, match="unknown op"):
        row_augmenter("nope")


def test_parse_ops_and_rates():
    assert parse_ops("swap, delete,swap") == ["swap", "delete"]
    assert parse_rates("0.3") == {"swap": 0.3, "delete": 0.3, "insert": 0.3, "synonym": 0.3}
    r = parse_rates("swap=0.2,delete=0")
    assert r["swap"] == 0.2 and r["delete"] == 0.0 and r["insert"] == 0.1
    assert parse_rates({"insert": 1})["insert"] == 1.0


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"ops": "swap,shuffle"}, r"--ops: unknown op 'shuffle'"),
    ({"ops": ""}, r"--ops: no op"),
    ({"rates": "swap=1.5"}, r"--rate: swap=1.5 is outside \[0, 1\]"),
    ({"rates": "-0.1"}, r"--rate: swap=-0.1 is outside"),
    ({"rates": "swap=abc"}, r"--rate: swap='abc' is not a number"),
    ({"rates": "paraphrase=0.1"}, r"'paraphrase' is not a token op"),
    ({"n": 0}, r"--n: must be"),
])
def test_bad_arguments(kwargs, pattern):
    args = {"ops": "swap", **kwargs}
    ops = args.pop("ops")
    with pytest.raises(UserError, match=pattern):
        augment_rows(ROWS, ops, **args)


def test_bad_rows():
    with pytest.raises(UserError, match=r"data\.jsonl: no rows \(empty input\)"):
        augment_rows([], "swap", source="data.jsonl")
    with pytest.raises(UserError, match=r"data\.jsonl:7: row has no 'prompt' \(or 'messages'\) field"):
        augment_rows([ROWS[0], {"id": "x", "question": "hi", "_line": 7}], "swap", source="data.jsonl")
    with pytest.raises(UserError, match=r"data\.jsonl:1: row has no 'question' field"):
        augment_rows(ROWS, "swap", field="question", source="data.jsonl")
    with pytest.raises(UserError, match=r"row 1: field 'prompt' must be text or a chat, got int"):
        augment_rows([{"prompt": 3}], "swap", source="data.jsonl")
    with pytest.raises(UserError, match="file not found"):
        augment_rows(ROWS, "synonym", synonyms="/nonexistent/table.tsv")
