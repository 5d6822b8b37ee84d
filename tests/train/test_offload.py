"""Frozen-weight offload: same loss and gradients as the plain path, at most two layers resident."""

import weakref

import pytest
import torch

from tunebench.config import TrainConfig
from tunebench.errors import ConfigError
from tunebench.train.loss import token_loss_sum
from tunebench.train.methods import make_trainable
from tunebench.train.offload import enable_offload


def untied_llama(layers=4):
    """float64, so the offloaded and plain runs agree to rounding (≈1e-16) on any CPU: the comparison's 1e-9
    cannot be met by a layer run on stale or wrong weights, and is never missed by reordered sums."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False, pad_token_id=0, initializer_range=0.2)).double()


def batches():
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(1, 320, (2, 12), generator=gen)
        labels = ids.clone()
        labels[:, :5] = -100  # prompt positions
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def run(offload: bool):
    model = make_trainable(untied_llama(), TrainConfig(method="lora", lora_dropout=0.0, offload_frozen=offload))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; move it so every LoRA gradient is non-zero
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    model.train()
    handle = enable_offload(model, torch.device("cpu")) if offload else None
    model.ran_on_copy = []  # for each q_proj call: did its weight point into the layer's device copy?
    if offload:
        for i, layer in enumerate(model.get_base_model().model.layers):
            def check(module, _args, i=i):
                copy = handle.layers[i].resident
                ptr = module.weight.data_ptr()
                model.ran_on_copy.append(copy is not None and copy.data_ptr() <= ptr < copy.data_ptr() + copy.numel())
            layer.self_attn.q_proj.base_layer.register_forward_pre_hook(check)
    losses = []
    for batch in batches():  # two forward/backward passes: the schedule turns around twice
        loss = token_loss_sum(model, batch)
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, handle, losses, grads


def test_offload_keeps_loss_and_gradients_and_streams_two_layers_at_most():
    _, _, plain_losses, plain_grads = run(offload=False)
    model, handle, losses, grads = run(offload=True)
    for a, b in zip(plain_losses, losses):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    assert grads.keys() == plain_grads.keys() and len(grads) == 4 * 7 * 2
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        assert grads[name].dtype == torch.float64
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-9, atol=1e-9 * float(plain_grads[name].abs().max()))
    assert handle.max_resident == 2
    # each layer runs on its streamed copy: 4 layers × (forward + recompute) × 2 micro-batches
    assert model.ran_on_copy == [True] * 16
    assert handle.embedding  # untied and frozen: looked up on the host
    # Between steps, layers that are not resident point at their host buffer, not a device copy.
    base = model.get_base_model().model
    for i, layer in enumerate(handle.layers):
        weight = base.layers[i].self_attn.q_proj.base_layer.weight
        inside = layer.home.data_ptr() <= weight.data_ptr() < layer.home.data_ptr() + layer.home.numel()
        assert inside == (i not in handle.resident), i
    assert len(handle.resident) <= 2


def test_offload_refuses_what_it_cannot_stream(tmp_path):
    from tunebench.config import load_config
    from tunebench.runs import RunDir
    from tunebench.train.sft import train

    for extra in (["train.method=full"], ["train.method=lora", "train.gradient_checkpointing=false"]):
        with pytest.raises(ConfigError, match="'train.offload_frozen': it works with"):  # at load time
            load_config(None, ["train.offload_frozen=true", *extra])
        config = load_config(None, extra)
        config.train.offload_frozen = True  # a config built in code is checked by train itself
        with pytest.raises(ConfigError, match="'train.offload_frozen': it works with"):
            train(config, RunDir(tmp_path / "run"))
    assert not (tmp_path / "run" / "data").exists()  # refused before any work


def test_compiled_layers_stream_their_weights_outside_the_graph_with_no_recompile_per_layer(monkeypatch):
    """train.compile with offload: the weights are swapped at each layer's entry, outside the compiled graph.
    The host buffers are filled with NaN bytes except while a layer is being copied to its device copy, so a
    graph that kept reading a host buffer (or a stale copy's storage) would give a NaN loss; the loss and
    gradients equal the plain path's to fp64 rounding, and the number of graphs does not grow with the
    number of layers (a recompile per swapped weight would give one per layer and call)."""
    from torch._dynamo.utils import counters

    from tunebench.train.compile import compile_layers
    from tunebench.train.offload import FrozenWeightOffload

    _, _, plain_losses, plain_grads = run(offload=False)
    real_load = FrozenWeightOffload.load

    copies = []  # weak references to every device copy made: the released ones must be freed

    def load_then_poison(self, i):
        layer = self.layers[i]
        if layer.resident is None:
            layer.home.copy_(self.pristine[i])
            real_load(self, i)
            layer.home.fill_(0xFF)  # every float64 in the buffer is NaN now
            copies.append(weakref.ref(layer.resident))
        else:
            real_load(self, i)

    monkeypatch.setattr(FrozenWeightOffload, "load", load_then_poison)
    real_init = FrozenWeightOffload.__init__

    def init_then_poison(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.pristine = [layer.home.clone() for layer in self.layers]
        for layer in self.layers:
            layer.home.fill_(0xFF)

    monkeypatch.setattr(FrozenWeightOffload, "__init__", init_then_poison)
    torch._dynamo.reset()
    counters.clear()
    try:
        model = make_trainable(untied_llama(), TrainConfig(method="lora", lora_dropout=0.0, offload_frozen=True))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
        model.train()
        assert compile_layers(model, backend="aot_eager") == 4
        handle = enable_offload(model, torch.device("cpu"))
        assert not handle.handles  # no hooks inside the layers: the compiled layers' entries stream
        losses, alive = [], []
        for batch in batches():
            loss = token_loss_sum(model, batch)
            # between forward and backward only the last layer's copy is held: nothing saved for the
            # backward keeps the copies of released layers alive (with 4 layers a leak shows as 4)
            alive.append(sum(ref() is not None for ref in copies))
            loss.backward()
            losses.append(loss.detach())
        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
    finally:
        torch._dynamo.reset()
    assert graphs >= 1 and breaks == 0  # compiled, in one piece
    assert graphs <= 2, graphs  # a no-grad forward and a recompute with grad; 4 layers × 2 passes would be 8+
    for a, b in zip(plain_losses, losses):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-9,
                                   atol=1e-9 * float(plain_grads[name].abs().max()))
    assert handle.max_resident == 2
    assert alive == [1, 1], alive  # the last layer's copy only (its neighbour is fetched at the turn)


def test_offload_auto_is_on_for_big_frozen_weights_or_compiled_layers(monkeypatch):
    """null: on for 1 GiB of frozen decoder weights or more, or for any size when the layers are compiled
    (faster and smaller on Gemma 3 270M: docs/PERFORMANCE.md), never without the host memory for them."""
    from tunebench.train import offload

    model = make_trainable(untied_llama(), TrainConfig(method="lora"))  # a few hundred KiB of frozen weights
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(offload, "host_free_bytes", lambda: 2**40)
    assert offload.use_offload(None, model, "lora", True, cuda, 1) is False  # small, eager
    assert offload.use_offload(None, model, "lora", True, cuda, 1, compiled=True) is True
    assert offload.use_offload(None, model, "lora", True, cpu, 1, compiled=True) is False  # a GPU's lever
    assert offload.use_offload(None, model, "lora", True, cuda, 2, compiled=True) is False  # one process only
    assert offload.use_offload(False, model, "lora", True, cuda, 1, compiled=True) is False
    monkeypatch.setattr(offload, "host_free_bytes", lambda: 1000)
    assert offload.use_offload(None, model, "lora", True, cuda, 1, compiled=True) is False  # no room on the host
