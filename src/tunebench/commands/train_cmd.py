"""`tunebench train`, `tunebench merge`, `tunebench push`."""

from __future__ import annotations

import argparse
from pathlib import Path

from tunebench.commands.options import add_config_args
from tunebench.config import load_config


def register(sub) -> None:
    train = sub.add_parser(
        "train", help="fine-tune a base model (qlora, lora, full, prefix, prompt)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a base model on the config's data; leaves adapter/ (or model/) in the run directory.",
        epilog="examples:\n  tunebench train configs/quickstart.yaml --set train.max_steps=10\n"
               "  tunebench train configs/llm-jp-3-13b-qlora.yaml --resume   # continue after a crash\n"
               "  tunebench train configs/llm-jp-3-13b-qlora.yaml --gpus 2 --set train.sharding=fsdp   # 4-bit weights "
               "split over 2 GPUs")
    add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    train.add_argument("--allow-contamination", action="store_true",
                       help="train even if records overlap evaluation inputs (not recommended)")
    train.add_argument("--gpus", type=int, default=1,
                       help="data-parallel processes through `accelerate launch` (one per GPU; gloo on CPU). "
                            "Each step then takes per_device_train_batch_size × gradient_accumulation_steps × N rows "
                            "(× the number of machines)")
    machines = train.add_argument_group(
        "several machines", "run the same command on every machine, each with its own --machine-rank; the run "
        "directory must be on storage all machines share (rank 0 prepares the data and writes checkpoints there)")
    machines.add_argument("--num-machines", type=int, default=1, help="machines in the run (each runs --gpus processes)")
    machines.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0 … num-machines − 1")
    machines.add_argument("--main-process-ip", help="address of machine 0, reachable from every machine")
    machines.add_argument("--main-process-port", type=int,
                          help="port on machine 0 for the rendezvous (default 29500 with several machines)")
    train.set_defaults(func=run_train)

    merge = sub.add_parser("merge", help="merge a LoRA adapter into its (unquantised) base model",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="example:\n  tunebench merge runs/quickstart   # writes runs/quickstart/merged/")
    merge.add_argument("run", help="run directory (or adapter folder)")
    merge.add_argument("--out", help="output folder (default: RUN/merged)")
    merge.set_defaults(func=run_merge)

    push = sub.add_parser("push", help="upload the adapter or merged model to the Hugging Face Hub",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="examples:\n  tunebench push runs/quickstart --repo me/gemma-ja --dry-run out/\n"
                                 "  HF_TOKEN=... tunebench push runs/quickstart --repo me/gemma-ja --private")
    push.add_argument("run", help="run directory")
    push.add_argument("--repo", required=True, help="user/name on the hub")
    push.add_argument("--private", action="store_true")
    push.add_argument("--merged", action="store_true", help="push RUN/merged instead of the adapter")
    push.add_argument("--dry-run", metavar="DIR",
                      help="write the files that would be uploaded to DIR (a new or empty folder outside the run)")
    push.set_defaults(func=run_push)


def run_train(args) -> int:
    import os

    if "WORLD_SIZE" not in os.environ:  # the command a user typed, not one of the processes it started
        from tunebench.train.distributed import check_gpu_count

        check_gpu_count(args.gpus)
        if args.gpus > 1 or args.num_machines > 1:
            return launch_processes(args)
    from tunebench.runs import RunDir
    from tunebench.train.sft import train

    config = load_config(args.config, args.overrides)
    run = RunDir.for_config(config, args.run_dir)
    if not args.resume:  # without it a rerun refuses the existing checkpoints
        args.interrupt_hint = "rerun the same command with --resume to continue from the last checkpoint"
    out = train(config, run, resume=args.resume, allow_contamination=args.allow_contamination)
    if os.environ.get("RANK", "0") == "0":  # once, not once per process
        print(f"trained: {out}")
    return 0


def launch_processes(args) -> int:
    """Start this machine's processes of a multi-process run, once its settings are checked."""
    from tunebench.config_checks import check_config
    from tunebench.errors import ConfigError
    from tunebench.train.distributed import Machines, launch

    # refused before any process starts
    machines = Machines(args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port)
    if problems := machines.problems():
        raise ConfigError("\n".join(problems))
    check_config(load_config(args.config, args.overrides), args.gpus * args.num_machines, args.config)
    argv = [args.config] + [f"--set={o}" for o in args.overrides]
    argv += [f"--run-dir={args.run_dir}"] if args.run_dir else []
    argv += ["--resume"] * args.resume + ["--allow-contamination"] * args.allow_contamination
    return launch(args.gpus, argv, machines)


def run_merge(args) -> int:
    from tunebench.train.merge import merge

    out = merge(Path(args.run), Path(args.out) if args.out else None)
    print(f"merged model: {out}")
    return 0


def run_push(args) -> int:
    from tunebench.train.push import push

    where = push(Path(args.run), args.repo, private=args.private, merged=args.merged,
                 dry_run=Path(args.dry_run) if args.dry_run else None)
    print(f"{'wrote' if args.dry_run else 'uploaded to'} {where}")
    return 0
