"""`tunebench run`: prepare → train → generate → validate → judge → nll → report, resumable.

Each stage checks whether its output is already complete and skips if so; a crashed stage is
resumed by its own mechanism (training from its last checkpoint, generation from its partial
file, judging from its cache). Rerunning the same command after any interruption continues.

A rerun with settings that change a finished artefact (the adapter, its checkpoints, the
predictions, the reference NLL) is refused with the differing keys named, before anything is
written: skipping the stage would report a model that was never trained, and redoing it would
throw finished work away. Each artefact keeps the settings it was made from (adapter/config.yaml,
predictions.settings.json, nll.json's "made_with"). Judge settings may change freely.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunebench.config import Config, to_dict
from tunebench.errors import ConfigError
from tunebench.runs import CONFIG, NLL, RunDir, partial_path, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    run: RunDir
    stages: dict[str, str] = field(default_factory=dict)  # stage → "done", "skipped", or a note
    judge_mean: float | None = None
    nll: float | None = None


def run_pipeline(config: Config, run: RunDir, allow_contamination: bool = False) -> PipelineResult:
    result = PipelineResult(run)
    refuse_changed_settings(config, run)
    run.save_config(config)
    config = data_stage(config, run, allow_contamination, result)
    model = TrainedModel(run)  # loaded at most once, for generate and the reference NLL together
    generate_stage(config, run, model, result)
    judge_stage(config, run, result)
    nll_stage(config, run, model, result)
    from tunebench.report.build import write_report

    write_report([run.root], run.root)
    result.stages["report"] = "done"
    return result


class TrainedModel:
    """The run's trained model for inference, loaded on first use and then shared."""

    def __init__(self, run: RunDir):
        self.run, self.loaded = run, None

    def get(self):
        if self.loaded is None:
            from tunebench.models.trained import load_for_inference

            self.loaded = load_for_inference(str(self.run.root))
        return self.loaded


def data_stage(config: Config, run: RunDir, allow_contamination: bool, result: PipelineResult) -> Config:
    """Prepare the data (a no-op when its fingerprint is unchanged), then train or resume training."""
    from tunebench.data.prepare import prepare
    from tunebench.models.tokenizer import load_tokenizer
    from tunebench.train.sft import train

    tokenizer = load_tokenizer(config.model)
    if config.train.objective != "sft":  # preference pairs, rendered with the template of the run started from
        from tunebench.data.prepare import prepare_pairs as prepare
        from tunebench.train.setup import resolve_start

        config = resolve_start(config).config
    summary = prepare(config, run, tokenizer, config.model.tokenizer or config.model.name_or_path,
                      allow_contamination=allow_contamination)
    result.stages["data"] = "done"
    if run.trained_model() is not None:
        result.stages["train"] = "skipped (already trained)"
    else:
        resume = (run.checkpoints).exists()
        train(config, run, resume=resume, allow_contamination=allow_contamination, prepared=summary)
        result.stages["train"] = "resumed" if resume else "done"
    return config


def generate_stage(config: Config, run: RunDir, model: TrainedModel, result: PipelineResult) -> None:
    """Answer the tasks (skipping answered ones), then validate the submission."""
    from tunebench.generate.answers import generate_answers

    if run.predictions.exists() and not partial_path(run.predictions).exists():
        result.stages["generate"] = "skipped (predictions exist)"
    else:
        loaded = model.get() if config.generate.backend == "transformers" else None
        generate_answers(str(run.root), config.generate.tasks, run.predictions, config.generate, loaded=loaded)
        write_json_atomic(run.predictions_settings, settings_of(config, GENERATE_SECTIONS))
        result.stages["generate"] = "done"
    result.stages["validate"] = write_validation(run, config)


def judge_stage(config: Config, run: RunDir, result: PipelineResult) -> None:
    """Judge when a judge is configured; its cache makes a rerun free."""
    if not config.judge.judge:
        result.stages["judge"] = "skipped (no judge configured)"
        return
    from tunebench.judge.score import judge_predictions

    report = judge_predictions(run.predictions, config.generate.tasks, config.judge)
    result.judge_mean = report.data["mean"]
    result.stages["judge"] = f"mean {report.data['mean']}" if report.data["scored"] else "no scores"


def nll_stage(config: Config, run: RunDir, model: TrainedModel, result: PipelineResult) -> None:
    """The reference-answer NLL: the API-free signal, always reported."""
    nll_path = run.nll
    if nll_path.exists():
        result.nll = json.loads(nll_path.read_text(encoding="utf-8"))["nll"]
        result.stages["nll"] = "skipped (exists)"
        return
    from tunebench.train.nll import reference_nll

    loaded = model.get()
    nll = reference_nll(loaded.model, loaded.tokenizer, loaded.template or config.data.template,
                        limit=config.generate.limit)  # a quick run stays quick (100 tasks: 11 min on CPU)
    write_json_atomic(nll_path, {**nll, "made_with": settings_of(config, TRAIN_SECTIONS)})
    result.nll = nll["nll"]
    result.stages["nll"] = "done"


