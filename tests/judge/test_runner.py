import json
import signal

import pytest

from tunebench.config import JudgeConfig
from tunebench.errors import JudgeError
from tunebench.judge.score import judge_predictions

from .fake_openai import FakeJudge, write_tasks_and_predictions


def config(fake, **kw):
    return JudgeConfig(judge="openai:fake-judge", base_url=fake.url, backoff_s=0.01, timeout_s=1.0,
                       max_retries=2, **kw)


def test_happy_path_mean_ci_and_files(tmp_path, fake):
    tasks, preds = write_tasks_and_predictions(tmp_path, ["WANT:5 答え", "WANT:3 答え", "WANT:4 答え", "WANT:2 答え"])
    report = judge_predictions(preds, str(tasks), config(fake), progress=False).data
    assert [t["score"] for t in report["per_task"]] == [5, 3, 4, 2]
    assert report["mean"] == 3.5 and report["ci_low"] <= 3.5 <= report["ci_high"] and report["unscored"] == 0
    assert report["rubric"] == "reference-free"
    assert report["per_task"][0]["reason"] == "回答は質問に沿っています。"
    saved = json.loads((preds.parent / "scores.json").read_text())
    assert saved["mean"] == 3.5
    assert len((preds.parent / "judgments.jsonl").read_text().splitlines()) == 4


def test_retries_429_500_timeouts_and_empty_replies(tmp_path, fake):
    tasks, preds = write_tasks_and_predictions(tmp_path, ["CASE:429 WANT:4", "CASE:500 WANT:4", "CASE:SLOW WANT:4", "CASE:EMPTY WANT:4"])
    report = judge_predictions(preds, str(tasks), config(fake, concurrency=4), progress=False).data
    assert [t["score"] for t in report["per_task"]] == [4, 4, 4, 4]
    assert sorted(fake.hits.values()) == [2, 2, 2, 2]  # each failed once, then succeeded


