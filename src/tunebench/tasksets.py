"""Named evaluation task sets (ELYZA-tasks-100 shipped, ELYZA-tasks-100-TV found locally) and task files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from tunebench.errors import DataError

BUILTIN_DIR = Path(str(files("tunebench").joinpath("builtin")))
# The TV set has no stated licence, so it is not shipped: look for the course's copy nearby.
TV_RELATIVE = Path("shared/data/elyza-tasks-100-tv/tasks.jsonl")


@dataclass(frozen=True)
class Task:
    task_id: int | str
    input: str
    reference: str | None = None  # ELYZA-tasks-100's reference answer
    eval_aspect: str | None = None  # ELYZA-tasks-100's grading notes


def resolve_task_file(name_or_path: str) -> Path:
    """Map a task-set name ("elyza-tasks-100", "elyza-tasks-100-tv") or a path to a JSONL file."""
    name = name_or_path.removeprefix("builtin:")
    if name == "elyza-tasks-100":
        return BUILTIN_DIR / "elyza-tasks-100.jsonl"
    if name == "elyza-tasks-100-tv":
        candidates = []
        if os.environ.get("TUNEBENCH_TV_TASKS"):
            candidates.append(Path(os.environ["TUNEBENCH_TV_TASKS"]))
        here = Path.cwd().resolve()
        for folder in (here, *here.parents):
            candidates.append(folder / TV_RELATIVE)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise DataError(
            "ELYZA-tasks-100-TV is not shipped (no licence): pass --tasks PATH/TO/tasks.jsonl, "
            f"set TUNEBENCH_TV_TASKS, or place it at ./{TV_RELATIVE}"
        )
    path = Path(name_or_path)
    if not path.is_file():
        raise DataError(f"{name_or_path}: no such task file or task-set name "
                        "(names: elyza-tasks-100, elyza-tasks-100-tv)")
    return path


def read_records(path: Path, required: tuple[str, ...], hint: str = "") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank JSONL line; a broken line or a missing required
    field is a DataError naming the file, line and field."""
    records = []
    with path.open(encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg}){hint}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: a line must hold a JSON object{hint}")
            for key in required:
                if key not in row:
                    raise DataError(f"{path}:{line_no}: field '{key}' is missing{hint}")
            records.append((line_no, row))
    return records


def load_tasks(name_or_path: str) -> list[Task]:
    """Read a task JSONL with `task_id` and `input` (and optional `output`, `eval_aspect`)."""
    path = resolve_task_file(name_or_path)
    tasks: list[Task] = []
    seen: dict[object, int] = {}
    for line_no, row in read_records(path, ("task_id", "input")):
        if not isinstance(row["input"], str) or not row["input"].strip():
            raise DataError(f"{path}:{line_no}: field 'input' must be a non-empty string")
        if row["task_id"] in seen:
            raise DataError(f"{path}:{line_no}: field 'task_id' {row['task_id']!r} repeats line {seen[row['task_id']]}")
        seen[row["task_id"]] = line_no
        tasks.append(Task(row["task_id"], row["input"], row.get("output"), row.get("eval_aspect")))
    if not tasks:
        raise DataError(f"{path}: no tasks in file")
    return tasks
