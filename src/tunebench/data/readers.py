"""Read instruction data from files, dataset folders and the hub, and turn rows into examples.

Formats are detected from the content:
- Ichikara Instruction: a JSON array of {"ID", "text", "output"} (often UTF-8 with BOM and CRLF);
- Alpaca style: {"instruction", "input", "output"} (a non-empty input is appended to the instruction);
- chat: {"messages": [{"role", "content"}, ...]}, multi-turn, loss on every assistant turn.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable

from tunebench.data.records import Example, Origin, Problem, RawRow, ReadResult
from tunebench.errors import DataError
from tunebench.tasksets import BUILTIN_DIR

FORMATS = ("ichikara", "alpaca", "messages")
BUILTIN_SOURCES = {"ja-instruct-megagon": BUILTIN_DIR / "ja-instruct-megagon.jsonl"}


def read_source(path: str, fmt: str = "auto", split: str = "train") -> ReadResult:
    """Read every row of a source, detect its format and convert rows to examples."""
    rows, problems = read_raw_rows(path, split)
    if fmt == "auto":
        fmt = detect_format(rows, path)
    result = ReadResult(format=fmt, problems=problems, rows_read=len(rows) + len(problems))
    for row in rows:
        example = row_to_example(row, fmt, result.problems)
        if example is not None:
            example.source = path
            result.examples.append(example)
    return result


def read_raw_rows(path: str, split: str = "train") -> tuple[list[RawRow], list[Problem]]:
    """Load raw rows with their origins; malformed lines become problems, not exceptions."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name not in BUILTIN_SOURCES:
            raise DataError(f"{path}: unknown built-in data set (have: {', '.join(BUILTIN_SOURCES)})")
        return read_jsonl_rows(BUILTIN_SOURCES[name], label=path)
    local = Path(path)
    if local.is_dir():
        return read_dataset_dir(local, split), []
    if local.is_file():
        suffix = local.suffix.lower()
        if suffix == ".parquet":
            return read_parquet(local), []
        if suffix == ".csv":
            return read_csv(local)
        return read_json_or_jsonl(local)
    if "/" in path and not path.startswith((".", "/")) and not local.suffix:
        return read_hub_dataset(path, split), []
    raise DataError(f"{path}: no such file or folder (and not a hub dataset id like 'user/name')")


def read_json_or_jsonl(path: Path) -> tuple[list[RawRow], list[Problem]]:
    """A JSON array/object file or JSONL: decided by the first non-blank character."""
    raw = path.read_bytes()
    head = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"[":
        return read_json_array(path, raw), []
    return read_jsonl_rows(path)


def read_json_array(path: Path, raw: bytes) -> list[RawRow]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 at byte {exc.start}; re-save the file as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records or JSONL")
    rows = []
    for index, item in enumerate(data):
        rows.append(RawRow(item if isinstance(item, dict) else {"__value__": item}, Origin(str(path), index=index)))
    return rows


def read_jsonl_rows(path: Path, label: str | None = None) -> tuple[list[RawRow], list[Problem]]:
    """JSONL read line by line as bytes, so one bad line (encoding or JSON) names its line number."""
    rows: list[RawRow] = []
    problems: list[Problem] = []
    name = label or str(path)
    with path.open("rb") as handle:
        for line_no, raw_line in enumerate(handle, start=1):
            origin = Origin(name, line=line_no)
            if line_no == 1:
                raw_line = raw_line.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(Problem(origin, None, f"not UTF-8 (byte {exc.start}); re-save as UTF-8", "encoding"))
                continue
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem(origin, None, f"not valid JSON ({exc.msg}, column {exc.colno})", "json"))
                continue
            if not isinstance(item, dict):
                problems.append(Problem(origin, None, "a line must hold a JSON object", "json"))
                continue
            rows.append(RawRow(item, origin))
    return rows, problems


