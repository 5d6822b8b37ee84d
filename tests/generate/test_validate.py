import json

import pytest

from tunebench.cli import main
from tunebench.generate.validate import validate_predictions
from tunebench.tasksets import load_tasks


@pytest.fixture()
def tasks(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"task_id": i, "input": f"質問{i}"}, ensure_ascii=False) + "\n" for i in range(4)),
                    encoding="utf-8")
    return path


def write(tmp_path, lines):
    path = tmp_path / "pred.jsonl"
    path.write_bytes(b"".join((line if isinstance(line, bytes) else
                               json.dumps(line, ensure_ascii=False).encode()) + b"\n" for line in lines))
    return path


def good(i):
    return {"task_id": i, "input": f"質問{i}", "output": f"答え{i}"}


def test_valid_file_passes(tmp_path, tasks, capsys):
    path = write(tmp_path, [good(i) for i in range(4)])
    assert validate_predictions(path, load_tasks(str(tasks))) == []
    assert main(["validate", str(path), "--tasks", str(tasks)]) == 0


@pytest.mark.parametrize("lines, expected", [
    ([good(0), good(1), good(1), good(2), good(3)], ["line 3: task_id 1: duplicate of line 2"]),
    ([good(0), good(1), good(3)], ["missing: task_id 2: no answer for this task"]),
    ([good(0), good(1), good(2), good(3), {**good(9), "input": "x"}], ["line 5: task_id 9: not a task of the task file (extra)"]),
    ([good(0), {**good(1), "output": "  "}, good(2), good(3)], ["line 2: task_id 1: field 'output' is empty"]),
    ([good(0), {**good(1), "output": 5}, good(2), good(3)], ["line 2: task_id 1: field 'output' must be a string, got int"]),
    ([good(0), {**good(1), "input": "変えた"}, good(2), good(3)], ["line 2: task_id 1: field 'input' differs from the task file"]),
    ([good(0), b'{"task_id": 1, "input": "x", ', good(2), good(3)],
     ["line 2: task_id None: not valid JSON (Expecting property name enclosed in double quotes)",
      "missing: task_id 1: no answer for this task"]),
    ([good(0), b'{"task_id": 1, "input": "\x82\xa0"}', good(2), good(3)],
     ["line 2: task_id None: not UTF-8", "missing: task_id 1: no answer for this task"]),
])
def test_each_defect_is_reported_with_line_and_task_id(tmp_path, tasks, lines, expected, capsys):
    path = write(tmp_path, lines)
    assert [str(i) for i in validate_predictions(path, load_tasks(str(tasks)))] == expected
    assert main(["validate", str(path), "--tasks", str(tasks)]) == 1
    assert expected[0] in capsys.readouterr().out


@pytest.mark.parametrize("task_id, kind", [(True, "bool"), (False, "bool"), (2.0, "float"), (None, "NoneType")])
def test_task_id_must_be_an_integer_not_a_bool_or_float(tmp_path, tasks, task_id, kind):
    lines = [good(i) for i in range(4)]
    replaced = int(task_id or 0)
    lines[replaced] = {**good(replaced), "task_id": task_id}
    issues = [str(i) for i in validate_predictions(write(tmp_path, lines), load_tasks(str(tasks)))]
    assert issues[0] == (f"line {replaced + 1}: task_id {task_id!r}: field 'task_id' must be an integer or string "
                         f"as in the task file, got {kind}")
    assert f"missing: task_id {replaced}: no answer for this task" in issues


def test_lone_surrogate_in_an_output_is_flagged(tmp_path, tasks, capsys):
    lines = [good(i) for i in range(4)]
    path = write(tmp_path, lines[:1] + [b'{"task_id": 1, "input": "\\u8cea\\u554f1", "output": "ok \\ud800"}'] + lines[2:])
    assert [str(i) for i in validate_predictions(path, load_tasks(str(tasks)))] == [
        "line 2: task_id 1: field 'output' holds a lone surrogate U+D800 (not encodable as UTF-8; "
        "strict JSON parsers reject it)"]
    assert main(["validate", str(path), "--tasks", str(tasks)]) == 1
