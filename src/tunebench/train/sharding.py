"""FSDP2 sharding (`train.sharding: fsdp`): weights, gradients and optimizer state split across processes.

`torch.distributed.fsdp.fully_shard` is applied to every decoder layer, then to the root (the peft
model or the causal LM): a layer's weights are gathered just before it runs and freed after, so a
process holds 1/N of the model plus one layer at a time. It is called directly rather than through
accelerate's FSDP plugin: the same calls run on CUDA/NCCL and on CPU/gloo (the tests), the optimizer
is built afterwards over the sharded parameters like any other, and nothing else of the loop changes.

Parameters stay in the dtype they were loaded in (no MixedPrecisionPolicy): full fine-tuning keeps
fp32 weights, gradients and AdamW state, and the loop's bf16 autocast does the compute, exactly as
on one GPU. Frozen and trainable parameters may share a layer (LoRA): FSDP2 only needs the trainable
ones of a layer to share a dtype.

Checkpoints and the saved adapter/model hold whole tensors (gathered here, written by rank 0), so
they are the files a single process writes, and a checkpoint resumes on any number of processes,
sharded or not: `shard_like` cuts each whole tensor back into this process's shard.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tunebench.train.wrapped import causal_lm

log = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules of the classes transformers lists as never to be
    split across devices (`_no_split_modules`: LlamaDecoderLayer, Gemma3DecoderLayer, ...)."""
    causal = causal_lm(model)
    names = set(getattr(causal, "_no_split_modules", None) or [])
    layers = [module for module in causal.modules() if type(module).__name__ in names]
    if not layers:
        from tunebench.errors import ConfigError

        raise ConfigError(f"train.sharding fsdp: {type(causal).__name__} names no decoder layer class "
                          "(_no_split_modules); use train.sharding: none")
    return layers


def shard_model(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """fully_shard each decoder layer, then the root, over all `world` processes (in place), and check
    that the sharded model computes what the whole one did."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    keep_4bit_quant_state(model)
    before = probe_logits(model, device)
    mesh = init_device_mesh(device.type, (world,))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    check_same_logits(before, probe_logits(model, device))
    reshard(model)
    log.info("fsdp: %d decoder layers and the root sharded over %d processes", len(layers), world)
    return model


def keep_4bit_quant_state(model: nn.Module) -> None:
    """FSDP2 gathers a 4-bit weight back as a plain parameter, without the quantisation state bitsandbytes
    keeps on it; bitsandbytes' Linear4bit then restores the state from its module
    (fix_4bit_weight_quant_state_from_module), so make sure every such module holds it."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(module, "quant_state", None) is None:
            module.quant_state = state


PROBE_TOKENS = 16


@torch.no_grad()
def probe_logits(model: nn.Module, device: torch.device) -> torch.Tensor:
    """Logits of a fixed short input (eval mode: no dropout), the same on every process."""
    causal = causal_lm(model)
    ids = torch.arange(1, PROBE_TOKENS + 1, device=device).unsqueeze(0) % causal.config.vocab_size
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids, use_cache=False).logits.float().cpu()
    model.train(was_training)
    return logits


def check_same_logits(whole_model: torch.Tensor, sharded_model: torch.Tensor, tolerance: float = 1e-2) -> None:
    """Refuse a sharded model that computes other logits than the same weights unsharded. Rounding
    differs by far less than 1e-2 (relative); a weight changed on the way through the shards does not:
    bitsandbytes reports 4-bit weights packed into bf16 whose bit patterns read as NaN being rewritten by
    FSDP2 (bitsandbytes issue 1945)."""
    from tunebench.errors import ConfigError

    difference = float((whole_model - sharded_model).norm() / whole_model.norm().clamp_min(1e-12))
    if not difference < tolerance:  # NaN too
        raise ConfigError(f"train.sharding fsdp: the sharded model's logits differ from the unsharded model's "
                          f"(relative difference {difference:.2e}); the weights did not survive sharding "
                          "(for qlora, a known FSDP2 and bitsandbytes problem): use train.sharding: none")


def reshard(model: nn.Module) -> None:
    """Put every FSDP unit of `model` back in its sharded state. A forward pass without a backward (the
    probe, eval loss, DPO's reference pass) leaves the root unit's weights gathered, and while gathered
    `model.parameters()` yields the gathered copies: an optimizer built then trains copies that the next
    gather overwrites (found by the full fine-tuning and DPO checks). A no-op when sharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process must call it, in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of `full`, placed as the sharded `like` is (`full` itself when `like` is a
    plain tensor or has another shape, e.g. Adam's step count). Every process holds `full`: no
    communication."""
    if not is_sharded(like) or full.shape != like.shape:
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def whole_state_dict(model: nn.Module, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """model.state_dict() (only `keys` when given) with every shard gathered, on the CPU. Under FSDP a
    collective: every process calls it; each gets the same tensors. Tied weights (one tensor under two
    names, e.g. Gemma's embedding and output layer) stay one tensor, so save_pretrained drops the copy as
    it does for the model itself."""
    reshard(model)  # after an eval pass the root's parameters are gathered copies; read the shards
    gathered: dict[int, torch.Tensor] = {}
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():  # the parameters: a tied one is one object
        if keys is None or key in keys:
            if id(value) not in gathered:
                gathered[id(value)] = whole(value.detach()).contiguous().cpu()
            out[key] = gathered[id(value)]
    return out
