import json

import pytest

from tunebench.config import JudgeConfig
from tunebench.errors import JudgeError
from tunebench.judge.score import judge_predictions

from .fake_openai import FakeJudge


@pytest.fixture()
def fake():
    server = FakeJudge()
    yield server
    server.stop()


def setup_files(tmp_path, outputs):
    tasks = tmp_path / "tasks.jsonl"
    preds = tmp_path / "run" / "predictions.jsonl"
    preds.parent.mkdir()
    tasks.write_text("".join(json.dumps({"task_id": i, "input": f"質問{i}"}, ensure_ascii=False) + "\n"
                             for i in range(len(outputs))), encoding="utf-8")
    preds.write_text("".join(json.dumps({"task_id": i, "input": f"質問{i}", "output": o}, ensure_ascii=False) + "\n"
                             for i, o in enumerate(outputs)), encoding="utf-8")
    return tasks, preds


def config(fake, **kw):
    return JudgeConfig(judge="openai:fake-judge", base_url=fake.url, backoff_s=0.01, timeout_s=1.0,
                       max_retries=2, **kw)


def test_happy_path_mean_ci_and_files(tmp_path, fake):
    tasks, preds = setup_files(tmp_path, ["WANT:5 答え", "WANT:3 答え", "WANT:4 答え", "WANT:2 答え"])
    report = judge_predictions(preds, str(tasks), config(fake), progress=False).data
    assert [t["score"] for t in report["per_task"]] == [5, 3, 4, 2]
    assert report["mean"] == 3.5 and report["ci_low"] <= 3.5 <= report["ci_high"] and report["unscored"] == 0
    assert report["rubric"] == "reference-free"
    assert report["per_task"][0]["reason"] == "回答は質問に沿っています。"
    saved = json.loads((preds.parent / "scores.json").read_text())
    assert saved["mean"] == 3.5
    assert len((preds.parent / "judgments.jsonl").read_text().splitlines()) == 4


def test_retries_429_500_timeouts_and_empty_replies(tmp_path, fake):
    tasks, preds = setup_files(tmp_path, ["CASE:429 WANT:4", "CASE:500 WANT:4", "CASE:SLOW WANT:4", "CASE:EMPTY WANT:4"])
    report = judge_predictions(preds, str(tasks), config(fake, concurrency=4), progress=False).data
    assert [t["score"] for t in report["per_task"]] == [4, 4, 4, 4]
    assert sorted(fake.hits.values()) == [2, 2, 2, 2]  # each failed once, then succeeded


def test_unparsable_reply_is_retried_then_unscored_not_zero(tmp_path, fake):
    tasks, preds = setup_files(tmp_path, ["CASE:NOSCORE", "WANT:4"])
    report = judge_predictions(preds, str(tasks), config(fake), progress=False).data
    bad = report["per_task"][0]
    assert bad["score"] is None and bad["scores"] == [None] and "no parsable" in bad["error"]
    assert report["mean"] == 4 and report["scored"] == 1 and report["unscored"] == 1
    records = [json.loads(line) for line in (preds.parent / "judgments.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["task_id"] == 0]
    assert record["raw"] == "よくできていますが、点数はつけません。"
    assert max(fake.hits.values()) == 3  # max_retries 2 → 3 attempts


def test_cache_resume_and_rejudging_only_what_changed(tmp_path, fake):
    tasks, preds = setup_files(tmp_path, ["WANT:5", "WANT:3", "WANT:4"])
    judge_predictions(preds, str(tasks), config(fake), progress=False)
    assert fake.total() == 3
    judge_predictions(preds, str(tasks), config(fake), progress=False)
    assert fake.total() == 3  # nothing paid twice
    lines = preds.read_text(encoding="utf-8").splitlines()
    lines[1] = json.dumps({"task_id": 1, "input": "質問1", "output": "WANT:1 直した"}, ensure_ascii=False)
    preds.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = judge_predictions(preds, str(tasks), config(fake), progress=False).data
    assert fake.total() == 4 and [t["score"] for t in report["per_task"]] == [5, 1, 4]
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("問: {input}\n答: {output}\n最後に 評価: N", encoding="utf-8")
    judge_predictions(preds, str(tasks), config(fake, prompt_file=str(rubric)), progress=False)
    assert fake.total() == 7  # a new prompt re-judges everything


def test_interrupted_run_resumes(tmp_path, fake):
    tasks, preds = setup_files(tmp_path, ["WANT:5", "CASE:401", "WANT:4"])
    with pytest.raises(JudgeError, match=r"refused the request \(401\)"):
        judge_predictions(preds, str(tasks), config(fake, concurrency=1), progress=False)
    done = len((preds.parent / "judgments.jsonl").read_text().splitlines())
    assert done >= 1  # what finished before the failure is kept
    before = fake.total()
    lines = preds.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace("CASE:401", "WANT:2")
    preds.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = judge_predictions(preds, str(tasks), config(fake), progress=False).data
    assert fake.total() - before == 3 - done and [t["score"] for t in report["per_task"]] == [5, 2, 4]


def test_samples_report_spread(tmp_path, fake):
    tasks, preds = setup_files(tmp_path, ["WANT:4"])
    report = judge_predictions(preds, str(tasks), config(fake, samples=3, temperature=0.7), progress=False).data
    assert report["per_task"][0]["scores"] == [4, 4, 4] and report["per_task"][0]["spread"] == 0.0
    assert report["samples"] == 3


def test_missing_api_key_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    tasks, preds = setup_files(tmp_path, ["x"])
    with pytest.raises(JudgeError, match="set the environment variable OPENAI_API_KEY"):
        judge_predictions(preds, str(tasks), JudgeConfig(judge="openai:gpt-4o-mini"), progress=False)


def test_elyza_tasks_use_the_reference_rubric(tmp_path, fake):
    row = json.loads(open("src/tunebench/builtin/elyza-tasks-100.jsonl", encoding="utf-8").readline())
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"task_id": 0, "input": row["input"], "output": "WANT:5 答え"}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    report = judge_predictions(preds, "elyza-tasks-100", config(fake), progress=False).data
    assert report["rubric"] == "reference" and report["mean"] == 5
    (prompt,) = fake.hits
    assert row["output"][:30] in prompt and row["eval_aspect"].strip()[:20] in prompt
