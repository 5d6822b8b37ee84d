"""`tunebench compare` end to end: the CLI, the report with the pairwise result on top, and
`tunebench serve` (a tiny real model over HTTP) as the judge."""

import json
import shutil
import subprocess

import pytest

from tunebench.cli import main
from tunebench.config import JudgeConfig
from tunebench.judge.compare import compare_runs
from tunebench.judge.pairwise import parse_verdict

from .fake_openai import FakeJudge
from .test_pairwise import write_runs


def test_compare_cli_writes_result_and_report(tmp_path, capsys):
    tasks, a, b = write_runs(tmp_path, ["答え<script>", "GOOD 答え"], ["GOOD よい答え", "答え"])
    server = FakeJudge()
    try:
        code = main(["compare", str(a), str(b), "--tasks", str(tasks), "--judge", "openai:pair-good",
                     "--judge", "openai:pair-first", "--base-url", server.url, "--out", str(tmp_path / "cmp")])
    finally:
        server.stop()
    assert code == 0
    printed = capsys.readouterr().out
    assert "openai:pair-good: try2 vs try1: 1 win(s), 0 tie(s), 1 loss(es)" in printed
    assert "position consistency 0.0%" in printed  # pair-first never agrees with itself
    assert "agreement openai:pair-good / openai:pair-first: 0.0% of 2 task(s)" in printed
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text(encoding="utf-8"))
    assert saved["panel"]["ties"] == 2  # one judge each way: no majority
    html = (tmp_path / "cmp" / "report.html").read_text(encoding="utf-8")
    assert html.index('id="pairwise"') < html.index("<h2>Scores</h2>")  # the pairwise result leads
    assert "pairwise verdict" in html and "try1 wins" in html and "答え&lt;script&gt;" in html
    assert html.count("[33% Japanese]") == 1  # "GOOD 答え": 4 Latin letters, 2 Japanese; flagged beside it
    for run in (a, b):  # `tunebench report` reads run directories
        (run / "config.yaml").write_text(f"name: {run.name}\n", encoding="utf-8")
    code = main(["report", str(a), str(b), "--compare", str(tmp_path / "cmp" / "compare.json"),
                 "--out", str(tmp_path / "rep")])
    assert code == 0 and 'id="pairwise"' in (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")


def test_compare_without_a_judge_is_a_clear_error(tmp_path, capsys):
    tasks, a, b = write_runs(tmp_path, ["答え"], ["答え"])
    assert main(["compare", str(a), str(b), "--tasks", str(tasks)]) == 2
    assert "no judge configured" in capsys.readouterr().err
    assert main(["compare", str(a), str(tmp_path / "nowhere"), "--tasks", str(tasks), "--judge", "openai:x",
                 "--base-url", "http://127.0.0.1:9/v1"]) == 2


def test_compare_with_tunebench_serve_as_judge(tmp_path, tiny_judge_url):
    tasks, a, b = write_runs(tmp_path, ["東京です。"], ["大阪です。"])
    config = JudgeConfig(base_url=tiny_judge_url, max_retries=0, backoff_s=0.01)
    result = compare_runs(a, b, str(tasks), config, ["openai:tiny"], tmp_path / "out", progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "pairwise_judgments.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["raw"] for r in records)  # the model answered both orders over HTTP
    verdict = result["per_task"][0]["verdicts"]["openai:tiny"]
    for record in records:  # each reply was parsed, not defaulted
        assert record["score"] == parse_verdict(record["raw"])
    if any(r["score"] is None for r in records):
        assert verdict["winner"] is None and result["headline"]["unscored"] == 1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_pairwise_report_renders_in_headless_chromium(tmp_path):
    tasks, a, b = write_runs(tmp_path, ["答え", "GOOD 答え"], ["GOOD よい答え", "答え"])
    server = FakeJudge()
    try:
        assert main(["compare", str(a), str(b), "--tasks", str(tasks), "--judge", "openai:pair-good",
                     "--base-url", server.url, "--out", str(tmp_path / "cmp")]) == 0
    finally:
        server.stop()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", (tmp_path / "cmp" / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    first_heading = dom.index("<h2>")
    assert dom[first_heading:].startswith("<h2>Pairwise: try2 (B) vs try1 (A)</h2>")
    assert 'id="pairwise-table"' in dom and "1 / 0 / 1" in dom and dom.count("try1 first]") == 2
