"""Frozen-weight offload (`train.offload_frozen`): the base model's frozen weights live in host memory.

Each decoder layer's frozen tensors (LoRA's base weights; for QLoRA the packed 4-bit data and its
quantisation state) are copied once into one pinned host buffer per layer. A forward pre-hook on
every module that owns one of them (so it fires inside a checkpointed recompute too, whichever
way the model wraps its layers) makes sure that layer's buffer is on the GPU, fetches the next
layer's on a side stream and lets go of the others: at most two layers' frozen weights are on the
GPU at once. Compiled layers (train.compile) get the same call at the layer's entry and before
the layer's backward instead, outside the compiled graph (compile.CompiledLayer.before): the graph
reads the weights as inputs, so pointing a parameter at the other copy needs no recompile. The
direction is read from the order of calls: forward runs layers 0, 1, 2, …; the backward pass of
re-entrant gradient checkpointing recomputes them last to first, each right before its backward.

Re-entrant checkpointing is required: its first forward keeps no autograd state, so nothing holds
a layer's GPU copy after the layer has run (the non-re-entrant form keeps the graph, and
bitsandbytes reads the weight again at backward time). The input embedding, when frozen and not
tied to the output layer, is looked up on the host and only its output moved to the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tunebench.config_checks import offload_refusal
from tunebench.errors import ConfigError
from tunebench.train.compile import compiled_layer
from tunebench.train.wrapped import causal_lm

ALIGN = 256  # bytes; every tensor's view starts aligned within its layer's buffer


@dataclass
class Slot:
    """One frozen tensor of a layer: where it sits in the layer's buffer and how to point the model at it."""

    offset: int
    dtype: torch.dtype
    shape: torch.Size
    assign: Callable[[torch.Tensor], None]

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass
class Layer:
    slots: list[Slot]
    home: torch.Tensor  # uint8, host (pinned when a GPU is the target)
    resident: torch.Tensor | None = None  # uint8 copy on the device while the layer is loaded
    ready: torch.cuda.Event | None = field(default=None, repr=False)


def frozen_tensors(layer: nn.Module) -> list[tuple[nn.Module, torch.Tensor, Callable[[torch.Tensor], None]]]:
    """(owner, tensor, setter) for every frozen parameter of the layer and, for 4-bit weights, its quant state."""
    found = []
    for module in layer.modules():
        for param in module._parameters.values():
            if param is None or param.requires_grad:
                continue
            found.append((module, param.data, lambda t, p=param: setattr(p, "data", t)))
            state = getattr(param, "quant_state", None)
            for qs in (state, getattr(state, "state2", None)):
                for name in ("absmax", "code", "offset"):
                    value = getattr(qs, name, None)
                    if isinstance(value, torch.Tensor):
                        found.append((module, value, lambda t, q=qs, n=name: setattr(q, n, t)))
    return found


def pack_layer(tensors: list, pin: bool) -> Layer:
    """Copy a layer's frozen tensors into one host buffer and point the layer at views of it."""
    slots, size = [], 0
    for _, tensor, assign in tensors:
        slots.append(Slot(size, tensor.dtype, tensor.shape, assign))
        size += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    home = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    for slot, (_, tensor, _) in zip(slots, tensors):
        slot.view(home).copy_(tensor)
        slot.assign(slot.view(home))
    return Layer(slots, home)


