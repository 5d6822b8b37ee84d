"""`tunebench push`: upload an adapter (or merged model) to the Hugging Face Hub with a model card.

The token comes from HF_TOKEN or the `huggingface-cli login` cache and is passed to the client
only: it is never written into the card, the config or any file. `--dry-run` writes the exact
files that would be uploaded into a folder instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from tunebench.errors import ModelError
from tunebench.models.trained import find_trained
from tunebench.train.methods import get_method


def model_card(meta: dict, config: dict, scores: dict | None, repo: str) -> str:
    """A README.md with YAML front matter: base model, data, method, hyperparameters, scores."""
    train = config.get("train", {})
    data = config.get("data", {})
    base = meta["base_model"]
    front = {"base_model": base if not base.startswith("embedded:") else "google/gemma-3-270m",
             "library_name": "peft" if get_method(meta["method"]).peft else "transformers",
             "language": ["ja"], "tags": ["tunebench", meta["method"], "sft"]}
    keys = ("method", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "per_device_train_batch_size",
            "gradient_accumulation_steps", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler",
            "warmup_steps", "seed")
    rows = "\n".join(f"| {k} | {train.get(k)} |" for k in keys if k in train)
    sources = "\n".join(f"- `{s['path']}` (weight {s.get('weight', 1.0)})" for s in data.get("sources", []))
    score_text = "No judge scores recorded."
    if scores:
        score_text = (f"Mean judge score {scores['mean']:.2f} (95% CI {scores['ci_low']:.2f}–{scores['ci_high']:.2f}) "
                      f"on {scores.get('tasks', '?')} by {scores.get('judge', '?')}, "
                      f"{scores.get('scored', '?')} scored, {scores.get('unscored', 0)} unscored.")
    return f"""---
{yaml.safe_dump(front, allow_unicode=True, sort_keys=False).strip()}
---

# {repo}

Fine-tuned from `{base}` with tunebench ({meta['method']}, {meta.get('steps')} steps).

## Prompt template

`{meta.get('template')}` — generate with the same template (tunebench does this automatically).

## Training data

{sources or '(not recorded)'}

Data fingerprint `{meta.get('data_fingerprint')}`, code fingerprint `{meta.get('code_fingerprint')}`.

## Hyperparameters

| key | value |
|---|---|
{rows}

## Evaluation

{score_text}
"""


def collect_upload(run_path: Path, repo: str, merged: bool) -> tuple[Path, dict[str, str]]:
    """The folder to upload and the generated files to add to it."""
    trained = find_trained(run_path)
    if merged:
        trained = find_trained(run_path / "merged") if (run_path / "merged").exists() else None
        if trained is None:
            raise ModelError(f"{run_path}: no merged model; run `tunebench merge {run_path}` first")
    if trained is None:
        raise ModelError(f"{run_path}: nothing trained to push (no adapter/ or model/)")
    meta = json.loads((trained / "tunebench.json").read_text(encoding="utf-8"))
    run_root = trained.parent
    config = yaml.safe_load((run_root / "config.yaml").read_text(encoding="utf-8")) if (run_root / "config.yaml").exists() else {}
    scores = json.loads((run_root / "scores.json").read_text(encoding="utf-8")) if (run_root / "scores.json").exists() else None
    return trained, {"README.md": model_card(meta, config, scores, repo)}


def push(run_path: Path, repo: str, private: bool = False, merged: bool = False, dry_run: Path | None = None) -> str:
    folder, generated = collect_upload(run_path, repo, merged)
    if dry_run is not None:
        if dry_run.exists():
            shutil.rmtree(dry_run)
        shutil.copytree(folder, dry_run)
        for name, text in generated.items():
            (dry_run / name).write_text(text, encoding="utf-8")
        return str(dry_run)
    from huggingface_hub import HfApi, get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise ModelError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`")
    api = HfApi(token=token)
    api.create_repo(repo, private=private, exist_ok=True)
    for name, text in generated.items():
        api.upload_file(path_or_fileobj=text.encode("utf-8"), path_in_repo=name, repo_id=repo)
    api.upload_folder(folder_path=str(folder), repo_id=repo, ignore_patterns=["README.md"])
    return f"https://huggingface.co/{repo}"
