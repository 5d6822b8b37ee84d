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


class ConstantJudge:
    name = "test:constant"

    def complete(self, prompt, temperature):
        return "理由。\n評価: 3"


def test_calibrate_uses_the_shipped_data_from_any_folder(tmp_path, monkeypatch):
    """No --data and no course folder anywhere above the working directory: the shipped scores serve."""
    monkeypatch.chdir(tmp_path)
    result = calibrate(JudgeConfig(judge="openai:x"), n=6, out_dir=tmp_path / "out", reference_judge="gpt-4o-mini",
                       backend=ConstantJudge(), progress=False)
    assert result["sampled"] == 6 and result["n"] == 6 and result["unscored"] == 0
    assert json.loads((tmp_path / "out" / "calibration.json").read_text())["reference_judge"] == "gpt-4o-mini"


def test_shipped_calibration_data_is_the_documented_files_and_is_packaged():
    """Each shipped .jsonl.gz decompresses to the file whose sha256 PROVENANCE.md records, and
    pyproject's package-data ships every file of builtin/ (so it is there after `pip install`)."""
    import fnmatch
    import gzip
    import hashlib
    import re
    import tomllib
    from pathlib import Path

    from tunebench.judge.calibrate import DEFAULT_FILES, SHIPPED_DIR

    provenance = (SHIPPED_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
    for name in DEFAULT_FILES:
        digest = hashlib.sha256(gzip.decompress((SHIPPED_DIR / f"{name}.gz").read_bytes())).hexdigest()
        assert re.search(rf"`{re.escape(name)}` {digest}", provenance), name
    assert sum(p.stat().st_size for p in SHIPPED_DIR.iterdir()) < 2_000_000
    patterns = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tunebench"]
    package = SHIPPED_DIR.parents[1]
    for path in (package / "builtin").rglob("*"):
        if path.is_file():
            relative = path.relative_to(package).as_posix()
            assert any(fnmatch.fnmatch(relative, p) and relative.count("/") == p.count("/") for p in patterns), relative


def test_judge_calibrate_command_works_from_an_empty_folder(tmp_path, monkeypatch, capsys):
    from tunebench.cli import main

    from .fake_openai import FakeJudge

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    fake = FakeJudge()
    try:
        code = main(["judge", "calibrate", "--judge", "openai:fake-judge", "--base-url", fake.url, "--n", "4",
                     "--reference-judge", "gpt-4o-mini"])
    finally:
        fake.stop()
    out = capsys.readouterr().out
    assert code == 0 and fake.total() == 4 and "vs gpt-4o-mini on 4 answers" in out
    assert (tmp_path / "runs" / "calibration" / "openai_fake-judge" / "calibration.json").exists()
