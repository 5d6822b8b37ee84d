"""Data parallelism through accelerate: 2 CPU processes (gloo) against one process, same global batch.

answer_only_logits is insisted on: under DDP the decoder still runs inside DDP's forward (DecoderOrLM)."""

import shutil

import pytest

from tests.train.multiprocess import adapter, assert_same_adapter, losses, write_config
from tunebench.cli import main
from tunebench.runs import RunDir


def test_two_processes_match_one_and_resume_across_process_counts(tmp_path, tiny_model_dir, lora_reference):
    single, double = lora_reference, tmp_path / "double"
    # one process × accum 2 and two processes × accum 1: the same global batch of 2 rows
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


def test_two_machines_rendezvous_and_train_as_two_processes(tmp_path, tiny_model_dir, lora_reference):
    """Two `tunebench train --gpus 1 --num-machines 2` commands, one per "machine" (both on this host,
    gloo), meet at machine 0's address and train as one 2-process run: the losses and adapter of the
    single-process run with the same global batch (which the 2-process run above equals)."""
    import subprocess
    import sys

    from tunebench.train.distributed import free_port

    run, port = tmp_path / "two-machines", str(free_port())
    config = str(write_config(tmp_path, tiny_model_dir, 1))
    machines = [subprocess.Popen([sys.executable, "-m", "tunebench.cli", "train", config, "--run-dir", str(run),
                                  "--gpus", "1", "--num-machines", "2", "--machine-rank", str(rank),
                                  "--main-process-ip", "127.0.0.1", "--main-process-port", port])
                for rank in (0, 1)]
    try:
        assert [machine.wait(timeout=180) for machine in machines] == [0, 0]
    finally:
        for machine in machines:
            machine.kill()
    assert losses(run) == pytest.approx(losses(lora_reference), rel=1e-9)
    assert_same_adapter(adapter(lora_reference), adapter(run))


def test_more_gpus_than_visible_is_refused_before_launching(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import torch

    from tunebench.train import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched"))
    assert main(["train", str(write_config(tmp_path, tiny_model_dir, 1)), "--gpus", "4"]) == 2
    err = capsys.readouterr().err
    assert "--gpus 4: this machine has 2 visible CUDA GPU(s) (CUDA_VISIBLE_DEVICES=0,1); use --gpus 2" in err


def test_machine_flags_are_checked_together_before_launching(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from tunebench.train import distributed

    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched"))
    assert main(["train", str(write_config(tmp_path, tiny_model_dir, 1)), "--gpus", "2", "--num-machines", "2",
                 "--machine-rank", "2", "--main-process-port", "70000"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --machine-rank must be in [0, 1] for --num-machines 2, got 2",
                   "error: --main-process-ip is needed with --num-machines > 1 (the address of machine 0, "
                   "reachable from every machine)",
                   "error: --main-process-port must be in [1, 65535], got 70000"]


def test_launch_commands_for_two_machines_of_eight_gpus():
    """accelerate's --num_processes counts all machines' processes; torch.distributed.run's
    --nproc_per_node counts this machine's. Both get the same rendezvous address and port."""
    from tunebench.train.distributed import Machines, launch_command

    machines = Machines(count=2, rank=1, main_ip="10.0.0.1", main_port=29400)
    cuda = launch_command(8, machines, cuda=True)
    assert cuda[1:] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "16",
                        "--num_machines", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29400"]
    cpu = launch_command(8, machines, cuda=False)
    assert cpu[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1",
                       "--master_addr", "10.0.0.1", "--master_port", "29400"]
    # without a port, every machine must still pick the same one
    assert launch_command(8, Machines(2, 0, "10.0.0.1"), cuda=False)[-1] == "29500"
    assert "--machine_rank" not in launch_command(2, Machines(), cuda=True)