def read_csv(path: Path) -> tuple[list[RawRow], list[Problem]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 at byte {exc.start}; re-save the file as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    # line 1 is the header; reader.line_num is the line a record ends on
    return [RawRow(dict(row), Origin(str(path), line=reader.line_num)) for row in reader], []


def read_parquet(path: Path) -> list[RawRow]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [RawRow(row, Origin(str(path), index=i)) for i, row in enumerate(table.to_pylist())]


def read_dataset_dir(path: Path, split: str) -> list[RawRow]:
    """A folder written by `datasets.Dataset.save_to_disk` (or a DatasetDict)."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as exc:
        raise DataError(f"{path}: reading a dataset folder needs `pip install datasets`") from exc
    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise DataError(f"{path}: split '{split}' not found (have: {', '.join(dataset)})")
        dataset = dataset[split]
    return [RawRow(dict(row), Origin(f"{path}:{split}", index=i)) for i, row in enumerate(dataset)]


def read_hub_dataset(name: str, split: str) -> list[RawRow]:
    """A hub dataset id through the real `datasets.load_dataset` path (needs network access)."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise DataError(f"{name}: reading a hub dataset needs `pip install datasets`") from exc
    try:
        dataset = load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; the user needs the message
        raise DataError(f"{name}: could not load hub dataset (split '{split}'): {exc}") from exc
    return [RawRow(dict(row), Origin(f"hf://{name}:{split}", index=i)) for i, row in enumerate(dataset)]


def detect_format(rows: Iterable[RawRow], path: str) -> str:
    """Pick the format whose key set most rows carry."""
    votes = {fmt: 0 for fmt in FORMATS}
    for row in list(rows)[:200]:
        keys = set(row.data)
        if "messages" in keys:
            votes["messages"] += 1
        elif {"text", "output"} <= keys and ("ID" in keys or "instruction" not in keys):
            votes["ichikara"] += 1
        elif "instruction" in keys and "output" in keys:
            votes["alpaca"] += 1
    best = max(votes, key=votes.get)
    if votes[best] == 0:
        raise DataError(
            f"{path}: cannot detect the format: expected fields ID/text/output (Ichikara), "
            "instruction/input/output (Alpaca) or messages (chat); pass --format to choose"
        )
    return best


def row_to_example(row: RawRow, fmt: str, problems: list[Problem]) -> Example | None:
    """Validate one row's fields and build its example; on failure record a problem and return None."""
    data = row.data
    if fmt == "ichikara":
        user = required_text(row, "text", problems)
        answer = required_text(row, "output", problems)
        if user is None or answer is None:
            return None
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    elif fmt == "alpaca":
        user = required_text(row, "instruction", problems)
        answer = required_text(row, "output", problems)
        if user is None or answer is None:
            return None
        extra = data.get("input")
        if extra is not None and not isinstance(extra, str):
            problems.append(Problem(row.origin, "input", f"must be a string, got {type(extra).__name__}", "type"))
            return None
        if extra and extra.strip():
            user = f"{user}\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    elif fmt == "messages":
        messages = chat_messages(row, problems)
        if messages is None:
            return None
    else:
        raise DataError(f"unknown format '{fmt}' (choose from: {', '.join(FORMATS)})")
    return Example(messages=messages, origin=row.origin)


def required_text(row: RawRow, key: str, problems: list[Problem]) -> str | None:
    value: Any = row.data.get(key)
    if key not in row.data or value is None:
        problems.append(Problem(row.origin, key, "is missing", "missing"))
        return None
    return text_value(row, key, value, problems)


def text_value(row: RawRow, key: str, value: Any, problems: list[Problem]) -> str | None:
    """A present field that must be non-blank text."""
    if not isinstance(value, str):
        problems.append(Problem(row.origin, key, f"must be a string, got {type(value).__name__}", "type"))
        return None
    if not value.strip():
        problems.append(Problem(row.origin, key, "is empty or only whitespace", "empty"))
        return None
    return value


def message_list(row: RawRow, key: str, messages: Any, problems: list[Problem]) -> list[dict[str, str]] | None:
    """A non-empty list of {role: system/user/assistant, content: non-empty text}, or a problem naming the field."""
    if not isinstance(messages, list) or not messages:
        problems.append(Problem(row.origin, key, "must be a non-empty list of {role, content}", "type"))
        return None
    out = []
    for i, message in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            problems.append(Problem(row.origin, f"{where}.role", "must be system, user or assistant", "type"))
            return None
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            problems.append(Problem(row.origin, f"{where}.content", "is missing or empty", "empty"))
            return None
        out.append({"role": message["role"], "content": content})
    return out


def chat_messages(row: RawRow, problems: list[Problem]) -> list[dict[str, str]] | None:
    out = message_list(row, "messages", row.data.get("messages"), problems)
    if out is None:
        return None
    turns = [m["role"] for m in out if m["role"] != "system"]
    if "assistant" not in turns or turns[0] != "user":
        problems.append(Problem(row.origin, "messages", "needs a user turn first and at least one assistant turn", "type"))
        return None
    for a, b in zip(turns, turns[1:]):
        if a == b:
            problems.append(Problem(row.origin, "messages", f"two {a} turns in a row; turns must alternate", "type"))
            return None
    if turns[-1] != "assistant":
        out = out[: max(i for i, m in enumerate(out) if m["role"] == "assistant") + 1]
    return out
