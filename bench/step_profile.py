"""Where a training step's time goes, per process: torch.profiler over a few steps of `tunebench train`.

For the 2-GPU Gemma 3 270M scaling gap (issue 17) and the launch-bound steps (issue 15): the same case
(course settings, random-initialised real architecture, see train_gpu.py) on 1 process and on N, each
process profiling steps --from .. --from+--count of its own run. Written per rank to OUT_DIR:
  profile-LABEL-rankR.txt   the profiler's table (top ops by self CPU time, then by self CUDA time)
  steps-LABEL-rankR.json    wall time of every step on that rank (CUDA-synchronised at the step's end)
A short table of the ranks' median step time, CPU time and GPU time per profiled step is printed last.

    python bench/step_profile.py --case gemmarandom-lora --gpus 1 --label 1gpu
    python bench/step_profile.py --case gemmarandom-lora --gpus 2 --label 2gpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(config: str, run_dir: str, out_dir: Path, label: str, first: int, count: int, extra: list[str]) -> None:
    """Run `tunebench train` in this process with train_step wrapped: timed every step, profiled in
    [first, first + count)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    import tunebench.train.loop as loop
    from tunebench.cli import main as cli_main

    rank = int(os.environ.get("RANK", "0"))
    step_times: list[float] = []
    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    plain = loop.train_step

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed_step(*args, **kwargs):
        index = len(step_times)
        if index == first:
            profiler.start()
        sync()
        start = time.perf_counter()
        result = plain(*args, **kwargs)
        sync()
        step_times.append(time.perf_counter() - start)
        if index == first + count - 1:
            profiler.stop()
            averages = profiler.key_averages()
            cpu_total = sum(e.self_cpu_time_total for e in averages) / 1e3 / count
            # kernels only: an op's self device time is its kernels' time again (the profiler's own total
            # counts device events alone; summing every row counted each kernel twice before 2026-11-26)
            gpu_total = sum(e.self_device_time_total for e in averages
                            if e.device_type != DeviceType.CPU and not e.is_user_annotation) / 1e3 / count
            text = (f"{label} rank {rank}: per profiled step {cpu_total:.1f} ms self CPU, {gpu_total:.1f} ms "
                    f"self GPU\n\n" + averages.table(sort_by="self_cpu_time_total", row_limit=30)
                    + "\n\n" + averages.table(sort_by="self_device_time_total", row_limit=20))
            (out_dir / f"profile-{label}-rank{rank}.txt").write_text(text)
            (out_dir / f"cpu-gpu-{label}-rank{rank}.json").write_text(
                json.dumps({"cpu_ms_per_step": cpu_total, "gpu_ms_per_step": gpu_total}))
        return result

    loop.train_step = timed_step
    try:
        cli_main(["train", config, "--run-dir", run_dir, *[f"--set={s}" for s in extra]])
    finally:
        (out_dir / f"steps-{label}-rank{rank}.json").write_text(json.dumps(step_times))


def launch(case: str, gpus: int, steps: int, label: str, out_dir: Path, first: int, count: int,
           extra: list[str]) -> None:
    from ddp_scaling import SAME_EVERYWHERE
    from train_gpu import NO_MULTICAST, case_config, prepare_case

    from tunebench.config import dump_config
    from tunebench.runs import RunDir
    from tunebench.train.distributed import Machines, launch_command

    config = case_config(case, steps, 512, [*SAME_EVERYWHERE, *extra])
    run = RunDir(Path(f"/tmp/bench-profile/{case}-{label}"))
    if run.root.exists():
        import shutil

        shutil.rmtree(run.root)
    prepare_case(config, run)
    path = out_dir / f"{case}-{label}.yaml"
    dump_config(config, path)
    worker_args = [__file__, "--worker", str(path), str(run.root), "--out-dir", str(out_dir), "--label", label,
                   "--from", str(first), "--count", str(count)]
    # several GPUs: the launcher `tunebench train --gpus N` uses, running the worker script instead
    command = [sys.executable] if gpus == 1 else launch_command(gpus, Machines(), cuda=True)
    done = subprocess.run(command + worker_args, env={**os.environ, **NO_MULTICAST, "TQDM_DISABLE": "1"},
                          capture_output=True, text=True)
    if done.returncode:
        print(done.stdout[-2000:] + done.stderr[-4000:], flush=True)


def print_table(out_dir: Path) -> None:
    print(f"{'label':<12}{'rank':>5}{'median step ms':>16}{'CPU ms/step':>13}{'GPU ms/step':>13}")
    for path in sorted(out_dir.glob("steps-*-rank*.json")):
        label, rank = path.stem.removeprefix("steps-").rsplit("-rank", 1)
        times = json.loads(path.read_text())[2:]
        cost = out_dir / f"cpu-gpu-{label}-rank{rank}.json"
        cpu_gpu = json.loads(cost.read_text()) if cost.exists() else {}
        median = f"{statistics.median(times) * 1e3:.1f}" if times else "-"
        print(f"{label:<12}{rank:>5}{median:>16}{cpu_gpu.get('cpu_ms_per_step', 0):>13.1f}"
              f"{cpu_gpu.get('gpu_ms_per_step', 0):>13.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RUN_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--case", default="gemmarandom-lora")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--from", dest="first", type=int, default=6, help="first profiled step (0-based)")
    parser.add_argument("--count", type=int, default=3, help="profiled steps")
    parser.add_argument("--label", default=None)
    parser.add_argument("--set", dest="extra", action="append", default=[])
    parser.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench-profile")))
    parser.add_argument("--table", action="store_true", help="print the table of --out-dir and stop")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(*args.worker, args.out_dir, args.label, args.first, args.count, args.extra)
    if not args.table:
        launch(args.case, args.gpus, args.steps, args.label or f"{args.gpus}gpu", args.out_dir, args.first,
               args.count, args.extra)
    print_table(args.out_dir)


if __name__ == "__main__":
    main()
