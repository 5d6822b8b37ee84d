"""`tunebench push`: upload an adapter (or merged model) to the Hugging Face Hub with a model card.

The token comes from HF_TOKEN or the `huggingface-cli login` cache and is passed to the client
only: it is never written into the card, the config or any file. `--dry-run` writes the exact
files that would be uploaded into a new or empty folder instead (never one holding anything).

What is published names nothing on the user's disk: the base model by its hub id (the embedded
model by its upstream id), data sources by file name or hub id, and the run's config without
credentials (see config.public_url).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from tunebench.config import public_url
from tunebench.errors import ConfigError, ModelError
from tunebench.models.trained import find_trained
from tunebench.runs import CONFIG, MERGED, SCORES, TRAINED_META
from tunebench.train.methods import get_method

EMBEDDED_UPSTREAM = "google/gemma-3-270m"


def looks_like_hub_id(name: str) -> bool:
    """'user/name' that is not a path on this machine (model ids may hold dots: Llama-3.1-8B)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def public_model_id(name: str) -> str | None:
    """The hub id others can load the base model by; None for a folder on this machine."""
    if name.startswith("embedded:"):
        return EMBEDDED_UPSTREAM
    return name if looks_like_hub_id(name) else None


def public_source(path: str) -> str:
    """A data source as it may be published: built-in name or hub id, else the file name only.
    A source with a file suffix is a file (the rule data.readers applies), never a hub id."""
    if path.startswith("builtin:") or (looks_like_hub_id(path) and not Path(path).suffix):
        return path
    return Path(path).name


def model_card(meta: dict, config: dict, scores: dict | None, repo: str) -> str:
    """A README.md with YAML front matter: base model, data, method, hyperparameters, scores."""
    train = config.get("train", {})
    data = config.get("data", {})
    base = public_model_id(meta["base_model"]) or "a local model"
    front = {"base_model": base,
             "library_name": "peft" if get_method(meta["method"]).peft else "transformers",
             "language": ["ja"], "tags": ["tunebench", meta["method"], "sft"]}
    keys = ("method", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "per_device_train_batch_size",
            "gradient_accumulation_steps", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler",
            "warmup_steps", "seed")
    rows = "\n".join(f"| {k} | {train.get(k)} |" for k in keys if k in train)
    sources = "\n".join(f"- `{public_source(s['path'])}` (weight {s.get('weight', 1.0)})" for s in data.get("sources", []))
    score_text = "No judge scores recorded."
    if scores and scores.get("mean") is not None:  # a judge run that scored nothing has a null mean
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
    """The folder to upload and the generated or rewritten files that replace or join its own."""
    trained = find_trained(run_path)
    if merged:
        trained = find_trained(run_path / MERGED) if (run_path / MERGED).exists() else None
        if trained is None:
            raise ModelError(f"{run_path}: no merged model; run `tunebench merge {run_path}` first")
    if trained is None:
        raise ModelError(f"{run_path}: nothing trained to push (no adapter/ or model/)")
    meta = json.loads((trained / TRAINED_META).read_text(encoding="utf-8"))
    run_root = trained.parent
    config = yaml.safe_load((run_root / CONFIG).read_text(encoding="utf-8")) if (run_root / CONFIG).exists() else {}
    scores = json.loads((run_root / SCORES).read_text(encoding="utf-8")) if (run_root / SCORES).exists() else None
    generated = {"README.md": model_card(meta, config, scores, repo)}
    if (trained / "adapter_config.json").exists():
        generated["adapter_config.json"] = public_adapter_config(
            (trained / "adapter_config.json").read_text(encoding="utf-8"), meta["base_model"])
    generated[TRAINED_META] = json.dumps(
        {**meta, "base_model": public_model_id(meta["base_model"]) or Path(meta["base_model"]).name}, indent=2)
    if (trained / CONFIG).exists():
        generated[CONFIG] = public_run_config((trained / CONFIG).read_text(encoding="utf-8"))
    return trained, generated


def public_adapter_config(text: str, base_model: str) -> str:
    """adapter_config.json naming the base model by hub id, not by its path in the local cache."""
    adapter = json.loads(text)
    adapter["base_model_name_or_path"] = public_model_id(base_model)
    return json.dumps(adapter, indent=2, sort_keys=True)


def public_run_config(text: str) -> str:
    """The run's config.yaml without credentials, local model paths or data paths."""
    config = yaml.safe_load(text) or {}
    judge = config.get("judge") or {}
    if judge.get("base_url"):
        judge["base_url"] = public_url(judge["base_url"])
    model = config.get("model") or {}
    for key in ("name_or_path", "tokenizer"):
        if model.get(key):
            model[key] = public_model_id(model[key]) or Path(model[key]).name
    for source in (config.get("data") or {}).get("sources") or []:
        source["path"] = public_source(source.get("path", ""))
    return yaml.safe_dump(config, allow_unicode=True, sort_keys=False)


def stage_upload(folder: Path, generated: dict[str, str], target: Path) -> None:
    """Copy the trained folder into `target` (which must not exist) and write the generated files."""
    shutil.copytree(folder, target)
    for name, text in generated.items():
        (target / name).write_text(text, encoding="utf-8")


def dry_run_target(dry_run: Path, run_path: Path) -> Path:
    """The folder a dry run writes: DIR itself when new or empty; anything else is refused."""
    dry = dry_run.resolve()
    run = run_path.resolve()
    if dry == run or run in dry.parents or dry in run.parents:
        raise ConfigError(f"--dry-run {dry_run}: is, or is inside or above, the run {run_path}; "
                          "choose a separate folder")
    if dry_run.exists() and (not dry_run.is_dir() or any(dry_run.iterdir())):
        # Never delete or mix into something tunebench did not create.
        raise ConfigError(f"--dry-run {dry_run}: exists and is not an empty folder; choose a new folder")
    return dry_run


def push(run_path: Path, repo: str, private: bool = False, merged: bool = False, dry_run: Path | None = None) -> str:
    folder, generated = collect_upload(run_path, repo, merged)
    if dry_run is not None:
        target = dry_run_target(dry_run, run_path)
        if target.exists():
            target.rmdir()  # empty, checked above; copytree creates it again
        stage_upload(folder, generated, target)
        return str(target)
    from huggingface_hub import HfApi, get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise ModelError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`")
    api = HfApi(token=token)
    api.create_repo(repo, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tunebench-push-") as tmp:
        staged = Path(tmp) / "upload"
        stage_upload(folder, generated, staged)
        api.upload_folder(folder_path=str(staged), repo_id=repo)
    return f"https://huggingface.co/{repo}"
