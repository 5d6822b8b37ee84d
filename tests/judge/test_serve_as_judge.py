"""`tunebench serve` as a judge backend: real HTTP, the official client, unscored replies recorded."""

import json
import threading

from tunebench.config import GenerateConfig, JudgeConfig
from tunebench.generate.engine import Generator
from tunebench.generate.serve import make_server
from tunebench.judge.score import judge_predictions
from tunebench.models.trained import load_for_inference


def test_judging_through_tunebench_serve(tmp_path, tiny_model_dir):
    loaded = load_for_inference(str(tiny_model_dir))
    generator = Generator(loaded.model, loaded.tokenizer, "course",
                          GenerateConfig(max_new_tokens=8, batch_size=1, repetition_penalty=1.0, no_repeat_ngram_size=1))
    server = make_server(generator, "tiny", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        preds = tmp_path / "predictions.jsonl"
        preds.write_text(json.dumps({"task_id": 0, "input": "日本の首都は？", "output": "東京です。"}, ensure_ascii=False)
                         + "\n", encoding="utf-8")
        tasks = tmp_path / "tasks.jsonl"
        tasks.write_text(json.dumps({"task_id": 0, "input": "日本の首都は？"}, ensure_ascii=False) + "\n", encoding="utf-8")
        config = JudgeConfig(judge="openai:tiny", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                             max_retries=1, backoff_s=0.01)
        report = judge_predictions(preds, str(tasks), config, progress=False).data
    finally:
        server.shutdown()
        server.server_close()
    record = json.loads((tmp_path / "judgments.jsonl").read_text().splitlines()[0])
    assert record["raw"]  # the random model answered over HTTP...
    assert report["per_task"][0]["score"] == record["score"]  # ...and its reply was parsed, not defaulted
    if record["score"] is None:
        assert report["unscored"] == 1 and report["mean"] is None
