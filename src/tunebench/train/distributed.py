"""Data parallelism through accelerate: one process per GPU (or CPU process with gloo).

A single process never touches accelerate. Under `accelerate launch` (`tunebench train --gpus N`)
the model is wrapped for DDP by accelerate, each rank takes every N-th micro-batch of the run's
seeded order, and only rank 0 writes files.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from tunebench.train.wrapped import DecoderOrLM, inner


class Dist:
    """What the training loop needs to know about the process group."""

    def __init__(self, cpu: bool):
        self.accelerator = None
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.device = torch.device("cpu") if cpu else None
        if self.world > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=cpu)
            self.rank = self.accelerator.process_index
            self.device = self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model):
        """DDP around DecoderOrLM(model), so answer-only logits still run inside DDP's forward."""
        return self.accelerator.prepare_model(DecoderOrLM(model)) if self.accelerator else model

    def unwrap(self, model):
        return inner(model) if self.accelerator else model

    def sum(self, value: float) -> float:
        """Sum a number over ranks (for logging totals)."""
        if not self.accelerator:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(tensor, reduction="sum").item())

    def barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    def no_sync(self, model, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        import contextlib

        if self.accelerator and not last:
            return self.accelerator.no_sync(model)
        return contextlib.nullcontext()


def launch(n_processes: int, argv: list[str]) -> int:
    """Re-run `tunebench train ARGV` in n processes. On GPUs through `accelerate launch --multi_gpu`;
    on CPU through torch.distributed.run, the launcher accelerate's multi-GPU path uses itself
    (`accelerate launch --cpu` starts a single process). The Accelerator inside each process sets
    up the group (NCCL, or gloo on CPU) and the DDP wrapping either way."""
    if torch.cuda.is_available():
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(n_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n_processes),
                   "--master_port", str(free_port())]
    return subprocess.call(command + ["-m", "tunebench.cli", "train", *argv])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
