import json

import pytest

from tunebench.config import load_config
from tunebench.data.contamination import build_eval_index, find_contamination
from tunebench.data.prepare import prepare, read_token_rows
from tunebench.data.readers import read_source
from tunebench.errors import DataError
from tunebench.runs import RunDir


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_contamination_guard_catches_pasted_tv_task(tmp_path, shared_data):
    tv = [json.loads(line) for line in (shared_data / "elyza-tasks-100-tv" / "tasks.jsonl").open(encoding="utf-8")]
    pasted = tv[7]["input"]
    path = jsonl(tmp_path / "t.jsonl", [
        {"instruction": "健康的な朝食を教えて", "input": "", "output": "納豆ご飯です。"},
        {"instruction": pasted, "input": "", "output": "答え"},  # whole TV input
        {"instruction": "前置き：" + pasted[5:40] + "。", "input": "", "output": "答え"},  # a 35-char slice
    ])
    examples = read_source(str(path)).examples
    index = build_eval_index([str(shared_data / "elyza-tasks-100-tv" / "tasks.jsonl"), "elyza-tasks-100"])
    problems = find_contamination(examples, index)
    assert [p.origin.line for p in problems] == [2, 3]
    assert "is identical to" in problems[0].message and "task 7" in problems[0].message
    assert "20-character passage" in problems[1].message


def test_megagon_is_clean_against_both_elyza_sets(shared_data):
    index = build_eval_index([str(shared_data / "elyza-tasks-100-tv" / "tasks.jsonl"), "elyza-tasks-100"])
    assert len(index.exact) == 200
    assert find_contamination(read_source("builtin:ja-instruct-megagon").examples, index) == []


def config_for(tmp_path, source, *extra):
    return load_config(None, [f"data.sources=[{{path: '{source}'}}]", "data.max_seq_length=64",
                              "data.contamination_sets=[elyza-tasks-100]", *extra])


def test_prepare_refuses_contaminated_data_unless_allowed(tmp_path, tokenizer):
    elyza = json.loads(open("src/tunebench/builtin/elyza-tasks-100.jsonl", encoding="utf-8").readline())
    src = jsonl(tmp_path / "t.jsonl", [{"instruction": "普通の質問", "input": "", "output": "普通の答え"},
                                       {"instruction": elyza["input"], "input": "", "output": elyza["output"]}])
    config = config_for(tmp_path, src)
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'instruction': is identical to elyza-tasks-100 task 0"):
        prepare(config, RunDir(tmp_path / "run"), tokenizer, "gemma")
    summary = prepare(config, RunDir(tmp_path / "run2"), tokenizer, "gemma", allow_contamination=True)
    assert summary.kept == 2


def test_prepare_summary_counts_everything_and_strict_fails(tmp_path, tokenizer):
    long_answer = "とても長い答えです。" * 40
    src = jsonl(tmp_path / "t.jsonl", [
        {"instruction": "質問A", "input": "", "output": "答えA"},
        {"instruction": "質問A", "input": "", "output": "答えA"},  # exact duplicate
        {"instruction": "質問Ａ ", "input": "", "output": "答えＡ"},  # width/space variant
        {"instruction": "質問B", "input": "", "output": ""},  # empty output
        {"instruction": "質問C", "input": "", "output": long_answer},  # > 64 tokens: truncated
    ])
    run = RunDir(tmp_path / "run")
    summary = prepare(config_for(tmp_path, src), run, tokenizer, "gemma")
    assert (summary.read, summary.kept, summary.truncated) == (5, 2, 1)
    assert summary.dropped == {"duplicate": 2, "empty": 1}
    rows = read_token_rows(run.data_dir / "train.jsonl")
    assert len(rows) == 2 and max(len(r["input_ids"]) for r in rows) == 64
    with pytest.raises(DataError, match=r"(?s)3 bad record\(s\) \(--strict\).*t\.jsonl:2: exact duplicate of .*t\.jsonl:1"):
        prepare(config_for(tmp_path, src), RunDir(tmp_path / "strict"), tokenizer, "gemma", strict=True)
    dropped = prepare(config_for(tmp_path, src, "data.overlength=drop"), RunDir(tmp_path / "drop"), tokenizer, "g")
    assert dropped.kept == 1 and dropped.dropped["length"] == 1


