"""Shared fixtures: the real Gemma 3 tokenizer (from the embedded model) and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The course's data folder (../shared/data beside the checkout) is reached only through this
# variable; tunebench itself never looks for it. Tests that need the unshipped ELYZA-tasks-100-TV
# get it the way a user would: TUNEBENCH_TV_TASKS (set here unless the environment sets it).
os.environ.setdefault("TUNEBENCH_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
SHARED_DATA = Path(os.environ["TUNEBENCH_SHARED_DATA"])
if (SHARED_DATA / "elyza-tasks-100-tv" / "tasks.jsonl").is_file():
    os.environ.setdefault("TUNEBENCH_TV_TASKS", str(SHARED_DATA / "elyza-tasks-100-tv" / "tasks.jsonl"))
# Without a GPU, Triton's kernels (where Triton is installed) run under its interpreter, which must be chosen
# before Triton is first imported (tests/generate/test_decode_attention_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    from tunebench.models.embedded import embedded_checkpoint

    return embedded_checkpoint()  # converted once per machine (~1 min), then cached


@pytest.fixture(scope="session")
def tokenizer(gemma_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer, hidden-32 Llama (llm-jp-3's architecture) with Gemma's vocabulary, saved to disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=0.2)  # logits sharp enough for adapters to move them
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found (set TUNEBENCH_SHARED_DATA to the course's shared/data folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A tunebench LoRA run on the tiny model (3 steps, a learning rate high enough to change answers)."""
    import json

    from tunebench.config import load_config
    from tunebench.runs import RunDir
    from tunebench.train.sft import train

    root = tmp_path_factory.mktemp("lora-run")
    data = root / "d.jsonl"
    data.write_text(json.dumps({"instruction": "挨拶して", "input": "", "output": "こんにちは"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.sources=[{{path: '{data}'}}]",
                                "data.contamination_sets=[]", "train.method=lora", "train.max_steps=3",
                                "train.learning_rate=5e-2", "train.lora_dropout=0.0", "train.warmup_steps=0"])
    run = RunDir(root / "run")
    train(config, run)
    return run
