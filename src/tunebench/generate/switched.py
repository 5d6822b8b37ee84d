"""Module forwards switched for the decode loop and switched back (decode_norms, decode_rotary,
decode_fused_layers): the model is the user's, and outside the loop it runs as it was loaded."""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Callable, Iterable


def stock(module) -> bool:
    """A class of transformers' own modeling files (remote code may name its own class alike and compute
    otherwise): the only kind the loop switches."""
    return type(module).__module__.startswith("transformers.models.")


@contextmanager
def switched_forwards(choices: Iterable[tuple[object, Callable, dict]]):
    """Each (module, forward, attributes) of `choices`: the attributes set on the module and its forward
    replaced by `forward` bound to it. Yields how many were switched; restores every switched module on
    leaving the block, also when the block, or building a later choice, raises."""
    switched = []
    try:
        for module, forward, attributes in choices:
            for name, value in attributes.items():
                setattr(module, name, value)
            module.forward = types.MethodType(forward, module)
            switched.append((module, attributes))
        yield len(switched)
    finally:
        for module, attributes in switched:
            del module.forward
            for name in attributes:
                vars(module).pop(name, None)
