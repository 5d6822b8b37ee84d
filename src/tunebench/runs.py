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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunebench.config import Config, dump_config
from tunebench.errors import ConfigError

RUNS_FOLDER = Path("runs")


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
        return self.root / "config.yaml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def full_model(self) -> Path:
        return self.root / "model"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.jsonl"

    @property
    def predictions_settings(self) -> Path:
        return self.root / "predictions.settings.json"

    @property
    def judgments(self) -> Path:
        return self.root / "judgments.jsonl"

    @property
    def scores(self) -> Path:
        return self.root / "scores.json"

    def save_config(self, config: Config) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        dump_config(config, self.config_file)

    def trained_model(self) -> Path | None:
        """The final adapter or full model, if training finished."""
        for path in (self.adapter, self.full_model):
            if (path / "tunebench.json").exists():
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


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line and flush it to disk: finished work survives a crash."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
