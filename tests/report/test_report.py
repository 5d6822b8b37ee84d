"""Reports: built from constructed run folders, checked in the DOM and in headless Chromium."""

import json
import shutil
import subprocess

import pytest

from tunebench.cli import main
from tunebench.report.collect import config_differences, load_run, wins_and_losses


def make_run(root, name, lr, scores, losses, outputs):
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(f"name: {name}\nmodel:\n  name_or_path: m\ntrain:\n  method: lora\n"
                                      f"  learning_rate: {lr}\n", encoding="utf-8")
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                                for i, v in enumerate(losses)), encoding="utf-8")
    (root / "predictions.jsonl").write_text("".join(
        json.dumps({"task_id": i, "input": f"質問{i}", "output": o}, ensure_ascii=False) + "\n"
        for i, o in enumerate(outputs)), encoding="utf-8")
    per_task = [{"task_id": i, "score": s, "scores": [s], "reason": "理由", "error": None} for i, s in enumerate(scores)]
    valid = [s for s in scores if s is not None]
    (root / "scores.json").write_text(json.dumps({
        "judge": "openai:x", "mean": sum(valid) / len(valid), "ci_low": 1.5, "ci_high": 4.0, "scored": len(valid),
        "unscored": len(scores) - len(valid), "per_task": per_task}), encoding="utf-8")
    (root / "nll.json").write_text(json.dumps({"nll": 2.5 - lr * 1000}), encoding="utf-8")
    (root / "validation.json").write_text(json.dumps({"ok": True, "tasks": len(outputs), "issues": []}))
    (root / "data").mkdir()
    (root / "data" / "summary.json").write_text(json.dumps({"read": 10, "kept": 8, "truncated": 1,
                                                            "dropped": {"duplicate": 2}, "train_tokens": 900,
                                                            "answer_tokens": 400}))
    return root


@pytest.fixture()
def two_runs(tmp_path):
    a = make_run(tmp_path / "a", "try1", 2e-4, [2, 3, 4, None], [3.0, 2.5, 2.2], ["短い", "答え<b>", "長めの答えです", "x"])
    b = make_run(tmp_path / "b", "try2", 1e-4, [4, 3, 1, 5], [3.1, 2.4, 1.9], ["長い答え", "答え", "え", "五点"])
    return a, b


def test_config_differences_and_wins(two_runs):
    a, b = (load_run(p) for p in two_runs)
    assert config_differences([a, b]) == {"name": ["try1", "try2"], "train.learning_rate": [2e-4, 1e-4]}
    wins, losses = wins_and_losses(a, b)
    assert wins == [(0, 2, 4, 2)] and losses == [(2, 4, 1, -3)]  # task 3 unscored in a: not compared


def test_report_html_and_markdown(two_runs, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(two_runs[0]), str(two_runs[1]), "--out", str(out)]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="score-table"' in html and html.count('class="series"') == 2 and "<svg" in html
    assert "3.000 [1.50, 4.00]" in html and "答え&lt;b&gt;" in html  # answers are escaped
    assert "<td>8</td><td>1</td><td>2 duplicate</td>" in html  # data summary: kept, truncated, dropped
    assert 'id="wins-table"' in html and 'id="losses-table"' in html and "train.learning_rate" in html
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| try1 | m | lora | 2.200 | 3.000 [1.50, 4.00] | 3/1 |" in md
    assert "Biggest wins of try2: task 0 (+2.0)" in md


def test_leaderboard_orders_by_judge_mean(two_runs, capsys):
    assert main(["runs", str(two_runs[0].parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("try2") and lines[3].startswith("try1")  # 3.25 > 3.0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(two_runs, tmp_path):
    out = tmp_path / "report"
    main(["report", str(two_runs[0]), str(two_runs[1]), "--out", str(out)])
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (out / "report.html").as_uri()
    dom = subprocess.run(["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'id="score-table"' in dom and dom.count("<polyline") == 2 and "try2" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,900", url],
                   capture_output=True, timeout=120)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1200
    assert len(png) > 20_000  # a blank page compresses to a few kB; tables, text and plots do not


def test_report_plots_reward_margin_and_accuracy_of_a_preference_run(two_runs, tmp_path):
    sft, dpo = two_runs
    (dpo / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": i + 1, "loss": 0.69 - 0.1 * i, "reward_margin": 0.2 * i, "reward_accuracy": 0.5 + 0.1 * i}) + "\n"
        for i in range(3)), encoding="utf-8")
    out = tmp_path / "report"
    assert main(["report", str(sft), str(dpo), "--out", str(out)]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Preference rewards" in html and "reward margin (chosen − rejected)" in html and "reward accuracy" in html
    assert html.count('class="series"') == 2 + 2  # the loss chart's two runs, then one line per preference chart
    assert main(["report", str(sft), "--out", str(tmp_path / "plain")]) == 0
    assert "Preference rewards" not in (tmp_path / "plain" / "report.html").read_text(encoding="utf-8")
