import json
import math

import pytest

from tunebench.config import JudgeConfig
from tunebench.judge.calibrate import calibrate
from tunebench.judge.stats import agreement, bootstrap_ci, ranks, spearman


def test_agreement_on_a_constructed_case():
    ours = [1, 2, 3, 4, 5, 5]
    ref = [1, 2, 4, 4, 5, 3]
    result = agreement(ours, ref)
    assert result["exact"] == pytest.approx(4 / 6) and result["within_1"] == pytest.approx(5 / 6)
    assert result["mean_bias"] == pytest.approx((0 + 0 - 1 + 0 + 0 + 2) / 6)
    assert agreement([1, 2, 3], [2, 4, 6])["pearson"] == pytest.approx(1.0)
    assert agreement([1, 2, 3], [3, 2, 1])["spearman"] == pytest.approx(-1.0)
    assert ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    assert spearman([1, 2, 3, 4], [1, 3, 3, 9]) == pytest.approx(0.9486832980505138)
    assert math.isnan(agreement([3, 3], [1, 2])["pearson"])


def test_bootstrap_ci_contains_mean_and_is_reproducible():
    values = [1, 2, 3, 4, 5] * 4
    low, high = bootstrap_ci(values)
    assert low < 3 < high and (low, high) == bootstrap_ci(values)
    assert bootstrap_ci([4.0]) == (4.0, 4.0)


class EchoJudge:
    """Answers with the score written into the answer text: a judge with known behaviour."""

    name = "test:echo"

    def complete(self, prompt, temperature):
        answer = prompt.split("# 採点対象の回答\n", 1)[1]
        return f"理由。\n評価: {answer.strip()[0]}"


def test_calibrate_reports_agreement_with_reference_judge(tmp_path):
    folder = tmp_path / "cal"
    folder.mkdir()
    rows = [{"source": "t", "model": "m", "task_id": i, "output": f"{ours} 答え", "scores": {"ref": ref}}
            for i, (ours, ref) in enumerate([(5, 5), (4, 3), (2, 2), (1, 3), (3, None)])]
    (folder / "shaberi_elyza100.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = calibrate(JudgeConfig(judge="openai:x"), n=10, out_dir=tmp_path / "out", data_dir=str(folder),
                       reference_judge="ref", backend=EchoJudge(), progress=False)
    assert result["n"] == 4 and result["sampled"] == 4  # the row without a reference score is not sampled
    assert result["exact"] == 0.5 and result["within_1"] == 0.75 and result["mean_bias"] == pytest.approx(-0.25)
    assert json.loads((tmp_path / "out" / "calibration.json").read_text())["n"] == 4
