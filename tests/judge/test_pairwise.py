"""Pairwise comparison: position swap, caching, unscored pairs, panels, length control, against
scripted OpenAI-compatible judges on 127.0.0.1."""

import json

import pytest

from tunebench.config import JudgeConfig
from tunebench.judge.compare import compare_runs, format_result
from tunebench.judge.pairwise import combine_orders, parse_verdict, preferred_run, verdict_reason


def write_runs(tmp_path, answers_a, answers_b):
    """Two run folders answering the same task file; returns (tasks, run_a, run_b)."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"task_id": i, "input": f"質問{i}"}, ensure_ascii=False) + "\n"
                             for i in range(len(answers_a))), encoding="utf-8")
    runs = []
    for name, answers in (("try1", answers_a), ("try2", answers_b)):
        run = tmp_path / name
        run.mkdir()
        (run / "predictions.jsonl").write_text(
            "".join(json.dumps({"task_id": i, "input": f"質問{i}", "output": o}, ensure_ascii=False) + "\n"
                    for i, o in enumerate(answers)), encoding="utf-8")
        runs.append(run)
    return tasks, runs[0], runs[1]


def config(fake, **kw):
    return JudgeConfig(base_url=fake.url, backoff_s=0.01, timeout_s=2.0, max_retries=1, **kw)


def test_parse_verdict_forms():
    assert parse_verdict("理由。\n判定: A") == "A"
    assert parse_verdict("理由。\n判定：Ｂ") == "B"  # full-width, NFKC
    assert parse_verdict("理由。\n判定: 引き分け") == "tie"
    assert parse_verdict("初めは判定: A と思ったが…\n判定: B") == "B"  # the last verdict counts
    assert parse_verdict("Both are fine. [[C]]") == "tie" and parse_verdict("[[B]]") == "B"
    assert parse_verdict("どちらも良い回答です。") is None and parse_verdict("") is None
    assert verdict_reason("理由です。\n判定: A") == "理由です。"


def test_orders_map_back_to_runs_and_combine():
    assert preferred_run("A", "AB") == "A" and preferred_run("A", "BA") == "B"
    assert preferred_run("B", "BA") == "A" and preferred_run("tie", "BA") == "tie"
    assert combine_orders("B", "B") == ("B", True)
    assert combine_orders("A", "B") == ("tie", False)  # the orders disagree: no win
    assert combine_orders("tie", "tie") == ("tie", True)
    assert combine_orders(None, "A") == (None, None)  # unscored, never counted


def test_first_position_judge_yields_ties(tmp_path, fake):
    # B's answers are better (GOOD) on every task, but this judge only ever picks the first shown.
    tasks, a, b = write_runs(tmp_path, [f"答え{i}" for i in range(20)], [f"GOOD 答え{i}" for i in range(20)])
    result = compare_runs(a, b, str(tasks), config(fake), ["openai:pair-first"], tmp_path / "out", progress=False)
    head = result["headline"]
    assert head["ties"] / head["scored"] >= 0.95 and head["wins"] == head["losses"] == 0
    assert head["win_rate"] == 0.5 and head["position_consistency"] == 0.0
    assert fake.total() == 40  # both orders of every pair


def test_consistent_judge_wins_cache_resume_and_files(tmp_path, fake):
    tasks, a, b = write_runs(tmp_path, ["GOOD 正しい", "答え", "答え", "答え"], ["答え", "GOOD よい", "GOOD よい", "答え"])
    out = tmp_path / "out"
    result = compare_runs(a, b, str(tasks), config(fake), ["openai:pair-good"], out, progress=False)
    head = result["headline"]
    assert (head["wins"], head["ties"], head["losses"]) == (2, 1, 1)
    assert head["win_rate"] == pytest.approx((2 + 0.5) / 4) and head["ci_low"] <= head["win_rate"] <= head["ci_high"]
    assert head["position_consistency"] == 1.0
    assert [row["winner"] for row in result["per_task"]] == ["A", "B", "B", "tie"]
    verdict = result["per_task"][1]["verdicts"]["openai:pair-good"]
    assert verdict["orders"] == {"AB": "B", "BA": "B"} and verdict["reasons"]["AB"] == "回答を比べました。"
    saved = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert saved["headline"]["wins"] == 2 and saved["a"]["name"] == "try1" and saved["b"]["name"] == "try2"
    assert fake.total() == 8
    again = compare_runs(a, b, str(tasks), config(fake), ["openai:pair-good"], out, progress=False)
    assert fake.total() == 8 and again["headline"] == head  # cached: nothing judged twice
    lines = (b / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    lines[3] = json.dumps({"task_id": 3, "input": "質問3", "output": "GOOD 直した"}, ensure_ascii=False)
    (b / "predictions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    changed = compare_runs(a, b, str(tasks), config(fake), ["openai:pair-good"], out, progress=False)
    assert fake.total() == 10 and changed["headline"]["wins"] == 3  # only the changed pair, both orders
    assert "try2 vs try1: 3 win(s), 0 tie(s), 1 loss(es)" in format_result(changed)


def test_unparsable_pairs_are_unscored_not_ties(tmp_path, fake):
    tasks, a, b = write_runs(tmp_path, ["答え CASE:NOSCORE", "答え"], ["答え", "GOOD 答え"])
    result = compare_runs(a, b, str(tasks), config(fake), ["openai:pair-good"], tmp_path / "out", progress=False)
    head = result["headline"]
    assert head["scored"] == 1 and head["unscored"] == 1 and head["wins"] == 1 and head["ties"] == 0
    bad = result["per_task"][0]["verdicts"]["openai:pair-good"]
    assert bad["winner"] is None and "no parsable verdict" in bad["errors"]["AB"]
    assert bad["unparsed"]["AB"] == "よくできていますが、点数はつけません。"  # kept for the report


def test_longer_answer_judge_is_flagged_by_length_control(tmp_path, fake):
    # B is longer on 16 of 20 tasks, by amounts spread on both sides of zero; the judge picks the longer.
    extra = [3, 40, 80, 5, 120, 60, 10, 90, 25, 70, 150, 2, 35, 55, 100, 15]
    answers_a = ["あ" * 50] * 20
    answers_b = ["あ" * (50 + e) for e in extra] + ["あ" * (50 - e) for e in (2, 30, 8, 45)]
    tasks, a, b = write_runs(tmp_path, answers_a, answers_b)
    result = compare_runs(a, b, str(tasks), config(fake), ["openai:pair-longer"], tmp_path / "out", progress=False)
    lc = result["headline"]["length_control"]
    assert result["headline"]["win_rate"] == 0.8 and result["headline"]["position_consistency"] == 1.0
    assert abs(lc["lc_win_rate"] - 0.5) < 0.15 and lc["winner_simply_longer"] and lc["longer_won_share"] == 1.0
    assert "the winner (try2) is simply longer" in format_result(result)
    # A judge that prefers content does not get flagged even though B is also longer here.
    good_b = [("GOOD " if i % 5 else "") + t for i, t in enumerate(answers_b)]
    (b / "predictions.jsonl").write_text("".join(json.dumps({"task_id": i, "input": f"質問{i}", "output": o},
                                                            ensure_ascii=False) + "\n" for i, o in enumerate(good_b)),
                                         encoding="utf-8")
    fair = compare_runs(a, b, str(tasks), config(fake), ["openai:pair-good"], tmp_path / "out", progress=False)
    assert fair["headline"]["win_rate"] == 0.9 and not fair["headline"]["length_control"]["winner_simply_longer"]


def test_panel_majority_and_agreement(tmp_path, fake):
    tasks, a, b = write_runs(tmp_path, ["答え", "長い長い長い答え GOOD", "答え"], ["GOOD 長い長い長い答え", "答え", "GOOD"])
    specs = ["openai:pair-good", "openai:pair-longer", "openai:pair-first"]
    result = compare_runs(a, b, str(tasks), config(fake), specs, tmp_path / "out", progress=False)
    assert [j["judge"] for j in result["judges"]] == specs
    panel = result["panel"]
    # good: B, A, B; longer: B, A, A(longer "答え" vs "GOOD": A is 2 chars, B 4 → B); first: tie, tie, tie
    assert [row["verdicts"]["openai:pair-good"]["winner"] for row in result["per_task"]] == ["B", "A", "B"]
    assert [row["verdicts"]["openai:pair-longer"]["winner"] for row in result["per_task"]] == ["B", "A", "B"]
    assert [row["winner"] for row in result["per_task"]] == ["B", "A", "B"]  # 2 of 3 judges agree on each
    assert (panel["wins"], panel["ties"], panel["losses"]) == (2, 0, 1)
    agreement = {tuple(p["judges"]): p["agreement"] for p in panel["agreement"]}
    assert agreement[("openai:pair-good", "openai:pair-longer")] == 1.0
    assert agreement[("openai:pair-good", "openai:pair-first")] == 0.0
    assert panel["mean_win_rate"] == pytest.approx(((2 / 3) + (2 / 3) + 0.5) / 3)


def test_strict_language_gate_decides_without_a_judge_call(tmp_path, fake):
    tasks, a, b = write_runs(tmp_path, ["This answer is in English only.", "答え"], ["日本語の答えです。", "GOOD とても良い答えです"])
    cfg = config(fake, language_gate=True, language_gate_strict=True)
    result = compare_runs(a, b, str(tasks), cfg, ["openai:pair-good"], tmp_path / "out", progress=False)
    assert result["per_task"][0]["winner"] == "B" and result["per_task"][0]["verdicts"]["openai:pair-good"]["gated"]
    assert fake.total() == 2  # only task 1 went to the judge, in both orders
    assert result["language_flagged"] == {"a": [0], "b": []}
