"""The run directory: one folder per run holding everything each stage reads and writes.

    runs/<name>/
      config.yaml            the fully resolved config
      data/                  train.jsonl, eval.jsonl (token ids + labels), summary.json
      checkpoints/           checkpoint-<step>/ (latest save_total_limit kept)
      adapter/               final peft adapter (or model/ for full fine-tuning) + tokenizer
      metrics.jsonl          one line per logged training step
      predictions.jsonl      {"task_id", "input", "output"} — the submission file
      predictions.settings.json  the model/data/train/generate settings the predictions came from
      judgments.jsonl        every judge reply, cached by judge, prompt, answer and sample
      scores.json            per-task scores and the mean with its CI
      report.html, report.md
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunebench.config import Config, dump_config
from tunebench.errors import ConfigError, DataError

log = logging.getLogger(__name__)
RUNS_FOLDER = Path("runs")

# Every file name of a run folder, spelled here and nowhere else.
CONFIG = "config.yaml"
DATA_DIR, DATA_SUMMARY = "data", "summary.json"
CHECKPOINTS, ADAPTER, FULL_MODEL, MERGED = "checkpoints", "adapter", "model", "merged"
TRAINED_META = "tunebench.json"  # beside a trained adapter or model: base, method, template, fingerprints
METRICS = "metrics.jsonl"
PREDICTIONS, PREDICTIONS_SETTINGS = "predictions.jsonl", "predictions.settings.json"
VALIDATION = "validation.json"
JUDGMENTS, SCORES, NLL = "judgments.jsonl", "scores.json", "nll.json"
REPORT_HTML, REPORT_MD = "report.html", "report.md"


def partial_path(out: Path) -> Path:
    """Where answers are appended while `out` is being generated."""
    return out.with_name(out.name + ".partial")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def for_config(cls, config: Config, run_dir: str | None = None) -> "RunDir":
        """runs/<name>, or --run-dir when given; refused where it would overwrite an input."""
        root = Path(run_dir) if run_dir else run_folder_for_name(config.name or "run")
        refuse_inputs_inside(root, config)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG

    @property
    def data_dir(self) -> Path:
        return self.root / DATA_DIR

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def full_model(self) -> Path:
        return self.root / FULL_MODEL

    @property
    def merged(self) -> Path:
        return self.root / MERGED

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def predictions(self) -> Path:
        return self.root / PREDICTIONS

    @property
    def predictions_settings(self) -> Path:
        return self.root / PREDICTIONS_SETTINGS

    @property
    def validation(self) -> Path:
        return self.root / VALIDATION

    @property
    def nll(self) -> Path:
        return self.root / NLL

    @property
    def data_summary(self) -> Path:
        return self.data_dir / DATA_SUMMARY

    @property
    def judgments(self) -> Path:
        return self.root / JUDGMENTS

    @property
    def scores(self) -> Path:
        return self.root / SCORES

    def save_config(self, config: Config) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        dump_config(config, self.config_file)

    def trained_model(self) -> Path | None:
        """The final adapter or full model, if training finished."""
        for path in (self.adapter, self.full_model):
            if (path / TRAINED_META).exists():
                return path
        return None


def run_folder_for_name(name: str) -> Path:
    """runs/<name>: a config's name may not lead out of the runs folder (only --run-dir may)."""
    root = RUNS_FOLDER / name
    inside = RUNS_FOLDER.resolve()
    if Path(name).is_absolute() or root.resolve() == inside or inside not in root.resolve().parents:
        raise ConfigError(f"name '{name}': a run name must be a folder inside {RUNS_FOLDER}/ "
                          "(no absolute path, no '..'); pass --run-dir to write elsewhere")
    return root


def refuse_inputs_inside(root: Path, config: Config) -> None:
    """Stop before the run folder equals or holds a data source or the task file: stages overwrite
    files in it (data/train.jsonl, predictions.jsonl, ...) and deleting a run must not delete inputs."""
    out = root.resolve()
    inputs = [(f"data.sources[{i}].path", s.path) for i, s in enumerate(config.data.sources)]
    inputs.append(("generate.tasks", config.generate.tasks))
    for key, value in inputs:
        if not value or value.startswith("builtin:") or not Path(value).exists():
            continue
        source = Path(value).resolve()
        if source == out or out in source.parents:
            raise ConfigError(f"{key} '{value}' lies inside the run folder {root}, whose files tunebench "
                              "overwrites: choose another --run-dir or move the data out of it")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: Path, tolerate_torn_tail: bool = True) -> list[dict[str, Any]]:
    """The records of a JSONL file tunebench appends to (metrics, predictions.jsonl.partial, judgments).

    A last line without its newline that does not parse is what a kill during an append leaves
    (possibly cut inside a UTF-8 character): skipped with a warning when tolerate_torn_tail, its work
    is simply done again. Any other bad line is a DataError naming the file and line.
    """
    if not path.exists():
        return []
    *lines, tail = path.read_bytes().split(b"\n")  # tail: b"" when the file ends with a newline
    records = [parse_json_line(path, line_no, raw) for line_no, raw in enumerate(lines, start=1) if raw.strip()]
    if tail.strip():
        try:
            records.append(parse_json_line(path, len(lines) + 1, tail))
        except DataError:
            if not tolerate_torn_tail:
                raise
            log.warning("%s:%d: ignoring a half-written last line (a run was stopped while writing it)",
                        path, len(lines) + 1)
    return records


def parse_json_line(path: Path, line_no: int, raw: bytes) -> dict[str, Any]:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else f"not valid JSON ({exc.msg})"
        raise DataError(f"{path}:{line_no}: {reason}; delete this line (its work is done again) "
                        "and rerun") from None


def drop_torn_tail(path: Path) -> None:
    """Before appending: cut a half-written last line (see read_jsonl), or end a complete one with
    its newline, so the next record starts on a line of its own instead of gluing onto it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        keep = data.rfind(b"\n") + 1
        try:
            json.loads(data[keep:].decode("utf-8"))
            handle.write(b"\n")
        except (UnicodeDecodeError, json.JSONDecodeError):
            handle.truncate(keep)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line and flush it to disk: finished work survives a crash."""
    drop_torn_tail(path)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
