"""Torn tails: what a kill during an append leaves at the end of tunebench's own JSONL files is
tolerated by every reader and cut away before the next append (issue 12: metrics.jsonl made the
rerun fail with a JSONDecodeError traceback)."""

import json

import pytest

from tunebench.errors import DataError
from tunebench.runs import RunDir, append_jsonl, read_jsonl


def torn(path, records, tail_record):
    """`records` as complete lines, then `tail_record` cut off inside its last multi-byte character."""
    whole = json.dumps(tail_record, ensure_ascii=False).encode()
    cut = whole[: whole.rindex("答".encode()) + 1]  # mid-character: not even valid UTF-8
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records) + cut)
    return path


def test_read_jsonl_skips_a_torn_tail_and_names_any_other_broken_line(tmp_path):
    path = torn(tmp_path / "a.jsonl", [{"n": 1}, {"n": 2}], {"n": 3, "text": "答え"})
    assert read_jsonl(path) == [{"n": 1}, {"n": 2}]
    with pytest.raises(DataError, match=r"a\.jsonl:3: not UTF-8"):
        read_jsonl(path, tolerate_torn_tail=False)
    path.write_text('{"n": 1}\n{"n": 2\n{"n": 3}', encoding="utf-8")  # a complete last line lacking "\n" counts
    with pytest.raises(DataError, match=r"a\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"n": 1}\n\n{"n": 3}', encoding="utf-8")
    assert read_jsonl(path) == [{"n": 1}, {"n": 3}] and read_jsonl(tmp_path / "none.jsonl") == []


def test_append_after_a_torn_tail_starts_on_a_fresh_line(tmp_path):
    path = torn(tmp_path / "a.jsonl", [{"n": 1}], {"n": 2, "text": "答え"})
    append_jsonl(path, {"n": 3})
    assert read_jsonl(path, tolerate_torn_tail=False) == [{"n": 1}, {"n": 3}]
    path.write_text('{"n": 1}', encoding="utf-8")  # complete, only its newline missing: kept
    append_jsonl(path, {"n": 2})
    assert path.read_text(encoding="utf-8") == '{"n": 1}\n{"n": 2}\n'


def test_train_resumes_over_a_torn_metrics_tail(tmp_path, tiny_model_dir):
    from tunebench.config import load_config
    from tunebench.train.sft import train

    data = tmp_path / "memo.jsonl"
    data.write_text(json.dumps({"instruction": "日本の首都は？", "input": "", "output": "東京です。"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.sources=[{{path: '{data}'}}]",
                                "data.contamination_sets=[]", "train.method=lora", "train.max_steps=4",
                                "train.save_steps=2", "train.logging_steps=1", "train.per_device_train_batch_size=1",
                                "train.gradient_accumulation_steps=1"])
    run = RunDir(tmp_path / "run")
    train(config, run)
    records = read_jsonl(run.metrics)
    # killed while appending step 3's line, after checkpoint-2
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in records[:2]) + json.dumps(records[2])[:17],
                           encoding="utf-8")
    train(config, run, resume=True)
    assert [r["step"] for r in read_jsonl(run.metrics, tolerate_torn_tail=False)] == [1, 2, 3, 4]


def test_generate_resumes_over_a_torn_partial_tail(tmp_path, tiny_model_dir):
    from tunebench.config import GenerateConfig
    from tunebench.generate.answers import generate_answers

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"task_id": i, "input": f"質問{i}"}, ensure_ascii=False) + "\n"
                             for i in range(3)), encoding="utf-8")
    out = tmp_path / "predictions.jsonl"
    first = {"task_id": 0, "input": "質問0", "output": "前の答え"}
    torn(out.with_name("predictions.jsonl.partial"), [first], {"task_id": 1, "input": "質問1", "output": "答え"})
    config = GenerateConfig(max_new_tokens=4, batch_size=2, repetition_penalty=1.0, no_repeat_ngram_size=1)
    result = generate_answers(str(tiny_model_dir), str(tasks), out, config, template="course")
    assert (result.answered, result.reused) == (2, 1)
    rows = read_jsonl(out, tolerate_torn_tail=False)
    assert [r["task_id"] for r in rows] == [0, 1, 2] and rows[0] == first


def test_judge_resumes_over_a_torn_cache_tail(tmp_path):
    from tunebench.config import JudgeConfig
    from tunebench.judge.score import judge_predictions

    from .judge.fake_openai import FakeJudge

    fake = FakeJudge()
    try:
        tasks = tmp_path / "tasks.jsonl"
        tasks.write_text("".join(json.dumps({"task_id": i, "input": f"質問{i}"}, ensure_ascii=False) + "\n"
                                 for i in range(3)), encoding="utf-8")
        preds = tmp_path / "predictions.jsonl"
        preds.write_text("".join(json.dumps({"task_id": i, "input": f"質問{i}", "output": f"WANT:{i + 3} 答え"},
                                            ensure_ascii=False) + "\n" for i in range(3)), encoding="utf-8")
        config = JudgeConfig(judge="openai:fake-judge", base_url=fake.url, backoff_s=0.01, timeout_s=1.0)
        judge_predictions(preds, str(tasks), config, progress=False)
        cache = tmp_path / "judgments.jsonl"
        records = read_jsonl(cache)
        whole = json.dumps(records[2], ensure_ascii=False).encode()
        cache.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records[:2])
                          + whole[: len(whole) // 2])  # killed while appending the third judgment
        paid = fake.total()
        report = judge_predictions(preds, str(tasks), config, progress=False).data
        assert fake.total() == paid + 1 and [t["score"] for t in report["per_task"]] == [3, 4, 5]
        assert len(read_jsonl(cache, tolerate_torn_tail=False)) == 3
    finally:
        fake.stop()


def test_report_lists_a_non_string_output_and_writes_the_rest(tmp_path, capsys):
    from html import escape

    from tunebench.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n", encoding="utf-8")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo', encoding="utf-8")
    rows = [{"task_id": 0, "input": "質問0", "output": "答え"}, {"task_id": 1, "input": "質問1", "output": 5},
            {"task_id": 2, "input": "質問2", "output": None}]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text(encoding="utf-8")
    md = (run / "report.md").read_text(encoding="utf-8")
    for defect in ("predictions.jsonl:2: task_id 1: field 'output' must be a string, got int",
                   "predictions.jsonl:3: task_id 2: field 'output' must be a string, got NoneType"):
        assert escape(defect) in html and defect in md
    assert "答え" in html and "<em>not a string: 5</em>" in html
    assert "<td>r</td><td>1</td><td>2.0</td>" in html.split('id="length-table"')[1]  # one answer counted