def test_prepare_packs_mixes_weights_and_splits_eval(tmp_path, tokenizer):
    rows = [{"instruction": f"質問{i}", "input": "", "output": f"答え{i}"} for i in range(10)]
    a = jsonl(tmp_path / "a.jsonl", rows)
    b = jsonl(tmp_path / "b.jsonl", [{"instruction": f"別の質問{i}", "input": "", "output": "はい"} for i in range(10)])
    config = load_config(None, [f"data.sources=[{{path: '{a}', weight: 2}}, {{path: '{b}', weight: 0.5}}]",
                                "data.contamination_sets=[]", "data.packing=true", "data.max_seq_length=128",
                                "data.eval_fraction=0.2"])
    run = RunDir(tmp_path / "run")
    summary = prepare(config, run, tokenizer, "gemma")
    assert summary.kept == 25 and summary.eval_rows == 5  # 10×2 + 10×0.5
    train = read_token_rows(run.data_dir / "train.jsonl")
    assert summary.train_rows == len(train) < 20 and all("position_ids" in r for r in train)
    assert all(len(r["input_ids"]) <= 128 for r in train)
    assert sum(r["position_ids"].count(0) for r in train) == 20
    again = prepare(config, run, tokenizer, "gemma")  # same inputs: reused, not redone
    assert again.fingerprint == summary.fingerprint


def test_empty_sources_error(tmp_path):
    with pytest.raises(DataError, match="data.sources is empty"):
        prepare(load_config(None), RunDir(tmp_path), None, "x")


def test_summary_counts_add_up_and_length_drops_are_named(tmp_path, tokenizer, caplog):
    long_answer = "とても長い答えです。" * 40
    src = jsonl(tmp_path / "t.jsonl", [
        {"instruction": "質問A", "input": "", "output": "答えA"},
        {"instruction": "質問A", "input": "", "output": "答えA"},  # duplicate
        {"instruction": "質問C", "input": "", "output": long_answer},  # > 64 tokens: dropped
        {"instruction": "質問D", "input": "", "output": long_answer + "。"},  # > 64 tokens: dropped
    ])
    config = load_config(None, [f"data.sources=[{{path: '{src}', weight: 2}}]", "data.max_seq_length=64",
                                "data.contamination_sets=[]", "data.overlength=drop"])
    summary = prepare(config, RunDir(tmp_path / "run"), tokenizer, "gemma")
    assert summary.dropped == {"duplicate": 1, "length": 2}  # each record once, not once per weighted copy
    assert (summary.read, summary.records_kept, summary.kept) == (4, 1, 2)
    assert summary.lines()[0] == ("read 4 records; kept 1 (2 training examples after source weights); "
                                  "dropped 3 (1 duplicate, 2 length); truncated 0")
    warned = [r.getMessage() for r in caplog.records if "max_seq_length" in r.getMessage()]
    assert len(warned) == 2 and "t.jsonl:3" in warned[0] and "t.jsonl:4" in warned[1]


def test_nothing_left_says_why_and_names_the_dropped_records(tmp_path, tokenizer, caplog):
    src = jsonl(tmp_path / "t.jsonl", [{"instruction": "質問C", "input": "", "output": "長い答え。" * 60}])
    config = load_config(None, [f"data.sources=[{{path: '{src}'}}]", "data.max_seq_length=64",
                                "data.contamination_sets=[]", "data.overlength=drop"])
    with pytest.raises(DataError, match=r"no training examples left: read 1 record\(s\) from data.sources \(1 length\)"):
        prepare(config, RunDir(tmp_path / "run"), tokenizer, "gemma")
    # the error points at the warnings: there must be one, naming the record
    assert any("t.jsonl:1" in r.getMessage() and "max_seq_length 64" in r.getMessage() for r in caplog.records)