def test_unparsable_reply_is_retried_then_unscored_not_zero(tmp_path, fake):
    tasks, preds = write_tasks_and_predictions(tmp_path, ["CASE:NOSCORE", "WANT:4"])
    report = judge_predictions(preds, str(tasks), config(fake), progress=False).data
    bad = report["per_task"][0]
    assert bad["score"] is None and bad["scores"] == [None] and "no parsable" in bad["error"]
    assert report["mean"] == 4 and report["scored"] == 1 and report["unscored"] == 1
    records = [json.loads(line) for line in (preds.parent / "judgments.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["task_id"] == 0]
    assert record["raw"] == "よくできていますが、点数はつけません。"
    assert max(fake.hits.values()) == 3  # max_retries 2 → 3 attempts


def test_cache_resume_and_rejudging_only_what_changed(tmp_path, fake):
    tasks, preds = write_tasks_and_predictions(tmp_path, ["WANT:5", "WANT:3", "WANT:4"])
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
    tasks, preds = write_tasks_and_predictions(tmp_path, ["WANT:5", "CASE:401", "WANT:4"])
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
    tasks, preds = write_tasks_and_predictions(tmp_path, ["WANT:4"])
    report = judge_predictions(preds, str(tasks), config(fake, samples=3, temperature=0.7), progress=False).data
    assert report["per_task"][0]["scores"] == [4, 4, 4] and report["per_task"][0]["spread"] == 0.0
    assert report["samples"] == 3


def test_missing_api_key_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    tasks, preds = write_tasks_and_predictions(tmp_path, ["x"])
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


def test_unscored_judgments_are_retried_on_a_rerun(tmp_path, fake):
    tasks, preds = write_tasks_and_predictions(tmp_path, ["WANT:5", "WANT:3"])
    fake.down = True  # an outage: every call is a 500
    report = judge_predictions(preds, str(tasks), config(fake), progress=False).data
    assert report["scored"] == 0 and report["unscored"] == 2
    assert report["mean"] is None and report["ci_low"] is None and report["ci_high"] is None
    text = (preds.parent / "scores.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"scores.json holds {c}"))  # strict JSON: no NaN
    fake.down, before = False, fake.total()
    report = judge_predictions(preds, str(tasks), config(fake), progress=False).data
    assert fake.total() - before == 2 and [t["score"] for t in report["per_task"]] == [5, 3]
    judge_predictions(preds, str(tasks), config(fake), progress=False)
    assert fake.total() - before == 2  # scored ones are final: nothing paid twice


def test_cache_is_per_endpoint(tmp_path, fake):
    tasks, preds = write_tasks_and_predictions(tmp_path, ["WANT:5", "WANT:3"])
    judge_predictions(preds, str(tasks), config(fake), progress=False)
    other = FakeJudge()  # the same judge name at another base_url is another judge
    try:
        judge_predictions(preds, str(tasks), config(other), progress=False)
        assert other.total() == 2
    finally:
        other.stop()
    records = [json.loads(line) for line in (preds.parent / "judgments.jsonl").read_text().splitlines()]
    assert {r["endpoint"] for r in records} == {fake.url + "/", other.url + "/"}


def test_records_from_before_the_endpoint_key_are_judged_again(tmp_path, fake):
    tasks, preds = write_tasks_and_predictions(tmp_path, ["WANT:5"])
    old = {"key": "0" * 16, "task_id": 0, "sample": 0, "judge": "openai:fake-judge", "prompt_hash": "p",
           "answer_hash": "a", "score": 1, "reason": None, "raw": "評価: 1", "error": None}
    (preds.parent / "judgments.jsonl").write_text(json.dumps(old) + "\n")
    report = judge_predictions(preds, str(tasks), config(fake), progress=False).data
    assert fake.total() == 1 and report["mean"] == 5


@pytest.fixture
def ctrl_c_raises():
    """The fake's Ctrl-C (_thread.interrupt_main) raises KeyboardInterrupt only where SIGINT has Python's
    handler; a test process started in the background (`cmd &` in a script, nohup) inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_cancels_queued_requests_and_writes_what_finished(tmp_path, fake, capsys, ctrl_c_raises):
    from tunebench.cli import main

    outputs = ["WANT:5", "CASE:INTERRUPT WANT:4"] + [f"WANT:3 その{i}" for i in range(10)]
    tasks, preds = write_tasks_and_predictions(tmp_path, outputs)
    code = main(["judge", str(preds), "--tasks", str(tasks), "--judge", "openai:fake-judge", "--base-url", fake.url,
                 "--concurrency", "1"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert fake.total() <= 3  # the 10 queued requests were never sent (all 12 were before)
    saved = json.loads((preds.parent / "scores.json").read_text())
    assert saved["interrupted"] is True and 2 <= saved["scored"] <= 3 and saved["mean"] is not None
    assert saved["per_task"][-1]["error"] == "not judged"
    assert main(["judge", str(preds), "--tasks", str(tasks), "--judge", "openai:fake-judge", "--base-url", fake.url,
                 "--concurrency", "1"]) == 0
    assert fake.total() == 12  # the rerun judged the rest; the interrupting answer was not paid twice


def test_retry_after_is_honoured_up_to_max_wait_s(tmp_path, fake):
    import time

    tasks, preds = write_tasks_and_predictions(tmp_path, ["CASE:WAIT WANT:4"])
    start = time.monotonic()
    report = judge_predictions(preds, str(tasks), config(fake, max_wait_s=0.2), progress=False).data
    assert report["mean"] == 4 and 0.2 <= time.monotonic() - start < 5  # Retry-After: 30 capped at 0.2 s


@pytest.mark.parametrize("line3, message", [
    ({"task_id": 1, "input": "質問1", "output": "WANT:4"}, "line 3: task_id 1: duplicate of line 2"),
    ({"task_id": 2, "input": "質問2", "output": None}, "line 3: task_id 2: field 'output' must be a string, got NoneType"),
    ({"task_id": 2, "input": "質問2", "output": 123}, "line 3: task_id 2: field 'output' must be a string, got int"),
    ({"task_id": 2, "input": "質問2", "output": ["a"]}, "line 3: task_id 2: field 'output' must be a string, got list"),
    ({"task_id": 2, "input": "質問2", "output": " "}, "line 3: task_id 2: field 'output' is empty"),
])
def test_predictions_are_validated_before_anything_is_sent(tmp_path, fake, line3, message):
    from tunebench.errors import DataError

    tasks, preds = write_tasks_and_predictions(tmp_path, ["WANT:5", "WANT:4", "WANT:3"])
    lines = preds.read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps(line3, ensure_ascii=False)
    preds.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        judge_predictions(preds, str(tasks), config(fake), progress=False)
    assert message in str(caught.value) and str(preds) in str(caught.value)
    assert fake.total() == 0 and not (preds.parent / "scores.json").exists()


def test_a_subset_of_the_tasks_is_judged(tmp_path, fake):
    tasks, preds = write_tasks_and_predictions(tmp_path, ["WANT:5", "WANT:4", "WANT:3"])
    preds.write_text("".join(preds.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    report = judge_predictions(preds, str(tasks), config(fake), progress=False).data
    assert report["scored"] == 2 and report["unscored"] == 0  # generate.limit=2 style runs still judge


def test_judge_exits_non_zero_when_nothing_was_scored(tmp_path, fake, capsys):
    from tunebench.cli import main

    tasks, preds = write_tasks_and_predictions(tmp_path, ["CASE:NOSCORE", "CASE:NOSCORE その2"])
    args = ["judge", str(preds), "--tasks", str(tasks), "--judge", "openai:fake-judge", "--base-url", fake.url,
            "--set", "judge.max_retries=0"]
    assert main(args) == 1
    assert "no answer was scored (2 unscored" in capsys.readouterr().err
