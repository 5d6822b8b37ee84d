"""Data-parallel scaling on one host (issue 17): `tunebench train` on 1 GPU against `--gpus 2`.

For each case (course settings: batch 2 × grad-accum 4, seq 512, megagon, `tunebench train` CLI):

  1gpu            one process, accum 4                       the baseline
  2gpu-same-gpu   2 processes, accum 4 per GPU               throughput at the same per-GPU batch (2× global)
  2gpu-same-glob  2 processes, accum 2 per GPU               loss curve at the same global batch (8 rows)

Reported: median real tokens/s over all GPUs (after the first two steps), peak memory on GPU 0, the
2-GPU/1-GPU throughput ratio, and the largest relative loss difference over the steps between
`1gpu` and `2gpu-same-glob` (bf16: the two add the same gradients in another order).

Models are random-initialised real architectures (speed does not depend on the weights' values):
Gemma 3 270M (LoRA) and llm-jp-3-13b (QLoRA, ids folded into its vocabulary). Every process runs
with NVLink multicast off (NCCL_NVLS_ENABLE=0 and the device notes' other variables).

    python bench/ddp_scaling.py --cases gemmarandom-lora,llmjp13b-qlora --steps 20
    python bench/ddp_scaling.py --table /tmp/ddp_scaling.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_gpu import NO_MULTICAST, case_config, metrics_summary, prepare_case, step_records  # noqa: E402

from tunebench.config import dump_config  # noqa: E402
from tunebench.runs import RunDir  # noqa: E402

SAME_EVERYWHERE = ["train.offload_frozen=false", "train.lora_dropout=0.0"]
VARIANTS = {"1gpu": (1, 4), "2gpu-same-gpu": (2, 4), "2gpu-same-glob": (2, 2)}  # (GPUs, accum per GPU)


def run_variant(case: str, variant: str, steps: int, seq: int, out: Path, extra: list[str] = ()) -> dict:
    gpus, accum = VARIANTS[variant]
    # offload_frozen streams weights on one process only: off everywhere, so the variants differ in GPUs
    # alone; no dropout, whose random masks differ with the number of processes
    config = case_config(case, steps, seq, [f"train.gradient_accumulation_steps={accum}", *SAME_EVERYWHERE, *extra])
    run = RunDir(out / f"{case}-{variant}")
    prepare_case(config, run)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{case}-{variant}.yaml"
    dump_config(config, path)
    start = time.time()
    command = [sys.executable, "-m", "tunebench.cli", "train", str(path), "--run-dir", str(run.root),
               "--gpus", str(gpus)]
    done = subprocess.run(command, env={**os.environ, **NO_MULTICAST, "TQDM_DISABLE": "1"}, capture_output=True,
                          text=True)
    if done.returncode:
        print(done.stdout[-2000:] + done.stderr[-4000:], flush=True)
        return {"case": case, "variant": variant, "set": list(extra), "error": f"exit {done.returncode}"}
    return {"case": case, "variant": variant, "gpus": gpus, "accum": accum, "steps": steps, "seq": seq, "set": list(extra),
            **metrics_summary(step_records(run)), "wall_s": time.time() - start}


def print_table(results: list[dict]) -> None:
    """Each 2-GPU row against the latest 1-GPU row of the same case and overrides (and the same call's
    results file: rerun the baseline with the candidate)."""
    def label(r: dict) -> str:
        return r["case"] + "".join(f" {s.split('.')[-1]}" for s in r.get("set", []))

    base = {label(r): r for r in results if r.get("variant") == "1gpu" and "error" not in r}
    print(f"{'case':<34}{'variant':<16}{'tok/s':>9}{'×1gpu':>7}{'GiB/GPU':>9}{'loss last':>10}{'max Δloss rel':>15}")
    for r in results:
        if "error" in r:
            print(f"{label(r):<34}{r['variant']:<16}  {r['error']}")
            continue
        b = base.get(label(r))
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
        delta = "-"
        if b and r["variant"] == "2gpu-same-glob":
            delta = f"{max(abs(x - y) / abs(y) for x, y in zip(r['losses'], b['losses'])):.1e}"
        print(f"{label(r):<34}{r['variant']:<16}{r['tokens_per_s']:>9.0f}{ratio:>7}{r['peak_gib']:>9.2f}"
              f"{r['loss_last']:>10.4f}{delta:>15}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="gemmarandom-lora,llmjp13b-qlora")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-ddp"))
    parser.add_argument("--results", type=Path, default=Path("/tmp/ddp_scaling.jsonl"))
    parser.add_argument("--set", dest="extra", action="append", default=[], help="config overrides for every variant")
    parser.add_argument("--table", type=Path, help="print the table of a results file and stop")
    args = parser.parse_args()
    if args.table:
        return print_table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()])
    import torch

    for case in args.cases.split(","):
        for variant in args.variants.split(","):
            result = run_variant(case, variant, args.steps, args.seq, args.out, args.extra)
            result.update(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"))
            with args.results.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
            print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    print_table([json.loads(line) for line in args.results.read_text().splitlines() if line.strip()])


if __name__ == "__main__":
    main()
