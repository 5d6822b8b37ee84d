"""train.gradient_checkpointing auto: off where a micro-batch's activations are small beside the GPU's
memory (a small model: checkpointing costs it more than the memory is worth), on everywhere else."""

from types import SimpleNamespace

import pytest
import torch

from tunebench.config import TrainConfig, load_config
from tunebench.config_checks import config_problems
from tunebench.errors import ConfigError
from tunebench.train import checkpointing as checkpointing_module
from tunebench.train.checkpointing import activation_bytes, micro_batch_tokens, use_checkpointing
from tunebench.train.setup import resolve_levers

GIB = 2**30
CUDA = torch.device("cuda")


def gemma_270m_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256)


def llmjp_13b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=99584, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40)


@pytest.fixture
def gpu_of(monkeypatch):
    """Pretend the CUDA device has `gib` GiB (the decision reads only its total memory)."""
    def set_memory(gib: float):
        monkeypatch.setattr(checkpointing_module.torch.cuda, "get_device_properties",
                            lambda _device: SimpleNamespace(total_memory=int(gib * GIB)))
    return set_memory


def test_the_estimate_is_near_what_gemma_measured_and_large_for_13b():
    # measured on an H100: 1.0 GiB more at peak without checkpointing, rows of up to 2,048 tokens
    gemma = activation_bytes(gemma_270m_config(), 2048)
    assert 1.0 * GIB <= gemma <= 2.0 * GIB
    assert activation_bytes(llmjp_13b_config(), 2048) > 15 * GIB


def test_micro_batch_tokens_follow_joined_rows_padded_rows_and_pairs():
    assert micro_batch_tokens(2048, 2, 512, pairs=False) == 2048
    assert micro_batch_tokens(256, 2, 512, pairs=False) == 512  # one example longer than step_tokens runs alone
    assert micro_batch_tokens(None, 2, 512, pairs=False) == 1024
    assert micro_batch_tokens(None, 2, 512, pairs=True) == 2048  # chosen and rejected rows
    assert micro_batch_tokens(2048, 2, 512, pairs=True) == 2048  # pairs joined into rows of step_tokens


@pytest.mark.parametrize("gib", [80, 24, 16])
def test_auto_is_off_for_a_small_model_and_on_for_13b_on_an_h100_an_l4_and_a_t4(gpu_of, gib):
    gpu_of(gib)
    gemma, big = SimpleNamespace(config=gemma_270m_config()), SimpleNamespace(config=llmjp_13b_config())
    assert use_checkpointing("auto", gemma, CUDA, 2048, offload=None, world=1) is False
    assert use_checkpointing("auto", big, CUDA, 2048, offload=None, world=1) is True


def test_auto_stays_on_on_cpu_on_several_gpus_with_offload_and_on_a_small_gpu(gpu_of):
    gpu_of(80)
    gemma = SimpleNamespace(config=gemma_270m_config())
    assert use_checkpointing("auto", gemma, torch.device("cpu"), 2048, offload=None, world=1) is True
    assert use_checkpointing("auto", gemma, CUDA, 2048, offload=None, world=2) is True
    assert use_checkpointing("auto", gemma, CUDA, 2048, offload=True, world=1) is True  # offload needs it
    gpu_of(8)
    assert use_checkpointing("auto", gemma, CUDA, 8192, offload=None, world=1) is True  # 5.4 GiB of 8
    assert use_checkpointing(True, gemma, CUDA, 2048, offload=None, world=1) is True
    assert use_checkpointing(False, SimpleNamespace(config=llmjp_13b_config()), CUDA, 2048, None, 1) is False


def test_levers_on_one_gpu_for_a_small_model_drop_checkpointing_and_offload_and_replay_graphs(gpu_of):
    """The wiring of setup.resolve_levers: checkpointing decided before offload (which needs it) and
    before the CUDA graphs (which cannot run with it)."""
    from transformers import Gemma3ForCausalLM

    gpu_of(80)
    with torch.device("meta"):
        small = Gemma3ForCausalLM(gemma_270m_config())
    t = resolve_levers(TrainConfig(method="lora"), small, CUDA, world=1, max_seq_length=512)
    assert (t.gradient_checkpointing, t.offload_frozen, t.compile, t.cuda_graphs) == (False, False, True, True)
    forced = resolve_levers(TrainConfig(method="lora", offload_frozen=True), small, CUDA, world=1, max_seq_length=512)
    assert (forced.gradient_checkpointing, forced.offload_frozen, forced.cuda_graphs) == (True, True, False)
    on_cpu = resolve_levers(TrainConfig(method="lora"), small, torch.device("cpu"), world=1, max_seq_length=512)
    assert (on_cpu.gradient_checkpointing, on_cpu.compile, on_cpu.cuda_graphs) == (True, False, False)
    assert (t.compile_dequant, on_cpu.compile_dequant) == (False, False)  # lora: no 4-bit weights
    qlora = resolve_levers(TrainConfig(method="qlora"), small, CUDA, world=1, max_seq_length=512)
    assert (qlora.compile, qlora.cuda_graphs, qlora.compile_dequant) == (True, True, False)  # graphs: no host cost
    recomputed = resolve_levers(TrainConfig(method="qlora", gradient_checkpointing=True), small, CUDA, world=1,
                                max_seq_length=512)
    assert (recomputed.cuda_graphs, recomputed.compile_dequant) == (False, True)  # the 13B's case
    uncompiled = resolve_levers(TrainConfig(method="qlora", compile=False), small, CUDA, world=1, max_seq_length=512)
    assert uncompiled.compile_dequant is False


def test_config_reads_auto_true_and_false_and_refuses_offload_without_checkpointing():
    assert load_config(None, []).train.gradient_checkpointing == "auto"
    assert load_config(None, ["train.gradient_checkpointing=false"]).train.gradient_checkpointing is False
    with pytest.raises(ConfigError, match="'train.gradient_checkpointing'"):
        load_config(None, ["train.gradient_checkpointing=sometimes"])
    assert not config_problems(load_config(None, ["train.offload_frozen=true", "train.method=lora"]))
    with pytest.raises(ConfigError, match="'train.offload_frozen'.*gradient_checkpointing true or auto"):
        load_config(None, ["train.offload_frozen=true", "train.method=lora", "train.gradient_checkpointing=false"])
