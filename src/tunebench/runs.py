"""The run directory: one folder per run holding everything each stage reads and writes.

    runs/<name>/
      config.yaml            the fully resolved config
      data/                  train.jsonl, eval.jsonl (token ids + labels), summary.json
      checkpoints/           checkpoint-<step>/ (latest save_total_limit kept)
      adapter/               final peft adapter (or model/ for full fine-tuning) + tokenizer
      metrics.jsonl          one line per logged training step
      predictions.jsonl      {"task_id", "input", "output"} — the submission file
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


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def for_config(cls, config: Config, run_dir: str | None = None) -> "RunDir":
        root = Path(run_dir) if run_dir else Path("runs") / (config.name or "run")
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
