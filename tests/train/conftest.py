"""Fixtures of the multi-process tests."""

import pytest

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
