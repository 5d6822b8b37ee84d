"""Kill a data-parallel run mid-training and resume it on another number of GPUs (issue 17).

Random-initialised Gemma 3 270M, LoRA, course settings (global batch 2 × 4 rows), 20 steps, a
checkpoint every 5 steps:

  uninterrupted  1 GPU, accum 4, 20 steps
  2→1            2 GPUs × accum 2, killed (SIGKILL to the whole process group) once checkpoint-10
                 exists, then `--resume` on 1 GPU × accum 4
  1→2            the reverse

Reported: the relative norm of each resumed adapter's difference from the uninterrupted one, and the
largest relative difference of the logged losses (bf16: the resumed runs add the same gradients in
another order after the switch).

    python bench/ddp_resume.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddp_scaling import NO_MULTICAST, SAME_EVERYWHERE  # noqa: E402
from train_gpu import case_config  # noqa: E402

from tunebench.config import dump_config  # noqa: E402


def command(out: Path, name: str, gpus: int, steps: int, run: Path, resume: bool = False) -> list[str]:
    accum = 4 // gpus
    config = case_config("gemmarandom-lora", steps, 512, [f"train.gradient_accumulation_steps={accum}",
                                                          "train.save_steps=5", "train.save_total_limit=10",
                                                          *SAME_EVERYWHERE])
    path = out / f"{name}-{gpus}gpu.yaml"
    dump_config(config, path)
    return [sys.executable, "-m", "tunebench.cli", "train", str(path), "--run-dir", str(run), "--gpus", str(gpus),
            *(["--resume"] if resume else [])]


def run(args: list[str]) -> None:
    done = subprocess.run(args, env={**os.environ, **NO_MULTICAST, "TQDM_DISABLE": "1"}, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-4000:])


def run_and_kill(args: list[str], checkpoint: Path) -> int:
    """Start a run, SIGKILL its process group once `checkpoint` exists; returns the step it had reached."""
    process = subprocess.Popen(args, env={**os.environ, **NO_MULTICAST, "TQDM_DISABLE": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while not checkpoint.exists():
        if process.poll() is not None:
            raise SystemExit(f"the run ended (exit {process.returncode}) before {checkpoint} appeared")
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    metrics = checkpoint.parents[1] / "metrics.jsonl"
    return max(json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip())


def compare(a: Path, b: Path) -> dict:
    x, y = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    diff = sum(((x[k].double() - y[k].double()) ** 2).sum() for k in x) ** 0.5
    norm = sum((x[k].double() ** 2).sum() for k in x) ** 0.5
    losses = [[json.loads(line)["loss"] for line in (p / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for p in (a, b)]
    return {"adapter_rel_diff": float(diff / norm),
            "loss_max_rel_diff": max(abs(u - v) / abs(u) for u, v in zip(*losses))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-resume"))
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    whole = out / "uninterrupted"
    run(command(out, "whole", 1, args.steps, whole))
    results = {}
    for name, first, then in (("2to1", 2, 1), ("1to2", 1, 2)):
        root = out / name
        reached = run_and_kill(command(out, name, first, args.steps, root), root / "checkpoints" / "checkpoint-10")
        run(command(out, name, then, args.steps, root, resume=True))
        results[name] = {"killed_after_step": reached, **compare(whole, root)}
    results.update(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"))
    (out / "ddp_resume.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
