"""FSDP measurements on two GPUs (issue 17): `tunebench train --gpus 2` with train.sharding=fsdp.

Cases (random-initialised models: speed and memory do not depend on the weights' values; megagon
tokenised with Gemma's tokenizer, ids folded into llm-jp-3's vocabulary, as in train_gpu.py):

  fsdp-full-3.7b    full fine-tuning of the llm-jp-3-3.7b shape (fp32 weights, gradients and AdamW
                    state, bf16 autocast) sharded over 2 GPUs
  full-3.7b-1gpu    the same on one GPU, unsharded: out of memory or not is recorded, not raised
  fsdp-full-7.2b    the same for the llm-jp-3-7.2b shape (117 GB of weights, gradients and AdamW state)
  full-7.2b-1gpu    ... on one GPU, unsharded
  fsdp-full-13b     full fine-tuning of the 13B shape, for GPUs on which the 7.2b shape's state fits one (H200)
  full-13b-1gpu     ... on one GPU, unsharded
  fsdp-qlora-13b    QLoRA of the llm-jp-3-13b shape, the 4-bit weights (stored in bf16) sharded over 2 GPUs
  qlora-13b-1gpu    the same on one GPU, unsharded (the memory to compare with)

Each case runs `tunebench train` as a user does, in its own processes, with NCCL_NVLS_ENABLE=0 (NVLink
multicast off) in their environment; its output goes to OUT/CASE.log. Reported from metrics.jsonl:
median tokens/s (all GPUs together) over the steps after the first two, peak allocated memory of each
GPU, first and last loss. JSON lines are appended to --results, a table is printed last.

    python bench/multi_gpu.py                                   # all four cases, 10 steps
    python bench/multi_gpu.py --cases fsdp-full-3.7b,full-3.7b-1gpu --steps 20
    python bench/multi_gpu.py --cpu-smoke                       # tiny model, 2 CPU processes (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # before any tunebench import
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_gpu import (  # noqa: E402
    LLMJP_13B,
    NO_MULTICAST,
    TOKENIZER,
    build_random,
    metrics_summary,
    prepare_folded,
    step_records,
)

from tunebench.config import load_config  # noqa: E402
from tunebench.runs import RunDir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, **NO_MULTICAST,
       "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
# llm-jp/llm-jp-3-3.7b's config.json: Llama, hidden 3072, 28 layers, 24 heads (24 KV), MLP 8192,
# vocabulary 99,584, untied output layer: 3.78 B parameters.
LLMJP_3_7B = dict(vocab_size=99584, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                  num_key_value_heads=24, intermediate_size=8192, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
# llm-jp/llm-jp-3-7.2b's config.json: hidden 4096, 32 layers, 32 heads, MLP 11008, untied: 7.29 B parameters,
# 117 GB of fp32 weights + gradients + AdamW state: more than one H100 holds, half of it fits.
LLMJP_7_2B = dict(LLMJP_3_7B, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  intermediate_size=11008)
# --cpu-smoke: the same code paths on a model small enough for a CPU
TINY = dict(LLMJP_3_7B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=128)
BASE_CONFIG = str(REPO / "configs" / "llm-jp-3-13b-qlora.yaml")
CASES = {  # name: (model, method, GPUs, sharding)
    "fsdp-full-3.7b": ("3.7b", "full", 2, "fsdp"),
    "full-3.7b-1gpu": ("3.7b", "full", 1, "none"),
    "fsdp-full-7.2b": ("7.2b", "full", 2, "fsdp"),
    "full-7.2b-1gpu": ("7.2b", "full", 1, "none"),
    "fsdp-full-13b": ("13b", "full", 2, "fsdp"),  # on GPUs of more than ~120 GiB (H200), where 7.2b fits one
    "full-13b-1gpu": ("13b", "full", 1, "none"),
    "fsdp-qlora-13b": ("13b", "qlora", 2, "fsdp"),
    "qlora-13b-1gpu": ("13b", "qlora", 1, "none"),
}
SMOKE_CASES = {"fsdp-full-tiny": ("tiny", "full", 2, "fsdp"), "full-tiny-1": ("tiny", "full", 1, "none"),
               "fsdp-lora-tiny": ("tiny", "lora", 2, "fsdp")}
MODELS = {"3.7b": (Path("/tmp/llmjp3.7b"), LLMJP_3_7B), "7.2b": (Path("/tmp/llmjp7.2b"), LLMJP_7_2B), "13b": (Path("/tmp/llmjp13b"), LLMJP_13B),
          "tiny": (Path("/tmp/llmjp-tiny"), TINY)}
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory")


def overrides(model_dir: Path, method: str, sharding: str, steps: int, seq: int, smoke: bool) -> list[str]:
    """The --set overrides of a case (the bench and the launched `tunebench train` read the same config)."""
    found = [f"train.method={method}", f"train.sharding={sharding}", f"train.max_steps={steps}",
             "train.logging_steps=1", "train.save_steps=100000", f"data.max_seq_length={seq}",
             "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=4", "train.warmup_steps=2",
             "data.template=course", "data.sources=[{path: 'builtin:ja-instruct-megagon'}]",
             f"model.name_or_path={model_dir}", f"model.tokenizer={TOKENIZER}"]
    if method == "full":
        found.append("train.learning_rate=1e-5")
    if smoke:  # a few hundred rows, no task sets to check against, fp32 on CPU
        found += ["data.max_records=256", "data.contamination_sets=[]", "train.precision=fp32"]
    return found


def run_case(name: str, spec: tuple, steps: int, seq: int, out: Path, smoke: bool) -> dict:
    model, method, gpus, sharding = spec
    model_dir, shape = MODELS[model]
    build_random(model_dir, shape, device="cpu" if smoke else "cuda")
    sets = overrides(model_dir, method, sharding, steps, seq, smoke)
    run = RunDir(out / name)
    if run.root.exists():  # a fresh run each time (the data stage is cheap)
        import shutil

        shutil.rmtree(run.root)
    prepare_folded(load_config(BASE_CONFIG, sets), run, shape["vocab_size"])
    command = [sys.executable, "-m", "tunebench.cli", "train", BASE_CONFIG, "--run-dir", str(run.root),
               "--gpus", str(gpus), *[f"--set={s}" for s in sets]]
    log_path = out / f"{name}.log"
    start = time.time()
    with log_path.open("w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    wall = time.time() - start
    text = log_path.read_text(errors="replace")
    result = {"case": name, "model": model, "method": method, "gpus": gpus, "sharding": sharding, "seq": seq,
              "steps": steps, "exit_code": code, "oom": any(m in text for m in OOM_MARKERS), "wall_s": round(wall),
              "log": str(log_path)}
    if code != 0:
        if not result["oom"]:
            print(f"{name}: exit {code}; last lines of {log_path}:\n" + "\n".join(text.splitlines()[-15:]),
                  flush=True)
        return result
    steps_logged = step_records(run)
    peaks = [m.get("peak_memory_gib_per_rank") or [m.get("peak_memory_gib", 0.0)] for m in steps_logged]
    result.update({"tokens_per_s": metrics_summary(steps_logged)["tokens_per_s"],
                   "peak_gib_per_gpu": [round(max(p[r] for p in peaks), 2) for r in range(len(peaks[0]))],
                   "loss_first": steps_logged[0]["loss"], "loss_last": steps_logged[-1]["loss"]})
    return result


def device_name(smoke: bool) -> str:
    import torch

    if smoke or not torch.cuda.is_available():
        return f"CPU (gloo), torch {torch.__version__}"
    return f"{torch.cuda.device_count()} × {torch.cuda.get_device_name()}, torch {torch.__version__}"


def print_table(results: list[dict], device: str) -> None:
    print(f"\n{device}")
    print(f"{'case':<18}{'GPUs':>5}{'steps':>6}{'tok/s':>9}{'peak GiB per GPU':>20}{'loss 1st→last':>17}{'wall s':>8}")
    for r in results:
        if r["exit_code"]:
            outcome = "out of memory" if r["oom"] else f"failed (exit {r['exit_code']}, see {r['log']})"
            print(f"{r['case']:<18}{r['gpus']:>5}{r['steps']:>6}  {outcome}")
            continue
        peaks = " / ".join(f"{p:.1f}" for p in r["peak_gib_per_gpu"])
        print(f"{r['case']:<18}{r['gpus']:>5}{r['steps']:>6}{r['tokens_per_s']:>9.0f}{peaks:>20}"
              f"{r['loss_first']:>8.3f}→{r['loss_last']:<8.3f}{r['wall_s']:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help=f"comma-separated, of {', '.join(CASES)} (default: all)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq", type=int, default=512, help="data.max_seq_length")
    parser.add_argument("--out", default="/tmp/bench-multi-gpu", help="run folders and logs")
    parser.add_argument("--results", default="/tmp/multi_gpu.jsonl", help="JSON lines appended here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, CPU processes (gloo), 3 steps")
    args = parser.parse_args()
    table = SMOKE_CASES if args.cpu_smoke else CASES
    names = args.cases.split(",") if args.cases else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    steps = 3 if args.cpu_smoke else args.steps
    seq = 128 if args.cpu_smoke else args.seq
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = device_name(args.cpu_smoke)
    results = []
    for name in names:
        result = {**run_case(name, table[name], steps, seq, out, args.cpu_smoke), "device": device,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        results.append(result)
        print(json.dumps(result), flush=True)
        with open(args.results, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")
    print_table(results, device)


if __name__ == "__main__":
    main()
