"""`tunebench validate`: is a predictions file exactly what the competition accepts?

Exactly one line per task_id of the task file, inputs equal to the task file's, outputs non-empty
strings, each line valid UTF-8 JSON. Every problem names its line and task_id. JSON's loose corners
are refused too: a task_id of `true` or `2.0` (Python would match them to tasks 1 and 2) and a lone
surrogate such as "\ud800" in a string (strict JSON parsers and UTF-8 encoders reject it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunebench.runs import VALIDATION, write_json_atomic
from tunebench.tasksets import Task


@dataclass(frozen=True)
class SubmissionDefect:
    line: int | None
    task_id: object
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "missing"
        return f"{where}: task_id {self.task_id!r}: {self.message}"


def lone_surrogate(text: str) -> str | None:
    """The first unpaired UTF-16 surrogate in text, as U+XXXX, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"U+{ord(text[exc.start]):04X}"
    return None


def validate_predictions(path: Path, tasks: list[Task], require_all: bool = True,
                         allow_extra_fields: bool = False) -> list[SubmissionDefect]:
    """Every problem of a predictions file. `require_all=False` accepts answers to a subset of the
    tasks (the judge scores what is there); `allow_extra_fields` accepts fields beyond the three."""
    expected = {t.task_id: t.input for t in tasks}
    seen: dict[object, int] = {}
    issues: list[SubmissionDefect] = []
    if not path.exists():
        return [SubmissionDefect(None, None, f"{path} does not exist")]
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            issues.append(SubmissionDefect(line_no, None, "empty line"))
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            issues.append(SubmissionDefect(line_no, None, "not UTF-8"))
            continue
        except json.JSONDecodeError as exc:
            issues.append(SubmissionDefect(line_no, None, f"not valid JSON ({exc.msg})"))
            continue
        if not isinstance(row, dict):
            issues.append(SubmissionDefect(line_no, None, "not a JSON object"))
            continue
        task_id = row.get("task_id")
        if "task_id" not in row:
            issues.append(SubmissionDefect(line_no, None, "field 'task_id' is missing"))
            continue
        if isinstance(task_id, bool) or not isinstance(task_id, (int, str)):
            # True == 1 and 2.0 == 2 in Python: without this they would pass as tasks 1 and 2.
            issues.append(SubmissionDefect(line_no, task_id, f"field 'task_id' must be an integer or string as in the task "
                                                  f"file, got {type(task_id).__name__}"))
            continue
        if task_id not in expected:
            issues.append(SubmissionDefect(line_no, task_id, "not a task of the task file (extra)"))
            continue
        if task_id in seen:
            issues.append(SubmissionDefect(line_no, task_id, f"duplicate of line {seen[task_id]}"))
            continue
        seen[task_id] = line_no
        if row.get("input") != expected[task_id]:
            issues.append(SubmissionDefect(line_no, task_id, "field 'input' differs from the task file"))
        output = row.get("output")
        if not isinstance(output, str):
            issues.append(SubmissionDefect(line_no, task_id, f"field 'output' must be a string, got {type(output).__name__}"))
        elif not output.strip():
            issues.append(SubmissionDefect(line_no, task_id, "field 'output' is empty"))
        elif surrogate := lone_surrogate(output):
            issues.append(SubmissionDefect(line_no, task_id, f"field 'output' holds a lone surrogate {surrogate} "
                                                  "(not encodable as UTF-8; strict JSON parsers reject it)"))
        extra = set(row) - {"task_id", "input", "output"}
        if extra and not allow_extra_fields:
            issues.append(SubmissionDefect(line_no, task_id, f"unexpected field(s): {', '.join(sorted(extra))}"))
    for task in tasks if require_all else ():
        if task.task_id not in seen:
            issues.append(SubmissionDefect(None, task.task_id, "no answer for this task"))
    return issues


def validate_and_record(path: Path, tasks: list[Task]) -> list[SubmissionDefect]:
    """Validate and write the result beside the predictions (validation.json, which reports show)."""
    issues = validate_predictions(path, tasks)
    write_json_atomic(path.parent / VALIDATION,
                      {"file": path.name, "ok": not issues, "tasks": len(tasks), "issues": [str(i) for i in issues]})
    return issues
