"""Preference pair readers, validation (file:line:field) and encoding with the SFT template."""

import json

import pytest

from tunebench.config import load_config
from tunebench.data.pairs import encode_pair, row_to_pair
from tunebench.data.prepare import collect_pairs, prepare_pairs
from tunebench.data.readers import read_raw_rows
from tunebench.data.tokens import IGNORE, encode_prompt, special_prefix
from tunebench.errors import DataError
from tunebench.runs import RunDir


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def pairs_and_problems(path):
    rows, problems = read_raw_rows(str(path))
    pairs = [p for p in (row_to_pair(row, problems) for row in rows) if p is not None]
    return pairs, [str(p) for p in problems]


def test_the_three_pair_shapes_read_to_the_same_pair(tmp_path):
    hh = "\n\nHuman: 猫の鳴き声は？\n\nAssistant: "
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "猫の鳴き声は？", "chosen": "にゃあ。", "rejected": "わん。"},
        {"chosen": hh + "にゃあ。", "rejected": hh + "わん。"},
        {"prompt": [{"role": "user", "content": "猫の鳴き声は？"}],
         "chosen": [{"role": "assistant", "content": "にゃあ。"}], "rejected": [{"role": "assistant", "content": "わん。"}]},
        {"chosen": [{"role": "user", "content": "猫の鳴き声は？"}, {"role": "assistant", "content": "にゃあ。"}],
         "rejected": [{"role": "user", "content": "猫の鳴き声は？"}, {"role": "assistant", "content": "わん。"}]},
    ])
    pairs, problems = pairs_and_problems(path)
    assert problems == []
    assert {(json.dumps(p.prompt, ensure_ascii=False), p.chosen, p.rejected) for p in pairs} == {
        (json.dumps([{"role": "user", "content": "猫の鳴き声は？"}], ensure_ascii=False), "にゃあ。", "わん。")}


def test_hh_rlhf_multi_turn_keeps_earlier_turns_in_the_prompt(tmp_path):
    shared = "\n\nHuman: こんにちは\n\nAssistant: こんにちは！\n\nHuman: 1+1は？\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": shared + " 2です。", "rejected": shared + " 3です。"}])
    (pair,), problems = pairs_and_problems(path)
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == ("2です。", "3です。")


def test_broken_pairs_are_named_by_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "q", "chosen": "a"},                                  # 1: rejected missing
        {"prompt": "q", "chosen": "  ", "rejected": "b"},                # 2: chosen empty
        {"prompt": "q", "chosen": 3, "rejected": "b"},                   # 3: chosen not a string
        {"prompt": "q", "chosen": "same", "rejected": "same"},           # 4: chosen == rejected
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},  # 5: prompt mismatch
        "{not json",                                                     # 6
        {"prompt": "q", "chosen": "a", "rejected": "b"},                 # 7: fine
    ])
    pairs, problems = pairs_and_problems(path)
    assert len(pairs) == 1
    where = [p.split(": ")[0] + ": " + p.split(": ")[1] for p in problems]
    assert f"{path}:1: field 'rejected'" in where
    assert f"{path}:2: field 'chosen'" in where and any("empty" in p for p in problems)
    assert f"{path}:3: field 'chosen'" in where and any("must be a string, got int" in p for p in problems)
    assert any(p.startswith(f"{path}:4: field 'rejected'") and "equals chosen" in p for p in problems)
    assert any(p.startswith(f"{path}:5: field 'rejected'") and "prompt mismatch" in p for p in problems)
    assert any(p.startswith(f"{path}:6") and "not valid JSON" in p for p in problems)


def test_pair_encoding_masks_the_prompt_by_its_own_length_with_one_eos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "猫の鳴き声は？", "chosen": "にゃあ。", "rejected": "わんわん。"}])
    (pair,), _ = pairs_and_problems(path)
    row = encode_pair(pair, "course", tokenizer, special_prefix(tokenizer), 512, "truncate")
    prompt_ids = encode_prompt(pair.prompt, "course", tokenizer)
    for key, answer in (("chosen", "にゃあ。"), ("rejected", "わんわん。")):
        ids, labels = row[key]["input_ids"], row[key]["labels"]
        assert ids[: len(prompt_ids)] == prompt_ids
        assert labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert labels[len(prompt_ids):] == answer_ids
        assert labels.count(tokenizer.eos_token_id) == 1


def test_contamination_guard_covers_pair_prompts(tmp_path):
    from tunebench.tasksets import load_tasks

    task = load_tasks("builtin:elyza-tasks-100")[0]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": task.input, "chosen": "a", "rejected": "b"}])
    config = load_config(None, [f"data.sources=[{{path: '{path}'}}]", "data.contamination_sets=[builtin:elyza-tasks-100]"])
    with pytest.raises(DataError, match="overlap evaluation data"):
        collect_pairs(config.data, allow_contamination=False)


def test_prepare_pairs_writes_encoded_pairs_and_counts_drops(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q1", "chosen": "a", "rejected": "b"},
                                             {"prompt": "q2", "chosen": "x", "rejected": "x"}])
    config = load_config(None, [f"data.sources=[{{path: '{path}'}}]", "data.contamination_sets=[]"])
    run = RunDir(tmp_path / "run")
    summary = prepare_pairs(config, run, tokenizer, "gemma")
    assert (summary.read, summary.kept, summary.dropped) == (2, 1, {"duplicate": 1})
    (row,) = [json.loads(line) for line in (run.data_dir / "train.jsonl").read_text().splitlines()]
    assert set(row) == {"chosen", "rejected"}


def test_data_inspect_understands_pairs(tmp_path, capsys):
    from tunebench.cli import main

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "猫の鳴き声は？", "chosen": "にゃあ。", "rejected": "わん。"},
                                             {"prompt": "q", "chosen": "same", "rejected": "same"}])
    assert main(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format: pairs" in out and "records: 2 read, 1 valid, 1 with problems" in out
    assert f"{path}:2: field 'rejected': equals chosen" in out
    assert "[chosen] ⟦### 指示\n猫の鳴き声は？\n### 回答\n⟧にゃあ。<EOS>" in out and "[rejected] ⟦" in out


def test_pairs_read_from_parquet_and_json_arrays(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "q1", "chosen": "a", "rejected": "b"}, {"prompt": "q2", "chosen": "c", "rejected": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.json").write_text(json.dumps(rows), encoding="utf-8")
    for name, where in (("p.parquet", "[record 1]"), ("p.json", "[record 1]")):
        pairs, problems = pairs_and_problems(tmp_path / name)
        assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b")]
        assert problems == [f"{tmp_path / name}{where}: field 'rejected': is empty or only whitespace"]