# Sections a trained model and its predictions depend on, and keys inside them that change neither.
TRAIN_SECTIONS = ("model", "data", "train")
GENERATE_SECTIONS = (*TRAIN_SECTIONS, "generate")
INERT_KEYS = {"data.allow_contamination", "train.logging_steps", "train.save_steps", "train.save_total_limit",
              "train.report_to", "train.eval_steps", "generate.batch_size"}
INERT_KEYS |= {"generate.merge_adapter", "generate.cuda_graphs", "generate.compile"}  # same answers, bf16 rounding aside (as batch_size)
# speed levers of training: the same updates, rounding aside (their CPU tests); their defaults move as they are
# measured (gradient_checkpointing true → auto, compile_dequant false → auto), which must not refuse older runs
INERT_KEYS |= {"train.gradient_checkpointing", "train.offload_frozen", "train.compile", "train.cuda_graphs",
               "train.compile_dequant"}


def settings_of(config: Config, sections: tuple[str, ...]) -> dict[str, Any]:
    """The config's sections as they read back from YAML (so saved and live settings compare equal)."""
    data = yaml.safe_load(yaml.safe_dump(to_dict(config), allow_unicode=True))
    return {section: data[section] for section in sections}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(before: dict[str, Any], after: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """'key: old → new' for each key of `sections` that differs (keys an older version lacked are skipped)."""
    old = flatten({s: before.get(s) or {} for s in sections})
    new = flatten({s: after.get(s) or {} for s in sections})
    return [f"{key}: {old[key]!r} → {new.get(key)!r}" for key in old
            if key not in INERT_KEYS and old[key] != new.get(key)]


def read_settings(path: Path) -> dict[str, Any] | None:
    """Settings kept in a YAML config, a settings JSON, or a result JSON under "made_with"."""
    if not path.exists():
        return None
    if path.suffix != ".json":
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get("made_with") if path.name == NLL else data


def refuse_changed_settings(config: Config, run: RunDir) -> None:
    """Stop when a finished (or half-finished) artefact was made with settings this config changes."""
    trained = run.trained_model()
    partial = partial_path(run.predictions)
    nll_path = run.nll
    # (artefact or None where absent, the settings it was made from, the sections it depends on);
    # the run's last config stands in for artefacts written before they kept their own.
    last = read_settings(run.config_file)
    artefacts = [
        (trained, read_settings(trained / CONFIG) if trained else None, TRAIN_SECTIONS),
        (run.checkpoints if trained is None and run.checkpoints.exists() else None, last, TRAIN_SECTIONS),
        (run.predictions if run.predictions.exists() else partial if partial.exists() else None,
         read_settings(run.predictions_settings) or last, GENERATE_SECTIONS),
        (nll_path if nll_path.exists() else None, read_settings(nll_path) or last, TRAIN_SECTIONS),
    ]
    stale, diffs = [], []
    for artefact, before, sections in artefacts:
        changed = changed_settings(before, settings_of(config, sections), sections) if artefact and before else []
        if changed:
            stale.append(str(artefact))
            diffs += [d for d in changed if d not in diffs]
    if stale:
        raise ConfigError(f"{run.root}: {', '.join(stale)} were made with other settings ({'; '.join(diffs)}); "
                          "rerun with those settings, pass another --run-dir, or delete "
                          f"{', '.join(stale)} to redo {'them' if len(stale) > 1 else 'it'}")


def write_validation(run: RunDir, config: Config) -> str:
    from tunebench.generate.validate import validate_and_record
    from tunebench.tasksets import load_tasks

    tasks = load_tasks(config.generate.tasks)
    if config.generate.limit is not None:
        tasks = tasks[: config.generate.limit]
    issues = validate_and_record(run.predictions, tasks)
    return "ok" if not issues else f"{len(issues)} problem(s)"


def judge_from_environment() -> tuple[str | None, str | None, str]:
    """(judge spec, base url, how it was found) from the environment, for the quickstart."""
    import os

    if os.environ.get("TUNEBENCH_JUDGE"):
        return os.environ["TUNEBENCH_JUDGE"], os.environ.get("TUNEBENCH_JUDGE_BASE_URL"), "TUNEBENCH_JUDGE"
    if os.environ.get("GEMINI_API_KEY"):
        return "gemini:gemini-2.5-flash", None, "GEMINI_API_KEY"
    if os.environ.get("OPENAI_API_KEY"):
        return "openai:gpt-4o-mini", os.environ.get("OPENAI_BASE_URL"), "OPENAI_API_KEY"
    if os.environ.get("OPENAI_BASE_URL"):
        return f"openai:{os.environ.get('TUNEBENCH_JUDGE_MODEL', 'default')}", os.environ["OPENAI_BASE_URL"], \
            "OPENAI_BASE_URL"
    return None, None, ""


def preset(name: str) -> Path:
    """A shipped YAML preset (the `configs/` folder of the repository)."""
    from importlib.resources import files

    return Path(str(files("tunebench").joinpath("presets", f"{name}.yaml")))
