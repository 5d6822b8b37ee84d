"""Named evaluation task sets (ELYZA-tasks-100 shipped, ELYZA-tasks-100-TV added once by the user) and task files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from tunebench.errors import DataError
from tunebench.models.embedded import cache_root

BUILTIN_DIR = Path(str(files("tunebench").joinpath("builtin")))
SHIPPED = {"elyza-tasks-100": "elyza-tasks-100.jsonl"}
# The TV set has no stated licence, so it is not shipped: the user adds a copy once (`tunebench tasks
# add`), which lands in tunebench's cache, or names it in TUNEBENCH_TV_TASKS. name → (env var, task count).
ADDABLE = {"elyza-tasks-100-tv": ("TUNEBENCH_TV_TASKS", 100)}
ADD_HINT = ("add your copy once with `tunebench tasks add {name} FILE`, set {env}=FILE, "
            "or pass --tasks FILE (generate.tasks in a config)")


@dataclass(frozen=True)
class Task:
    task_id: int | str
    input: str
    reference: str | None = None  # ELYZA-tasks-100's reference answer
    eval_aspect: str | None = None  # ELYZA-tasks-100's grading notes


def added_task_file(name: str) -> Path:
    """Where `tunebench tasks add NAME FILE` keeps its copy."""
    return cache_root() / "tasks" / f"{name}.jsonl"


def find_task_set(name: str) -> tuple[Path | None, str]:
    """(file, how it was found) for a task-set name; file is None when an addable set is missing."""
    if name in SHIPPED:
        return BUILTIN_DIR / SHIPPED[name], "shipped"
    env, _ = ADDABLE[name]
    if os.environ.get(env):
        path = Path(os.environ[env])
        if not path.is_file():
            raise DataError(f"{path}: no such file (from ${env})")
        return path, f"${env}"
    added = added_task_file(name)
    return (added, "added") if added.is_file() else (None, "not added")


def resolve_task_file(name_or_path: str) -> Path:
    """Map a task-set name ("elyza-tasks-100", "elyza-tasks-100-tv") or a path to a JSONL file."""
    name = name_or_path.removeprefix("builtin:")
    if name in SHIPPED or name in ADDABLE:
        path, _ = find_task_set(name)
        if path is None:
            env, _ = ADDABLE[name]
            raise DataError(f"{name} is not shipped (no licence): " + ADD_HINT.format(name=name, env=env))
        return path
    path = Path(name_or_path)
    if not path.is_file():
        raise DataError(f"{name_or_path}: no such task file or task-set name "
                        f"(names: {', '.join([*SHIPPED, *ADDABLE])}; `tunebench tasks list` shows them)")
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
    return read_task_file(resolve_task_file(name_or_path))


def read_task_file(path: Path) -> list[Task]:
    """The tasks of one JSONL file; any bad line is a DataError naming file, line and field."""
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


def add_task_set(name: str, source: Path) -> Path:
    """Check `source` as task set `name` and keep a copy in tunebench's cache; returns the copy."""
    if name not in ADDABLE:
        raise DataError(f"{name}: not a task set that can be added (names: {', '.join(ADDABLE)})")
    if not source.is_file():
        raise DataError(f"{source}: no such file")
    tasks = read_task_file(source)
    _, expected = ADDABLE[name]
    if len(tasks) != expected:
        raise DataError(f"{source}: {len(tasks)} tasks, but {name} has {expected}; is this the right file?")
    shipped = {name: {t.input for t in read_task_file(BUILTIN_DIR / file)} for name, file in SHIPPED.items()}
    for other, inputs in shipped.items():
        if {t.input for t in tasks} == inputs:
            raise DataError(f"{source}: this is {other}, which is shipped (use it by name), not {name}")
    target = added_task_file(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)
    return target


def list_task_sets() -> list[tuple[str, str, Path | None]]:
    """(name, how it is found, file) for every named task set, shipped or addable."""
    rows = []
    for name in [*SHIPPED, *ADDABLE]:
        try:
            path, how = find_task_set(name)
        except DataError as exc:
            path, how = None, str(exc)
        rows.append((name, how, path))
    return rows
