"""The language gate: Japanese share of mixed-language answers, and the ELYZA point it costs."""


import pytest

from tunebench.config import JudgeConfig
from tunebench.judge.language import fails_gate, gated_score, japanese_share
from tunebench.judge.score import judge_predictions

from .fake_openai import write_tasks_and_predictions


def test_japanese_share_on_mixed_strings():
    assert japanese_share("東京は日本の首都です。") == 1.0
    assert japanese_share("The capital is Tokyo.") == 0.0
    assert japanese_share("東京 is the capital") == pytest.approx(2 / 14)  # 2 kanji, 12 Latin letters
    assert japanese_share("答えはPythonです") == pytest.approx(5 / 11)  # code-switched mid-sentence
    assert japanese_share("カタカナとｶﾀｶﾅ、ひらがな、漢字々") == 1.0  # half-width kana and 々 count
    assert japanese_share("2024年 (123) !!") == 1.0  # digits, brackets and punctuation are not letters
    assert japanese_share("") == 0.0 and japanese_share("1234 ...") == 0.0  # nothing Japanese to read
    assert japanese_share("Привет мир 世界") == pytest.approx(2 / 11)
    assert fails_gate("答えはPythonです") and not fails_gate("答えはPythonです", threshold=0.4)
    assert not fails_gate("Pythonで書いたプログラムを説明します")


def test_gated_score_rule():
    assert gated_score(4, strict=False) == 3 and gated_score(1, strict=False) == 1
    assert gated_score(None, strict=False) is None and gated_score(5, strict=True) == 1


def test_judge_flags_and_gates_non_japanese_answers(tmp_path, fake):
    outputs = ["WANT:5 日本語のとても良い答えです", "WANT:5 This answer is English", "WANT:4 日本語の答えです"]
    tasks, preds = write_tasks_and_predictions(tmp_path, outputs)
    base = dict(judge="openai:fake-judge", base_url=fake.url, backoff_s=0.01, max_retries=1)
    plain = judge_predictions(preds, str(tasks), JudgeConfig(**base), progress=False).data
    assert [t["score"] for t in plain["per_task"]] == [5, 5, 4]  # flagged only, no gate
    assert plain["language"]["flagged"] == [1] and plain["lengths"]["n"] == 3
    gated = judge_predictions(preds, str(tasks), JudgeConfig(**base, language_gate=True), progress=False).data
    assert [t["score"] for t in gated["per_task"]] == [5, 4, 4]  # one point off the English answer
    assert gated["per_task"][1]["reason"].startswith("language gate:")
    calls = fake.total()
    strict = judge_predictions(preds, str(tasks), JudgeConfig(**base, language_gate=True, language_gate_strict=True),
                               out_dir=tmp_path / "strict", progress=False).data
    assert [t["score"] for t in strict["per_task"]] == [5, 1, 4]
    assert fake.total() - calls == 2  # the English answer never went to the judge
