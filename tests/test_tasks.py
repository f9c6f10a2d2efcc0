"""Task loading (JSONL, CSV, builtins), answer extraction and bad task files."""

from __future__ import annotations

import json

import pytest

from decodetune.errors import UserError
from decodetune.tasks import EXTRACTORS, builtin_data, list_tasks, load_task


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_builtin_tasks_have_disjoint_splits_of_at_least_100():
    tasks = {t.name: t for t in list_tasks()}
    assert set(tasks) == {"arith", "story", "describe"}
    assert {t.kind for t in tasks.values()} == {"closed", "open", "reference"}
    for t in tasks.values():
        dev, test = t.items("dev"), t.items("test")
        assert len(dev) >= 100 and len(test) >= 100
        assert not {str(i.prompt) for i in dev} & {str(i.prompt) for i in test}
        assert len({i.id for i in dev + test}) == len(dev) + len(test)
        assert t.defaults["max_new_tokens"] <= 128
    assert tasks["arith"].defaults["max_new_tokens"] <= 16  # short answers: cheap tuner trials
    assert all(len(i.references) == 3 for i in tasks["describe"].items("dev"))
    assert all(not i.references for i in tasks["story"].items("dev"))


def test_shipped_data_is_exactly_what_the_seeded_generator_writes():
    for task in builtin_data.GENERATORS:
        for split, rows in builtin_data.split_rows(task).items():
            shipped = (builtin_data.DATA_DIR / f"{task}_{split}.jsonl").read_text(encoding="utf-8")
            assert shipped == builtin_data.render(rows), f"{task}_{split}.jsonl differs from its generator"


def test_arith_answers_are_correct():
    for item in load_task("arith").items("test"):
        a, op, b = item.data["a"], item.data["op"], item.data["b"]
        assert item.references == [str(a + b if op == "+" else a - b)]
        assert item.prompt == f"What is {a} {op} {b}? Answer with just the number."


def test_extractors():
    assert EXTRACTORS["first_number"]("It is 12, not 13") == "12"
    assert EXTRACTORS["last_number"]("12 + 13 = 25\n") == "25"
    assert EXTRACTORS["last_number"]("no digits") == ""
    assert EXTRACTORS["first_line"]("\n  Hello there.\nMore") == "Hello there."
    assert EXTRACTORS["first_word"]("  don't stop") == "don't"
    assert load_task("arith").extract_answer("19 - 16 = 3") == "3"


def test_jsonl_task_with_prompts_messages_and_references(tmp_path):
    p = write(tmp_path / "t.jsonl", [
        {"id": "a", "prompt": "Say hi", "reference": "hi"},
        {"messages": [{"role": "user", "content": "Say bye"}], "references": ["bye", "goodbye"]},
    ])
    task = load_task(p)
    assert task.kind == "reference" and task.primary == "chrf"
    items = task.items("test")  # a file task has one split; any split name selects it
    assert [i.id for i in items] == ["a", "1"]
    assert items[1].prompt == [{"role": "user", "content": "Say bye"}]
    assert items[1].references == ["bye", "goodbye"]


def test_numeric_answers_make_a_closed_numeric_task(tmp_path):
    task = load_task(write(tmp_path / "n.jsonl", [{"prompt": "2+2?", "answer": 4}, {"prompt": "3+3?", "answer": "6"}]))
    assert task.kind == "closed" and task.extract == "first_number" and task.primary == "numeric_match"
    task = load_task(write(tmp_path / "w.jsonl", [{"prompt": "Capital of France?", "answer": "Paris"}]))
    assert task.extract == "strip" and task.primary == "exact_match"
    task = load_task(write(tmp_path / "o.jsonl", [{"prompt": "Tell a story"}]))
    assert task.kind == "open" and task.items("dev")[0].references == []


def test_csv_task(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('id,prompt,references\nx,"Hello, world","[""a"", ""b""]"\ny,Hi,plain ref\n', encoding="utf-8")
    items = load_task(p).items("all")
    assert [i.references for i in items] == [["a", "b"], ["plain ref"]]
    assert items[0].prompt == "Hello, world"


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": "ok"}, {"reference": "x"}], r"t.jsonl:2: missing field 'prompt' \(or 'messages'\)"),
    ([{"prompt": ["not", "text"]}], r"t.jsonl:1: field 'prompt' must be a string"),
    ([{"messages": [{"role": "user"}]}], r"t.jsonl:1: messages\[0\] must be an object"),
    ([{"prompt": "a", "references": "x"}], r"t.jsonl:1: field 'references' must be a list"),
    ([{"prompt": "a", "id": 1}, {"prompt": "b", "id": 1}], r"t.jsonl:2: duplicate id '1'"),
])
def test_bad_rows_name_file_and_line(tmp_path, rows, match):
    with pytest.raises(UserError, match=match):
        load_task(write(tmp_path / "t.jsonl", rows))


def test_empty_non_utf8_and_unknown_tasks(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="e.jsonl: empty task"):
        load_task(tmp_path / "e.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"b.jsonl:2: not valid UTF-8"):
        load_task(tmp_path / "b.jsonl")
    with pytest.raises(UserError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(UserError, match="no split 'train'"):
        load_task("arith").items("train")
    with pytest.raises(UserError, match="file not found"):
        load_task(tmp_path / "missing.jsonl")


def test_answer_may_be_a_list_of_acceptable_answers_scored_against_any(tmp_path):
    from decodetune.metrics import get_metric
    from decodetune.metrics.base import MetricInput

    task = load_task(write(tmp_path / "cap.jsonl", [
        {"prompt": "A capital of South Africa?", "answer": ["Pretoria", "Cape Town", "Bloemfontein"]},
        {"prompt": "Capital of France?", "answer": "Paris"}]))
    assert task.kind == "closed" and task.primary == "exact_match"
    refs = [i.references for i in task.items("all")]
    assert refs == [["Pretoria", "Cape Town", "Bloemfontein"], ["Paris"]]
    scores = get_metric("exact_match").fn(MetricInput(predictions=["Cape Town", "Lyon"], references=refs))
    assert list(scores.per_row) == [1.0, 0.0]
    numeric = load_task(write(tmp_path / "n.jsonl", [{"prompt": "sqrt(4)?", "answer": [2, -2]}]))
    assert numeric.primary == "numeric_match" and numeric.items("all")[0].references == ["2", "-2"]
    csv = tmp_path / "t.csv"
    csv.write_text('prompt,answer\nCapital?,"[""Pretoria"", ""Cape Town""]"\nOther?,Paris\n', encoding="utf-8")
    assert [i.references for i in load_task(csv).items("all")] == [["Pretoria", "Cape Town"], ["Paris"]]


@pytest.mark.parametrize("answer, match", [
    ([], r"t.jsonl:1: field 'answer': a list of answers must be non-empty"),
    (["a", ""], r"t.jsonl:1: field 'answer': a list of answers must be non-empty"),
    ([{"x": 1}], r"t.jsonl:1: field 'answer' must be a string or a list of strings, got dict"),
    ({"x": 1}, r"t.jsonl:1: field 'answer' must be a string or a list of strings, got dict"),
])
def test_bad_answer_lists_name_file_and_line(tmp_path, answer, match):
    with pytest.raises(UserError, match=match):
        load_task(write(tmp_path / "t.jsonl", [{"prompt": "q", "answer": answer}]))
