import json

import pytest

from tunebench.judge.parse import parse_score, reason_of


def test_nss_command_r_plus_replies_parse_to_their_published_scores(shared_data):
    """The NSS rows carry Command R+'s reasons and grades; its replies were JSON {reason, grade}."""
    path = shared_data / "judge-calibration" / "nss_gpt4-autoeval_command-r-plus.jsonl"
    checked = 0
    for line in path.open(encoding="utf-8"):
        row = json.loads(line)
        for take, score in row["scores"].items():
            reply = "```json\n" + json.dumps({"reason": row["reasons"][take], "grade": score}, ensure_ascii=False) + "\n```"
            assert parse_score(reply) == score, reply
            checked += 1
    assert checked == 900


@pytest.mark.parametrize("reply, score", [
    ("回答は正確です。ただし5つより少ないので1点減点。\n評価: 3", 3),
    ("理由: 2点減点の対象はない。\n評価：５", 5),  # full-width colon and digit
    ("Score: 4/5", 4),
    ("The answer is fine. Rating: [[2]]", 2),
    ("説明。\n[[4]]", 4),
    ("説明。\n4", 4),
    ('{"score": 1, "reason": "誤り"}', 1),
    ("評価: 4\n再考した結果、評価: 2", 2),  # the final verdict wins
])
def test_score_formats(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply", ["", "   ", None, "1点減点、2点減点。", "評価: 7", "評価: 0", "評価: 3.5",
                                   "よくできています。"])
def test_no_score_is_none_never_zero(reply):
    assert parse_score(reply) is None


def test_reason_drops_the_score_line():
    assert reason_of("指示に従っている。\n評価: 4") == "指示に従っている。"
