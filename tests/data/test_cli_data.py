import json

from tunebench.cli import main


def test_help_for_every_command(capsys):
    for argv in (["--help"], ["data", "--help"], ["data", "inspect", "--help"], ["data", "prepare", "--help"]):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0
        out = capsys.readouterr().out
        assert "usage: tunebench" in out and ("example" in out or "ACTION" in out)


def test_inspect_reports_problems_and_strict_exit(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "質問", "input": "", "output": "答え"}\n{"instruction": "q"\n', encoding="utf-8")
    assert main(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format: alpaca" in out and "1 with problems" in out and f"{path}:2: not valid JSON" in out
    assert "⟦### 指示\n質問\n### 回答\n⟧答え<EOS>" in out
    assert main(["data", "inspect", str(path), "--strict"]) == 1


def test_inspect_with_tokenizer_marks_masked_tokens(tmp_path, capsys, gemma_dir):
    assert main(["data", "inspect", "builtin:ja-instruct-megagon", "--tokenizer", str(gemma_dir)]) == 0
    out = capsys.readouterr().out
    assert "length in tokens" in out and "⟦<bos>### 指示\nタバコを吸うのは悪いことですか？\n### 回答\n⟧喫煙" in out
    assert out.count("<eos>") >= 3


def test_prepare_cli_writes_run_dir_and_config(tmp_path, capsys, gemma_dir):
    run = tmp_path / "run"
    code = main(["data", "prepare", "configs/quickstart.yaml", "--run-dir", str(run),
                 "--set", f"model.name_or_path={gemma_dir}", "--set", "data.max_records=20"])
    assert code == 0
    assert "read 669 records; kept 20" in capsys.readouterr().out
    summary = json.loads((run / "data" / "summary.json").read_text())
    assert summary["kept"] == 20 and (run / "config.yaml").read_text().count("max_records: 20") == 1


def test_bad_config_prints_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  max_seq_lenght: 10\n", encoding="utf-8")
    assert main(["data", "prepare", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean 'data.max_seq_length'" in err and "Traceback" not in err


def test_inspect_p95_is_never_below_the_median(tmp_path, capsys):
    import re

    from tunebench.data.inspect import percentile

    assert [percentile([1, 100], 95), percentile([1, 2, 3], 95), percentile(list(range(1, 101)), 95)] == [100, 3, 95]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": "質", "input": "", "output": "答" * n}, ensure_ascii=False) + "\n"
                            for n in (1, 200)), encoding="utf-8")
    assert main(["data", "inspect", str(path)]) == 0
    median, p95 = map(float, re.search(r"median ([\d.]+), p95 (\d+)", capsys.readouterr().out).groups())
    assert p95 >= median and p95 > 100  # was: p95 = the shortest record's length


def test_ctrl_c_during_train_names_resume(tmp_path, capsys, monkeypatch):
    import tunebench.train.sft as sft

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "train", interrupted)
    assert main(["train", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "run")]) == 130
    assert "rerun the same command with --resume" in capsys.readouterr().err
    assert main(["train", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "run"), "--resume"]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err  # --resume given: the same command is right
