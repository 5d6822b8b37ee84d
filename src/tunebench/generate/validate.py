"""`tunebench validate`: is a predictions file exactly what the competition accepts?

Exactly one line per task_id of the task file, inputs equal to the task file's, outputs non-empty
strings, each line valid UTF-8 JSON. Every problem names its line and task_id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunebench.runs import write_json_atomic
from tunebench.tasksets import Task


@dataclass(frozen=True)
class Issue:
    line: int | None
    task_id: object
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "missing"
        return f"{where}: task_id {self.task_id!r}: {self.message}"


def validate_predictions(path: Path, tasks: list[Task]) -> list[Issue]:
    expected = {t.task_id: t.input for t in tasks}
    seen: dict[object, int] = {}
    issues: list[Issue] = []
    if not path.exists():
        return [Issue(None, None, f"{path} does not exist")]
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            issues.append(Issue(line_no, None, "empty line"))
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            issues.append(Issue(line_no, None, "not UTF-8"))
            continue
        except json.JSONDecodeError as exc:
            issues.append(Issue(line_no, None, f"not valid JSON ({exc.msg})"))
            continue
        if not isinstance(row, dict):
            issues.append(Issue(line_no, None, "not a JSON object"))
            continue
        task_id = row.get("task_id")
        if "task_id" not in row:
            issues.append(Issue(line_no, None, "field 'task_id' is missing"))
            continue
        if task_id not in expected:
            issues.append(Issue(line_no, task_id, "not a task of the task file (extra)"))
            continue
        if task_id in seen:
            issues.append(Issue(line_no, task_id, f"duplicate of line {seen[task_id]}"))
            continue
        seen[task_id] = line_no
        if row.get("input") != expected[task_id]:
            issues.append(Issue(line_no, task_id, "field 'input' differs from the task file"))
        output = row.get("output")
        if not isinstance(output, str):
            issues.append(Issue(line_no, task_id, f"field 'output' must be a string, got {type(output).__name__}"))
        elif not output.strip():
            issues.append(Issue(line_no, task_id, "field 'output' is empty"))
        extra = set(row) - {"task_id", "input", "output"}
        if extra:
            issues.append(Issue(line_no, task_id, f"unexpected field(s): {', '.join(sorted(extra))}"))
    for task in tasks:
        if task.task_id not in seen:
            issues.append(Issue(None, task.task_id, "no answer for this task"))
    return issues


def validate_and_record(path: Path, tasks: list[Task]) -> list[Issue]:
    """Validate and write the result beside the predictions (validation.json, which reports show)."""
    issues = validate_predictions(path, tasks)
    write_json_atomic(path.parent / "validation.json",
                      {"file": path.name, "ok": not issues, "tasks": len(tasks), "issues": [str(i) for i in issues]})
    return issues
