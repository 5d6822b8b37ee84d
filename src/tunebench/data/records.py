"""The shapes data takes between reading and tokenising: raw rows, examples and problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Origin:
    """Where a record came from: file and 1-based line (JSONL/CSV) or 0-based record index."""

    file: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.index is not None:
            return f"{self.file}[record {self.index}]"
        return self.file


@dataclass
class RawRow:
    data: dict[str, Any]
    origin: Origin


@dataclass
class Example:
    """One conversation: messages with role system/user/assistant; loss on assistant turns."""

    messages: list[dict[str, str]]
    origin: Origin
    source: str = ""

    def user_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")


@dataclass(frozen=True)
class Problem:
    """A record that was skipped (or, with --strict, refused), and why."""

    origin: Origin
    field: str | None
    message: str
    kind: str  # "json", "missing", "empty", "type", "duplicate", "encoding", "contamination", "length"

    def __str__(self) -> str:
        where = f"{self.origin}: field '{self.field}'" if self.field else f"{self.origin}"
        return f"{where}: {self.message}"


@dataclass
class ReadResult:
    """Examples read from one source plus the problems found on the way."""

    format: str
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rows_read: int = 0