class FrozenWeightOffload:
    """Streams decoder layers' frozen weights from host memory to `device`, one layer ahead of use."""

    def __init__(self, layers: nn.ModuleList, device: torch.device):
        self.device = device
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        found = [frozen_tensors(layer) for layer in layers]
        self.layers = [pack_layer(tensors, pin=cuda) for tensors in found]
        self.last: int | None = None
        self.resident: set[int] = set()
        self.max_resident = 0  # most layers on the device at once (a check for tests and logs)
        self.handles = []
        for i, (layer, tensors) in enumerate(zip(layers, found)):
            if compiled := compiled_layer(layer):  # outside the graph, before the compiled layer runs
                compiled.before.append(lambda i=i: self.before(i))
                continue
            owners = {id(owner): owner for owner, _, _ in tensors}
            self.handles += [owner.register_forward_pre_hook(lambda _m, _a, i=i: self.before(i))
                             for owner in owners.values()]
        if cuda:
            torch.cuda.empty_cache()

    @property
    def host_bytes(self) -> int:
        return sum(layer.home.numel() for layer in self.layers)

    def before(self, i: int) -> None:
        """Layer i is about to run: keep it and the next one in this direction, let go of the rest."""
        n = len(self.layers)
        if i == self.last:  # another module of the same layer; at either end, fetch the way back
            ahead = {0: 1, n - 1: n - 2}.get(i, -1)
            if 0 <= ahead < n and n > 1:
                self.load(ahead)
            self.max_resident = max(self.max_resident, len(self.resident))
            return
        ahead = i - 1 if self.last is not None and i < self.last else i + 1
        for j in [j for j in self.resident if j not in (i, ahead)]:
            self.release(j)
        self.load(i)
        self.wait(i)
        if 0 <= ahead < n:
            self.load(ahead)
        self.last = i
        self.max_resident = max(self.max_resident, len(self.resident))

    def load(self, i: int) -> None:
        layer = self.layers[i]
        if layer.resident is not None:
            return
        self.resident.add(i)
        if self.stream is None:
            layer.resident = layer.home.to(self.device, copy=True)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                layer.resident = layer.home.to(self.device, non_blocking=True)
                layer.ready = torch.cuda.Event()
                layer.ready.record(self.stream)
            # The compute stream will use this memory: keep the allocator from reusing it early.
            layer.resident.record_stream(torch.cuda.current_stream(self.device))
        for slot in layer.slots:
            slot.assign(slot.view(layer.resident))

    def wait(self, i: int) -> None:
        layer = self.layers[i]
        if layer.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(layer.ready)
            layer.ready = None

    def release(self, i: int) -> None:
        layer = self.layers[i]
        for slot in layer.slots:
            slot.assign(slot.view(layer.home))
        layer.resident, layer.ready = None, None
        self.resident.discard(i)


def offload_embedding(causal, device: torch.device) -> bool:
    """Keep a frozen, untied input embedding on the host; return whether it was moved."""
    embed, head = causal.get_input_embeddings(), causal.get_output_embeddings()
    if head is not None and head.weight is embed.weight:
        return False  # tied to the output layer, which must stay on the device
    if any(p.requires_grad for p in embed.parameters()):
        return False
    embed.to("cpu")
    embed.register_forward_pre_hook(lambda _m, args: tuple(a.to("cpu") for a in args))
    embed.register_forward_hook(lambda _m, _a, out: out.to(device, non_blocking=True))
    return True


def host_free_bytes() -> int:
    """Memory the host can still give (MemAvailable), 0 where it cannot be read."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def use_offload(setting: bool | None, model, method: str, checkpointing: bool, device: torch.device | None,
                world: int, compiled: bool = False) -> bool:
    """Resolve train.offload_frozen: null decides (see config), true insists, false declines.
    With model None (before loading) only the method, checkpointing and process count are checked.
    Null is on for frozen decoder weights of 1 GiB or more, or any size when the layers are compiled
    (`compiled`: measured faster and smaller on Gemma 3 270M, docs/PERFORMANCE.md), as long as the
    host has twice them free."""
    if setting is False:
        return False
    if why := offload_refusal(method, checkpointing, world):
        if setting:
            raise ConfigError(f"train.offload_frozen: {why}")
        return False
    if setting:
        return True
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if device is None or device.type != "cuda" or not isinstance(layers, nn.ModuleList):
        return False
    frozen = sum(p.numel() * p.element_size() for p in layers.parameters())
    return (frozen >= 2**30 or compiled) and host_free_bytes() >= 2 * frozen


def enable_offload(model, device: torch.device) -> FrozenWeightOffload:
    """Offload a trainable (peft-wrapped) model's frozen decoder weights; see the module docstring."""
    causal = causal_lm(model)
    layers = getattr(causal.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not layers:
        raise ConfigError(f"train.offload_frozen: {type(causal).__name__} has no decoder `layers` list to stream")
    if not frozen_tensors(layers[0]):
        raise ConfigError("train.offload_frozen needs frozen base weights (train.method qlora or lora)")
    offload = FrozenWeightOffload(layers, device)
    offload.embedding = offload_embedding(causal, device)
    return offload
