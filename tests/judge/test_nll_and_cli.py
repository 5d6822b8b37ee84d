import json

import pytest
import torch

from tunebench.cli import main
from tunebench.models.trained import load_for_inference
from tunebench.train.nll import reference_nll


def test_reference_nll_equals_cross_entropy_of_answer_tokens(tmp_path, tiny_model_dir):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"task_id": 0, "input": "日本の首都は？", "output": "東京です。"}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    loaded = load_for_inference(str(tiny_model_dir))
    result = reference_nll(loaded.model, loaded.tokenizer, "course", str(tasks))
    tok = loaded.tokenizer
    prompt = tok("### 指示\n日本の首都は？\n### 回答\n")["input_ids"]
    answer = tok("東京です。", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logp = loaded.model(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
    expected = -sum(logp[len(prompt) + i - 1, t].item() for i, t in enumerate(answer)) / len(answer)
    assert result["tokens"] == len(answer) and result["nll"] == pytest.approx(expected, rel=1e-4)


def test_reference_nll_needs_references(tmp_path, tiny_model_dir):
    from tunebench.errors import DataError

    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"task_id": 0, "input": "q"}\n', encoding="utf-8")
    loaded = load_for_inference(str(tiny_model_dir))
    with pytest.raises(DataError, match="no reference answers"):
        reference_nll(loaded.model, loaded.tokenizer, "course", str(tasks))


def test_judge_cli_without_a_judge_says_how_to_add_one(tmp_path, capsys):
    preds = tmp_path / "predictions.jsonl"
    preds.write_text('{"task_id": 0, "input": "q", "output": "a"}\n', encoding="utf-8")
    assert main(["judge", str(preds)]) == 2
    assert "no judge configured: pass --judge BACKEND:MODEL" in capsys.readouterr().err
    assert main(["judge", str(preds), "--judge", "gpt4"]) == 2
    assert "expected BACKEND:MODEL" in capsys.readouterr().err


def test_reference_nll_follows_a_limit(tmp_path, tiny_model_dir, capsys):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"task_id": i, "input": f"質問{i}", "output": f"答え{i}です。"}, ensure_ascii=False)
                             + "\n" for i in range(3)), encoding="utf-8")
    loaded = load_for_inference(str(tiny_model_dir))
    assert reference_nll(loaded.model, loaded.tokenizer, "course", str(tasks), limit=2)["n_tasks"] == 2
    assert main(["eval", "nll", str(tiny_model_dir), "--tasks", str(tasks), "--template", "course", "--limit", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_tasks"] == 1

