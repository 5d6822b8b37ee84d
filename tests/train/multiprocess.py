"""What the multi-process tests share: a run config on the tiny model, and the comparisons of runs."""

import json

import torch
from safetensors.torch import load_file


def write_config(folder, model_dir, accum, method="lora", sharding="none"):
    """4 steps of 1-row micro-batches × accum on 8 rows, fp64, a checkpoint at step 2. Unsharded runs
    insist on answer-only logits: under DDP the decoder still runs inside DDP's forward (DecoderOrLM);
    FSDP refuses them, so sharded runs leave the setting to its default."""
    data = folder / "d.jsonl"
    rows = [{"instruction": f"質問{i}です", "input": "", "output": f"答え{i}です。"} for i in range(8)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    path = folder / f"c{accum}-{method}-{sharding}.yaml"
    path.write_text(f"""
model: {{name_or_path: "{model_dir}"}}
data: {{sources: [{{path: "{data}"}}], contamination_sets: []}}
train: {{method: {method}, max_steps: 4, save_steps: 2, save_total_limit: 3, logging_steps: 1, warmup_steps: 0,
        per_device_train_batch_size: 1, gradient_accumulation_steps: {accum}, learning_rate: 0.05,
        lora_dropout: 0.0, gradient_checkpointing: false, precision: fp64, sharding: {sharding},
        answer_only_logits: {"null" if sharding == "fsdp" else "true"}}}
""", encoding="utf-8")
    return path


def losses(root):
    return [json.loads(line)["loss"] for line in (root / "metrics.jsonl").read_text().splitlines()]


def grad_norms(root):
    """The logged norms of the whole gradient, before clipping (the runs clip at 1.0)."""
    return [json.loads(line)["grad_norm"] for line in (root / "metrics.jsonl").read_text().splitlines()]


def adapter(root):
    return load_file(str(root / "adapter" / "adapter_model.safetensors"))


def full_model(root):
    return load_file(str(root / "model" / "model.safetensors"))


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
