"""Dynamo's guard checks skipped for training micro-batches of a shape already trained (`train.compile_skip_guards`).

Where the compiled layers are not replayed as CUDA graphs (the 13B shape's QLoRA step: checkpointing
and offload rule the graphs out), a step is bound by the host, not the GPU, and each layer call starts
with dynamo's guard checks: ~0.36 ms a call on the 13B shape's layer (~700 checks of module attributes
and tensor properties), 80 calls a step. A micro-batch whose padded shape the run has already trained
in this process calls the compiled layers under torch.compiler.set_stance(skip_guard_eval_unsafe=True),
which keeps only the checks that have told two compiled graphs apart. Safe where every training
micro-step calls the layers the same way but for the shape, which the first call of each shape checks
in full (compiling what it needs): objective sft; evaluation passes and anything outside the training
micro-steps keep every check.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch

from tunebench.errors import ConfigError


def guard_skip_supported() -> bool:
    """Whether this torch's set_stance can skip guard checks (torch ≥ 2.6)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance is not None and "skip_guard_eval_unsafe" in inspect.signature(stance).parameters


def use_skip_guards(setting: bool | str, device: torch.device | None, compiled: bool, graphs: bool, world: int,
                    objective: str) -> bool:
    """Resolve train.compile_skip_guards: auto is on for objective sft on one CUDA process with compiled
    layers that are not replayed as CUDA graphs (where it was measured: the 13B shape's QLoRA step; replayed
    layers, the preference objectives and several processes are not measured); true insists."""
    if setting is False:
        return False
    if setting is True and not compiled:
        raise ConfigError("train.compile_skip_guards: true applies to compiled layers, and train.compile is off "
                          "here; set it to auto or false")
    if not compiled:
        return False
    if not guard_skip_supported():
        if setting is True:
            raise ConfigError(f"train.compile_skip_guards: torch {torch.__version__} cannot skip dynamo's guard "
                              "checks (torch.compiler.set_stance's skip_guard_eval_unsafe, torch >= 2.6); set it "
                              "to auto or false")
        return False
    if setting is True:
        return True
    return device is not None and device.type == "cuda" and not graphs and world == 1 and objective == "sft"


class GuardSkip:
    """Which training micro-batches may call the compiled layers without dynamo's guard checks: those of a
    shape already trained in this process (its first call checked every guard and compiled what it needed)."""

    def __init__(self, on: bool):
        self.on = on
        self.seen: set[tuple[int, ...]] = set()

    @contextlib.contextmanager
    def around(self, batch: dict[str, torch.Tensor]) -> Iterator[None]:
        """The context of one micro-batch's forward and backward."""
        shape = tuple(batch["input_ids"].shape)
        skip = self.on and shape in self.seen
        if self.on:
            self.seen.add(shape)
        if not skip:
            yield
            return
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            yield
