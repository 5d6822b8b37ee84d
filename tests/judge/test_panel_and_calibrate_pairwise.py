"""Judge panels for `tunebench judge`, and `judge calibrate --pairwise`, against scripted servers."""

import json

from tunebench.cli import main
from tunebench.config import JudgeConfig
from tunebench.judge.calibrate_pairwise import calibrate_pairwise, clear_pairs
from tunebench.judge.panel import judge_panel, majority

from .fake_openai import write_tasks_and_predictions


def test_majority():
    assert majority(["A", "A", "B"]) == "A" and majority(["A", "B"]) == "tie"
    assert majority([None, "B"]) == "B" and majority([None, None]) is None


def test_judge_panel_reports_each_judge_the_mean_and_agreement(tmp_path, fake):
    tasks, preds = write_tasks_and_predictions(tmp_path, ["WANT:5 答え", "WANT:2 答え", "CASE:NOSCORE 答え"])
    # Two scripted judges that agree; the reply without a score is unscored for both, so for the panel.
    config = JudgeConfig(base_url=fake.url, backoff_s=0.01, max_retries=0)
    report = judge_panel(preds, str(tasks), config, ["openai:fake-a", "openai:fake-b"], progress=False).data
    assert [t["score"] for t in report["per_task"]] == [5, 2, None]
    assert report["mean"] == 3.5 and report["scored"] == 2 and report["unscored"] == 1
    judges = report["panel"]["judges"]
    assert [j["judge"] for j in judges] == ["openai:fake-a", "openai:fake-b"] and judges[0]["mean"] == 3.5
    (pair,) = report["panel"]["agreement"]
    assert pair["n"] == 2 and pair["exact"] == 1.0
    saved = json.loads((preds.parent / "scores.json").read_text(encoding="utf-8"))
    assert saved["judge"] == "panel: openai:fake-a, openai:fake-b" and saved["mean"] == 3.5


def test_calibrate_pairwise_on_clear_pairs(tmp_path, fake, capsys):
    folder = tmp_path / "cal"
    folder.mkdir()
    rows = [  # task 0: 5 vs 2 (clear), 5 vs 4 (not); task 1: 1 vs 4 (clear); one row without a score
        {"model": "m1", "task_id": 0, "output": "GOOD よい答え", "scores": {"ref": 5}},
        {"model": "m2", "task_id": 0, "output": "悪い答え", "scores": {"ref": 2}},
        {"model": "m3", "task_id": 0, "output": "GOOD まあまあ", "scores": {"ref": 4}},
        {"model": "m1", "task_id": 1, "output": "誤った答え", "scores": {"ref": 1}},
        {"model": "m2", "task_id": 1, "output": "GOOD 正しい答え", "scores": {"ref": 4}},
        {"model": "m3", "task_id": 1, "output": "答え", "scores": {}},
    ]
    (folder / "shaberi_elyza100.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                   encoding="utf-8")
    assert len(clear_pairs([r for r in rows if r["scores"]], "ref")) == 3  # 5-2, 2-4(m3), 1-4
    config = JudgeConfig(judge="openai:pair-good", base_url=fake.url, backoff_s=0.01, max_retries=0)
    good = calibrate_pairwise(config, 10, tmp_path / "out", str(folder), "ref", progress=False)
    assert good["n"] == 3 and good["picked_higher"] == 1.0 and good["position_consistency"] == 1.0
    first = calibrate_pairwise(JudgeConfig(judge="openai:pair-first", base_url=fake.url, backoff_s=0.01, max_retries=0),
                               10, tmp_path / "out2", str(folder), "ref", progress=False)
    assert first["tied"] == 1.0 and first["picked_higher"] == 0.0 and first["position_consistency"] == 0.0
    assert json.loads((tmp_path / "out" / "calibration_pairwise.json").read_text())["n"] == 3
    calls = fake.total()
    assert main(["judge", "calibrate", "--pairwise", "--judge", "openai:pair-good", "--base-url", fake.url,
                 "--data", str(folder), "--reference-judge", "ref", "--out", str(tmp_path / "out")]) == 0
    assert fake.total() == calls  # the same pairs, answered from the cache
    assert "picked the higher-scored answer 100.0%, tie 0.0%, picked the lower 0.0%" in capsys.readouterr().out


def test_judge_cli_with_a_panel(tmp_path, fake, capsys):
    tasks, preds = write_tasks_and_predictions(tmp_path, ["WANT:5 答え", "WANT:3 答え"])
    assert main(["judge", str(preds), "--tasks", str(tasks), "--judge", "openai:fake-a", "--judge", "gpt4"]) == 2
    assert "expected BACKEND:MODEL" in capsys.readouterr().err and fake.total() == 0
    assert main(["judge", str(preds), "--tasks", str(tasks), "--judge", "openai:fake-a", "--judge", "openai:fake-b",
                 "--base-url", fake.url]) == 0
    out = capsys.readouterr().out
    assert "judge panel: openai:fake-a, openai:fake-b" in out and "mean 4.000" in out
    assert "agreement openai:fake-a / openai:fake-b on 2: exact 100.0%" in out
