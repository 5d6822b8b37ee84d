"""Fixtures of the multi-process tests, and dynamo reset around the compile tests."""

import pytest
import torch
from torch._dynamo.utils import counters

from tests.train.multiprocess import write_config
from tunebench.cli import main


@pytest.fixture(scope="session")
def lora_reference(tmp_path_factory, tiny_model_dir):
    """One process × accum 2 (the global batch of 2 processes × accum 1), LoRA, with checkpoint-2: the run
    every multi-process LoRA run is compared with. Copy it before resuming from it."""
    folder = tmp_path_factory.mktemp("lora-reference")
    run = folder / "run"
    assert main(["train", str(write_config(folder, tiny_model_dir, 2)), "--run-dir", str(run)]) == 0
    return run


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters cleared before and after a test that compiles (graph counts, graph breaks)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
