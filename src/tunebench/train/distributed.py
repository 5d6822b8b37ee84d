"""Data parallelism through accelerate: one process per GPU (or CPU process with gloo).

A single process never touches accelerate. Under `accelerate launch` (`tunebench train --gpus N`)
the model is wrapped for DDP by accelerate (or sharded with FSDP2, train/sharding.py, when
train.sharding is fsdp), each rank takes every N-th micro-batch of the run's seeded order, and only
rank 0 writes files and logs below warnings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch

from tunebench.errors import ConfigError
from tunebench.train.wrapped import DecoderOrLM, inner

log = logging.getLogger(__name__)


class Dist:
    """What the training loop needs to know about the process group."""

    def __init__(self, cpu: bool, sharding: str = "none"):
        self.accelerator = None
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.device = torch.device("cpu") if cpu else None
        self.sharded = sharding == "fsdp" and self.world > 1
        if self.world > 1:
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs

            # A causal LM's buffers (rotary frequencies) never change in training: broadcasting them
            # from rank 0 before every forward is a collective per micro-batch for nothing. Gradients
            # live in DDP's all-reduce buckets, saving a copy into and out of them per step.
            ddp = DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)
            self.accelerator = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
            self.rank = self.accelerator.process_index
            self.device = self.accelerator.device
            if self.rank > 0:  # one copy of the log and progress bars: the other ranks say only what went wrong
                from transformers.utils import logging as transformers_logging

                logging.getLogger().setLevel(logging.WARNING)
                transformers_logging.disable_progress_bar()
        elif sharding == "fsdp":
            log.info("train.sharding fsdp on one process: nothing to shard across, training unsharded")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def gathers(self) -> bool:
        """Whether this rank takes part in collecting whole tensors for a save: rank 0 always, every
        rank when sharded (gathering the shards is a collective)."""
        return self.is_main or self.sharded

    def wrap(self, model):
        """FSDP2 in place (train/sharding.py) when sharded; else DDP around DecoderOrLM(model), so
        answer-only logits still run inside DDP's forward."""
        if self.sharded:
            from tunebench.train.sharding import shard_model

            return shard_model(model, self.device, self.world)
        return self.accelerator.prepare_model(DecoderOrLM(model)) if self.accelerator else model

    def reshard(self, model) -> None:
        """Sharded, put the model back in its sharded state after forward passes without a backward (the
        probe, DPO's reference pass, eval loss), which leave the root's weights gathered: collecting
        parameters for the optimizer then would collect the gathered copies (train/sharding.py)."""
        if self.sharded:
            from tunebench.train.sharding import reshard

            reshard(model)

    def unwrap(self, model):
        # FSDP2 shards in place: the sharded model is the peft/transformers model itself
        return inner(model) if self.accelerator and not self.sharded else model

    def sum_all(self, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """Sum every number over ranks in one all-reduce (one host sync for a whole log line)."""
        if not values:
            return {}
        device = self.device or next((v.device for v in values.values() if isinstance(v, torch.Tensor)),
                                     torch.device("cpu"))
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values.values()])
        if self.accelerator:
            stacked = self.accelerator.reduce(stacked, reduction="sum")
        return dict(zip(values, stacked.tolist()))

    def each(self, value: float) -> list[float]:
        """A number from every rank, in rank order (per-GPU figures for the log)."""
        if not self.accelerator:
            return [value]
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        return [float(v) for v in self.accelerator.gather(tensor).tolist()]

    def barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    def no_sync(self, model, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP). Sharded, every
        micro-batch's gradients are reduce-scattered at once: skipping it would keep an unsharded
        gradient of the whole model on every GPU until the step's last micro-batch (for full
        fine-tuning in fp32, 4 bytes per parameter: what sharding is there to remove)."""
        if self.accelerator and not last and not self.sharded:
            return self.accelerator.no_sync(model)
        return contextlib.nullcontext()


@dataclass(frozen=True)
class Machines:
    """Where this machine stands in a multi-machine run (`--num-machines`, `--machine-rank`, ...)."""

    count: int = 1
    rank: int = 0
    main_ip: str | None = None
    main_port: int | None = None

    def problems(self) -> list[str]:
        found = []
        if self.count < 1:
            found.append(f"--num-machines must be ≥ 1, got {self.count}")
        elif not 0 <= self.rank < self.count:
            found.append(f"--machine-rank must be in [0, {self.count - 1}] for --num-machines {self.count}, "
                         f"got {self.rank}")
        if self.count > 1 and not self.main_ip:
            found.append("--main-process-ip is needed with --num-machines > 1 (the address of machine 0, "
                         "reachable from every machine)")
        if self.main_port is not None and not 0 < self.main_port < 65536:
            found.append(f"--main-process-port must be in [1, 65535], got {self.main_port}")
        return found


DEFAULT_PORT = 29500


def check_gpu_count(gpus: int) -> None:
    """Refuse --gpus N beyond this machine's visible CUDA GPUs (before any process starts). Without CUDA
    the processes are CPU processes (gloo), as many as asked."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be ≥ 1, got {gpus}")
    if torch.cuda.is_available() and gpus > torch.cuda.device_count():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} visible CUDA GPU(s)"
                          + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                          + f"; use --gpus {torch.cuda.device_count()} or fewer")


def launch_command(per_machine: int, machines: Machines, cuda: bool) -> list[str]:
    """The launcher's command line for `per_machine` processes on this machine. On GPUs `accelerate launch
    --multi_gpu`, whose --num_processes counts the processes of all machines; on CPU torch.distributed.run,
    the launcher accelerate's multi-GPU path uses itself (`accelerate launch --cpu` starts a single
    process), whose --nproc_per_node counts this machine's."""
    # machines must agree on the port: 29500 (accelerate's default) unless given
    port = machines.main_port or (DEFAULT_PORT if machines.count > 1 else None)
    if cuda:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(per_machine * machines.count), "--num_machines", str(machines.count),
                   "--mixed_precision", "no", "--dynamo_backend", "no"]
        if machines.count > 1:
            command += ["--machine_rank", str(machines.rank), "--main_process_ip", machines.main_ip]
        return command + (["--main_process_port", str(port)] if port else [])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(per_machine)]
    if machines.count > 1:
        command += ["--nnodes", str(machines.count), "--node_rank", str(machines.rank),
                    "--master_addr", machines.main_ip]
    return command + ["--master_port", str(port or free_port())]


def launch(n_processes: int, argv: list[str], machines: Machines = Machines()) -> int:
    """Re-run `tunebench train ARGV` in n processes on this machine (of `machines`). The Accelerator
    inside each process sets up the group (NCCL, or gloo on CPU) and the DDP wrapping either way."""
    command = launch_command(n_processes, machines, torch.cuda.is_available())
    return subprocess.call(command + ["-m", "tunebench.cli", "train", *argv])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
