"""The pipeline end to end on a tiny model, resume after an interruption at each stage, and the quickstart path."""

import json

import pytest

from tunebench.cli import main
from tunebench.config import load_config
from tunebench.pipeline import run_pipeline
from tunebench.runs import RunDir

from .judge.fake_openai import FakeJudge


@pytest.fixture()
def fake():
    server = FakeJudge()
    yield server
    server.stop()


def tiny_config(tiny_model_dir, tasks, fake=None):
    overrides = [f"model.name_or_path={tiny_model_dir}", "data.sources=[{path: 'builtin:ja-instruct-megagon'}]",
                 "data.max_records=12", "data.max_seq_length=96", "data.contamination_sets=[elyza-tasks-100]",
                 "train.method=lora", "train.max_steps=5", "train.save_steps=2", "train.per_device_train_batch_size=2",
                 "train.gradient_accumulation_steps=1", "train.logging_steps=1", "train.warmup_steps=0",
                 f"generate.tasks={tasks}", "generate.max_new_tokens=5", "generate.batch_size=2",
                 "generate.repetition_penalty=1.0", "generate.no_repeat_ngram_size=1"]
    if fake is not None:
        overrides += ["judge.judge=openai:fake", f"judge.base_url={fake.url}", "judge.backoff_s=0.01"]
    return load_config(None, overrides)


@pytest.fixture()
def tasks(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"task_id": i, "input": q}, ensure_ascii=False) + "\n"
                            for i, q in enumerate(["日本の首都は？", "春の俳句を一つ", "1+1は？"])), encoding="utf-8")
    return path


def test_pipeline_end_to_end_then_rerun_skips(tmp_path, tiny_model_dir, tasks, fake):
    run = RunDir(tmp_path / "run")
    result = run_pipeline(tiny_config(tiny_model_dir, tasks, fake), run)
    assert result.stages["train"] == "done" and result.stages["validate"] == "ok"
    assert result.judge_mean == 3.0 and result.nll > 0  # the fake judge answers 評価: 3 without WANT:
    for name in ("config.yaml", "data/summary.json", "adapter/adapter_model.safetensors", "metrics.jsonl",
                 "predictions.jsonl", "validation.json", "judgments.jsonl", "scores.json", "nll.json",
                 "report.html", "report.md"):
        assert (run.root / name).exists(), name
    hits = fake.total()
    again = run_pipeline(tiny_config(tiny_model_dir, tasks, fake), run)
    assert again.stages["train"].startswith("skipped") and again.stages["generate"].startswith("skipped")
    assert again.stages["nll"].startswith("skipped") and fake.total() == hits  # nothing judged twice


@pytest.mark.parametrize("stage", ["train", "generate", "judge", "nll"])
def test_run_resumes_after_interruption_at_each_stage(tmp_path, tiny_model_dir, tasks, fake, monkeypatch, stage):
    import tunebench.generate.engine as engine
    import tunebench.judge.runner as runner
    import tunebench.train.checkpoint as checkpoint
    import tunebench.train.nll as nll

    real = {"train": checkpoint.write_state, "generate": engine.Generator.generate_batch,
            "judge": runner.JudgeRunner.judge_one, "nll": nll.reference_nll}
    calls = []

    def once(*args, **kwargs):
        calls.append(1)
        if len(calls) == (2 if stage in ("train", "generate", "judge") else 1):
            raise KeyboardInterrupt(f"interrupted during {stage}")
        return real[stage](*args, **kwargs)

    target = {"train": (checkpoint, "write_state"), "generate": (engine.Generator, "generate_batch"),
              "judge": (runner.JudgeRunner, "judge_one"), "nll": (nll, "reference_nll")}[stage]
    monkeypatch.setattr(*target, once)
    run = RunDir(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_config(tiny_model_dir, tasks, fake), run)
    monkeypatch.setattr(*target, real[stage])
    result = run_pipeline(tiny_config(tiny_model_dir, tasks, fake), run)
    assert result.stages["validate"] == "ok" and result.judge_mean == 3.0 and (run.root / "report.html").exists()
    if stage == "train":
        assert result.stages["train"] == "resumed"
    else:
        assert result.stages["train"].startswith("skipped")
    predictions = [json.loads(line) for line in run.predictions.read_text(encoding="utf-8").splitlines()]
    assert [p["task_id"] for p in predictions] == [0, 1, 2]


