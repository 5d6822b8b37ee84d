"""`tunebench run`: prepare → train → generate → validate → judge → nll → report, resumable.

Each stage checks whether its output is already complete and skips if so; a crashed stage is
resumed by its own mechanism (training from its last checkpoint, generation from its partial
file, judging from its cache). Rerunning the same command after any interruption continues.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tunebench.config import Config
from tunebench.runs import RunDir, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    run: RunDir
    stages: dict[str, str] = field(default_factory=dict)  # stage → "done", "skipped", or a note
    judge_mean: float | None = None
    nll: float | None = None


def run_pipeline(config: Config, run: RunDir, allow_contamination: bool = False) -> PipelineResult:
    from tunebench.data.prepare import prepare
    from tunebench.generate.answers import generate_answers
    from tunebench.models.tokenizer import load_tokenizer
    from tunebench.train.sft import train

    result = PipelineResult(run)
    run.save_config(config)

    # 1. data (the fingerprint makes this a no-op when nothing changed)
    tokenizer = load_tokenizer(config.model)
    if config.train.objective != "sft":  # preference pairs, rendered with the template of the run started from
        from tunebench.data.prepare import prepare_pairs as prepare
        from tunebench.train.setup import resolve_start

        config = resolve_start(config).config
    summary = prepare(config, run, tokenizer, config.model.tokenizer or config.model.name_or_path,
                      allow_contamination=allow_contamination)
    result.stages["data"] = "done"

    # 2. train (resumes from the last checkpoint after a crash)
    if run.trained_model() is not None:
        result.stages["train"] = "skipped (already trained)"
    else:
        resume = (run.checkpoints).exists()
        train(config, run, resume=resume, allow_contamination=allow_contamination, prepared=summary)
        result.stages["train"] = "resumed" if resume else "done"

    # 3–4. generate + validate (skips answered tasks; validation runs at its end)
    if run.predictions.exists() and not run.predictions.with_name("predictions.jsonl.partial").exists():
        result.stages["generate"] = "skipped (predictions exist)"
    else:
        generate_answers(str(run.root), config.generate.tasks, run.predictions, config.generate)
        result.stages["generate"] = "done"
    result.stages["validate"] = write_validation(run, config)

    # 5. judge (only when configured; its cache makes a rerun free)
    if config.judge.judge:
        from tunebench.judge.score import judge_predictions

        report = judge_predictions(run.predictions, config.generate.tasks, config.judge)
        result.judge_mean = report.data["mean"]
        result.stages["judge"] = f"mean {report.data['mean']}" if report.data["scored"] else "no scores"
    else:
        result.stages["judge"] = "skipped (no judge configured)"

    # 6. reference NLL: the API-free signal, always reported
    nll_path = run.root / "nll.json"
    if nll_path.exists():
        result.nll = json.loads(nll_path.read_text(encoding="utf-8"))["nll"]
        result.stages["nll"] = "skipped (exists)"
    else:
        from tunebench.judge.nll import reference_nll
        from tunebench.models.trained import load_for_inference

        loaded = load_for_inference(str(run.root))
        nll = reference_nll(loaded.model, loaded.tokenizer, loaded.template or config.data.template)
        write_json_atomic(nll_path, nll)
        result.nll = nll["nll"]
        result.stages["nll"] = "done"

    # 7. report
    from tunebench.report.build import write_report

    write_report([run.root], run.root)
    result.stages["report"] = "done"
    return result


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
