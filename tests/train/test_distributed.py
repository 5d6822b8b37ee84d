"""Data parallelism through accelerate: 2 CPU processes (gloo) against one process, same global batch.

answer_only_logits is insisted on: under DDP the decoder still runs inside DDP's forward (DecoderOrLM)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tunebench.cli import main
from tunebench.runs import RunDir


def write_config(tmp_path, model_dir, accum):
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"質問{i}です", "input": "", "output": f"答え{i}です。"} for i in range(8)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    path = tmp_path / f"c{accum}.yaml"
    path.write_text(f"""
model: {{name_or_path: "{model_dir}"}}
data: {{sources: [{{path: "{data}"}}], contamination_sets: []}}
train: {{method: lora, max_steps: 4, save_steps: 2, save_total_limit: 3, logging_steps: 1, warmup_steps: 0,
        per_device_train_batch_size: 1, gradient_accumulation_steps: {accum}, learning_rate: 0.05,
        lora_dropout: 0.0, gradient_checkpointing: false, precision: fp64,
        answer_only_logits: true}}
""", encoding="utf-8")
    return path


def losses(root):
    return [json.loads(line)["loss"] for line in (root / "metrics.jsonl").read_text().splitlines()]


def adapter(root):
    return load_file(str(root / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a, b):
    """Relative norm of the difference, in float64. All-reduce and local sums add the same gradients in
    another order (≈1e-16 relative); Adam divides by sqrt(v) + 1e-8, which can magnify that noise for a
    near-zero gradient up to ~1e8 times, so four steps stay far below 1e-7 on any CPU. In float32 the same
    magnification gave 2.2e-4 on an AMD EPYC; a wrong data split or averaging moves it past 1e-3."""
    assert a.keys() == b.keys()
    assert all(t.dtype == torch.float64 for t in a.values())
    diff = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    norm = torch.sqrt(sum((a[k] ** 2).sum() for k in a))
    assert diff / norm < 1e-7, float(diff / norm)


def test_two_processes_match_one_and_resume_across_process_counts(tmp_path, tiny_model_dir):
    single, double = tmp_path / "single", tmp_path / "double"
    # one process × accum 2 and two processes × accum 1: the same global batch of 2 rows
    assert main(["train", str(write_config(tmp_path, tiny_model_dir, 2)), "--run-dir", str(single)]) == 0
    assert main(["train", str(write_config(tmp_path, tiny_model_dir, 1)), "--run-dir", str(double),
                 "--gpus", "2"]) == 0
    assert losses(double) == pytest.approx(losses(single), rel=1e-9)
    a = adapter(single)
    assert_same_adapter(a, adapter(double))

    # resume the single-process run's step-2 checkpoint with two processes: same final adapter
    resumed = tmp_path / "resumed"
    shutil.copytree(single, resumed)
    shutil.rmtree(resumed / "adapter")
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4", ignore_errors=True)
    assert [p.name for p in RunDir(resumed).checkpoints.iterdir()] == ["checkpoint-2"]
    assert main(["train", str(write_config(tmp_path, tiny_model_dir, 1)), "--run-dir", str(resumed),
                 "--gpus", "2", "--resume"]) == 0
    assert_same_adapter(a, adapter(resumed))
    assert losses(resumed) == pytest.approx(losses(single), rel=1e-9)
