"""`tunebench generate`: answers for a task set in the submission format, resumable.

Each finished answer is appended to `<out>.partial` at once; a rerun skips task_ids already
there. When every task is answered, the submission is written in task order and validated.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tunebench.config import GenerateConfig, ModelConfig
from tunebench.errors import ConfigError
from tunebench.generate.engine import GenerationBackend, Generator
from tunebench.generate.validate import validate_and_record
from tunebench.models.trained import LoadedModel, pick_template
from tunebench.runs import append_jsonl, partial_path, read_jsonl
from tunebench.tasksets import load_tasks

log = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    path: Path
    answered: int
    reused: int
    seconds: float
    new_tokens: int
    hit_max_tokens: int


def read_partial(path: Path, inputs: dict) -> dict:
    """Answers already written by an earlier (interrupted) run, keyed by task_id."""
    done = {}
    for row in read_jsonl(path):  # a line cut by a crash is skipped: that task is answered again
        if inputs.get(row.get("task_id")) == row.get("input") and isinstance(row.get("output"), str):
            done[row["task_id"]] = row
    return done


def generate_answers(target: str, tasks_name: str, out: Path, config: GenerateConfig,
                     template: str | None = None, model_config: ModelConfig | None = None,
                     loaded: LoadedModel | None = None) -> GenerateResult:
    """Answer the tasks into `out` (resumable); `loaded`: the target already loaded (the pipeline
    shares one load between generate and the reference NLL)."""
    tasks = load_tasks(tasks_name)
    if config.limit is not None:
        tasks = tasks[: config.limit]
    partial = partial_path(out)
    done = read_partial(partial, {t.task_id: t.input for t in tasks})
    todo = [t for t in tasks if t.task_id not in done]
    start = time.perf_counter()
    new_tokens = hit_max = 0
    if todo:
        generator = build_generator(target, config, template, model_config, loaded)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tqdm(total=len(tasks), initial=len(done), desc="generate", unit="task", dynamic_ncols=True) as bar:
            def save(answer):
                task = todo[answer.index]
                row = {"task_id": task.task_id, "input": task.input, "output": answer.text}
                append_jsonl(partial, row)
                done[task.task_id] = row

            answers = generator.generate([[{"role": "user", "content": t.input}] for t in todo], save, bar)
        new_tokens = sum(a.new_tokens for a in answers)
        hit_max = sum(not a.stopped for a in answers)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for task in tasks:
            handle.write(json.dumps(done[task.task_id], ensure_ascii=False) + "\n")
    tmp.replace(out)
    partial.unlink(missing_ok=True)
    problems = validate_and_record(out, tasks)
    for problem in problems:
        log.error("%s", problem)
    if problems:
        raise ConfigError(f"{out}: {len(problems)} validation problem(s); see above")
    return GenerateResult(out, len(todo), len(tasks) - len(todo), time.perf_counter() - start, new_tokens, hit_max)


def build_generator(target: str, config: GenerateConfig, template: str | None, model_config: ModelConfig | None,
                    loaded: LoadedModel | None = None) -> GenerationBackend:
    if config.backend == "vllm":
        from tunebench.generate.vllm_backend import VllmGenerator

        return VllmGenerator(target, config, template)
    from tunebench.models.trained import load_for_inference

    loaded = loaded or load_for_inference(target, model_config=model_config)
    return Generator(loaded.model, loaded.tokenizer, pick_template(loaded.template, template, loaded.tokenizer), config)
