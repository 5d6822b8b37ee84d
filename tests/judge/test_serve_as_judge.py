"""`tunebench serve` as a judge backend: real HTTP, the official client, unscored replies recorded."""

import json

from tunebench.config import JudgeConfig
from tunebench.judge.score import judge_predictions


def test_judging_through_tunebench_serve(tmp_path, tiny_judge_url):
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(json.dumps({"task_id": 0, "input": "日本の首都は？", "output": "東京です。"}, ensure_ascii=False)
                     + "\n", encoding="utf-8")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"task_id": 0, "input": "日本の首都は？"}, ensure_ascii=False) + "\n", encoding="utf-8")
    config = JudgeConfig(judge="openai:tiny", base_url=tiny_judge_url, max_retries=1, backoff_s=0.01)
    report = judge_predictions(preds, str(tasks), config, progress=False).data
    record = json.loads((tmp_path / "judgments.jsonl").read_text().splitlines()[0])
    assert record["raw"]  # the random model answered over HTTP...
    assert report["per_task"][0]["score"] == record["score"]  # ...and its reply was parsed, not defaulted
    if record["score"] is None:
        assert report["unscored"] == 1 and report["mean"] is None