def test_quickstart_code_path_at_reduced_size(tmp_path, tiny_model_dir, tasks, capsys, monkeypatch):
    for name in ("GEMINI_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "TUNEBENCH_JUDGE"):
        monkeypatch.delenv(name, raising=False)
    code = main(["quickstart", "--run-dir", str(tmp_path / "qs"), "--set", f"model.name_or_path={tiny_model_dir}",
                 "--set", "train.max_steps=2", "--set", "data.max_records=8", "--set", f"generate.tasks={tasks}",
                 "--set", "generate.max_new_tokens=4", "--set", "generate.no_repeat_ngram_size=1",
                 "--set", "generate.limit=2"])
    out = capsys.readouterr().out
    assert code == 0
    # the reference NLL follows generate.limit (it scored all 100 tasks: 11 min on 2 cores)
    assert json.loads((tmp_path / "qs" / "nll.json").read_text())["n_tasks"] == 2
    assert f"submission: {tmp_path / 'qs' / 'predictions.jsonl'}" in out and "report.html" in out
    assert "no judge configured: set GEMINI_API_KEY" in out and "reference NLL" in out
    saved = (tmp_path / "qs" / "config.yaml").read_text()
    assert "max_steps: 2" in saved and "builtin:ja-instruct-megagon" in saved


def cli_overrides(tiny_model_dir, tasks):
    return [
        "--set", f"model.name_or_path={tiny_model_dir}", "--set", "data.sources=[{path: 'builtin:ja-instruct-megagon'}]",
        "--set", "data.max_records=12", "--set", "data.max_seq_length=96",
        "--set", "data.contamination_sets=[elyza-tasks-100]", "--set", "train.method=lora",
        "--set", "train.max_steps=3", "--set", "train.per_device_train_batch_size=2",
        "--set", "train.gradient_accumulation_steps=1", "--set", "train.warmup_steps=0",
        "--set", f"generate.tasks={tasks}", "--set", "generate.max_new_tokens=5", "--set", "generate.batch_size=2"]


def test_rerun_with_changed_settings_is_refused_and_failed_validation_exits_non_zero(
        tmp_path, tiny_model_dir, tasks, capsys, fake):
    """One finished run (the slow part: train, generate, NLL), then cheap reruns against it."""
    config = tmp_path / "c.yaml"
    config.write_text("{}\n", encoding="utf-8")
    run = tmp_path / "run"
    base = ["run", str(config), "--run-dir", str(run), *cli_overrides(tiny_model_dir, tasks)]
    assert main(base) == 0
    saved = (run / "config.yaml").read_text()
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()

    # a training setting changed: train/generate would be skipped and the report would lie
    assert main([*base, "--set", "train.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps: 3 → 4" in err and "adapter" in err and "predictions.jsonl" in err
    assert (run / "config.yaml").read_text() == saved  # nothing rewritten
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter

    # a generation setting changed: only the predictions are stale
    assert main([*base, "--set", "generate.max_new_tokens=6"]) == 2
    err = capsys.readouterr().err
    assert "generate.max_new_tokens: 5 → 6" in err and "predictions.jsonl" in err and "adapter" not in err

    # judge settings and logging may change freely
    hits = fake.total()
    assert main([*base, "--set", "judge.judge=openai:fake", "--set", f"judge.base_url={fake.url}",
                 "--set", "train.logging_steps=2"]) == 0
    assert fake.total() > hits and "judge: openai:fake" in (run / "config.yaml").read_text()

    # predictions that fail validation make `run` exit non-zero
    rows = run.joinpath("predictions.jsonl").read_text(encoding="utf-8").splitlines()
    run.joinpath("predictions.jsonl").write_text("\n".join(rows[:-1]) + "\n", encoding="utf-8")
    assert main(base) == 1
    assert "failed validation" in capsys.readouterr().err


def test_training_speed_levers_moving_to_auto_do_not_refuse_an_older_run():
    """An older run saved the levers' old defaults (gradient_checkpointing true, compile_dequant false): the
    same updates, rounding aside, so its artefacts still stand; a setting that changes them is still named."""
    from tunebench.pipeline import changed_settings

    before = {"train": {"gradient_checkpointing": True, "compile_dequant": False, "max_steps": 3}}
    after = {"train": {"gradient_checkpointing": "auto", "compile_dequant": "auto", "max_steps": 3}}
    assert changed_settings(before, after, ("train",)) == []
    after["train"]["max_steps"] = 4
    assert changed_settings(before, after, ("train",)) == ["train.max_steps: 3 → 4"]
