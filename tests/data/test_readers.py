import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunebench.data.readers import read_source
from tunebench.errors import DataError


def test_megagon_builtin_and_shared_copy_read_as_alpaca(shared_data):
    builtin = read_source("builtin:ja-instruct-megagon")
    shared = read_source(str(shared_data / "ja-instruct-megagon" / "train.jsonl"))
    assert builtin.format == shared.format == "alpaca"
    assert len(builtin.examples) == len(shared.examples) == 669 and not builtin.problems
    first = builtin.examples[0].messages
    assert first[0] == {"role": "user", "content": "タバコを吸うのは悪いことですか？"}
    assert first[1]["role"] == "assistant" and first[1]["content"].startswith("喫煙のリスク")


def test_ichikara_json_array_with_bom_and_crlf(tmp_path):
    records = [{"ID": "a-1", "text": "日本の首都は？", "output": "東京です。\n以上。"},
               {"ID": "a-2", "text": "1+1は？", "output": "2です。"}]
    body = json.dumps(records, ensure_ascii=False, indent=1).replace("\n", "\r\n")
    path = tmp_path / "ichikara.json"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    result = read_source(str(path))
    assert result.format == "ichikara"
    assert [e.messages[0]["content"] for e in result.examples] == ["日本の首都は？", "1+1は？"]
    assert result.examples[0].messages[1]["content"] == "東京です。\n以上。"
    assert str(result.examples[1].origin) == f"{path}[record 1]"


def test_alpaca_input_is_appended_to_instruction(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "要約して", "input": "長い文章", "output": "短い"}, ensure_ascii=False)
                    + "\n" + json.dumps({"instruction": "挨拶して", "input": "  ", "output": "こんにちは"},
                                        ensure_ascii=False) + "\n", encoding="utf-8")
    examples = read_source(str(path)).examples
    assert examples[0].messages[0]["content"] == "要約して\n長い文章"
    assert examples[1].messages[0]["content"] == "挨拶して"


def test_csv_and_parquet(tmp_path):
    csv_path = tmp_path / "d.csv"
    with csv_path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerow({"instruction": "質問1", "input": "", "output": "答え\n二行目"})
        writer.writerow({"instruction": "質問2", "input": "", "output": ""})
    result = read_source(str(csv_path))
    assert [e.messages[1]["content"] for e in result.examples] == ["答え\n二行目"]
    (problem,) = result.problems
    assert problem.field == "output" and problem.origin.line == 4  # header, 2-line record, then this one
    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "質問", "input": "", "output": "答え"}]), pq_path)
    assert read_source(str(pq_path)).examples[0].messages[1]["content"] == "答え"


def test_messages_multi_turn(tmp_path):
    path = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "system", "content": "丁寧に"}, {"role": "user", "content": "やあ"},
                        {"role": "assistant", "content": "こんにちは"}, {"role": "user", "content": "元気？"},
                        {"role": "assistant", "content": "元気です"}]}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    result = read_source(str(path))
    assert result.format == "messages" and result.examples[0].messages == row["messages"]


def test_local_dataset_folder(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"instruction": "質問", "input": "", "output": "答え"}]).save_to_disk(tmp_path / "ds")
    result = read_source(str(tmp_path / "ds"))
    assert result.format == "alpaca" and result.examples[0].messages[1]["content"] == "答え"


def test_hub_id_goes_through_load_dataset_and_reports_failure(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match="user/ichikara: could not load hub dataset"):
        read_source("user/ichikara")
    assert calls == [("user/ichikara", "train")]


@pytest.mark.parametrize("line, field, message", [
    ('{"instruction": "q", "input": "", "output": ', None, "not valid JSON"),
    ('{"instruction": "q", "input": ""}', "output", "is missing"),
    ('{"instruction": "   ", "input": "", "output": "a"}', "instruction", "empty or only whitespace"),
    ('{"instruction": "q", "input": "", "output": 3}', "output", "must be a string"),
])
def test_bad_jsonl_line_names_file_line_and_field(tmp_path, line, field, message):
    path = tmp_path / "bad.jsonl"
    good = '{"instruction": "ok", "input": "", "output": "fine"}'
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    result = read_source(str(path), fmt="alpaca")
    assert len(result.examples) == 1
    (problem,) = result.problems
    assert problem.origin.file == str(path) and problem.origin.line == 2 and problem.field == field
    assert message in str(problem) and str(problem).startswith(f"{path}:2")


def test_non_utf8_line_is_reported_not_fatal(tmp_path):
    path = tmp_path / "sjis.jsonl"
    path.write_bytes(b'{"instruction": "ok", "input": "", "output": "fine"}\n'
                     + '{"instruction": "日本", "input": "", "output": "x"}\n'.encode("shift_jis"))
    result = read_source(str(path))
    (problem,) = result.problems
    assert problem.kind == "encoding" and problem.origin.line == 2 and "not UTF-8" in str(problem)


def test_undetectable_format_and_missing_file(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="cannot detect the format"):
        read_source(str(path))
    with pytest.raises(DataError, match="no such file"):
        read_source(str(tmp_path / "nope.jsonl"))
