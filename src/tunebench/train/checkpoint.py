"""Checkpoints that resume exactly and are never half-written.

A checkpoint is written into a hidden temporary folder and renamed to `checkpoint-<step>` only
when complete, so a run killed during a save leaves at most a `.tmp-*` folder that resume ignores
(and deletes). It holds the trainable weights, optimizer, scheduler, every RNG state and the
step, which with the seeded data order is all an identical continuation needs.

Everything is stored as tensors and plain containers and read back with
`torch.load(weights_only=True)`: a checkpoint in a shared or downloaded run folder is data, and
unpickling arbitrary objects from it would run whatever code it names.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunebench.errors import ConfigError
from tunebench.train.sharding import shard_like, whole, whole_state_dict

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The tensors training changes (adapters, or every weight for full fine-tuning), whole on the CPU
    (gathered from every process when sharded: then every process must call this)."""
    return whole_state_dict(model, {n for n, p in model.named_parameters() if p.requires_grad})


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with sharded state gathered whole, on the CPU: what one process would save
    (a collective when sharded, like trainable_state)."""
    saved = optimizer.state_dict()
    state = {index: {key: whole(value).cpu() if isinstance(value, torch.Tensor) else value
                     for key, value in entry.items()} for index, entry in sorted(saved["state"].items())}
    return {**saved, "state": state}


def shard_optimizer_state(saved: dict, optimizer) -> dict:
    """A whole optimizer state cut to this process's shards of the optimizer's parameters (unchanged
    when they are not sharded)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {index: {key: shard_like(value, params[index]) if isinstance(value, torch.Tensor) else value
                     for key, value in entry.items()} for index, entry in saved["state"].items()}
    return {**saved, "state": state}


def rng_state() -> dict:
    """Every RNG state as tensors, lists and numbers (what weights_only loading accepts)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, weights: dict[str, torch.Tensor], optimizer: dict, scheduler,
                    state: dict, keep: int) -> Path:
    """Write checkpoint-<step> atomically, then delete the oldest beyond `keep`. weights and optimizer:
    the whole trainable tensors and optimizer state (trainable_state, optimizer_state)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer, "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / "optimizer.pt")
    write_state(tmp / STATE_FILE, {**state, "step": step})
    final = folder / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def write_state(path: Path, state: dict) -> None:
    path.write_text(json.dumps(state, indent=2), encoding="utf-8")


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name))
             and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint; leftovers of an interrupted save are removed."""
    for leftover in folder.glob(".tmp-checkpoint-*") if folder.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return the saved trainer state. The checkpoint holds
    whole tensors, each cut to this process's shard when the model is sharded: it resumes on any number
    of processes."""
    weights = load_file(str(path / "trainable.safetensors"))
    current = model.state_dict()
    missing = set(weights) - set(current)
    if missing:
        raise ValueError(f"{path}: checkpoint does not match this model (e.g. {sorted(missing)[0]})")
    model.load_state_dict({k: shard_like(v, current[k]) for k, v in weights.items()}, strict=False)
    extra = load_training_state(path / "optimizer.pt")
    optimizer.load_state_dict(shard_optimizer_state(extra["optimizer"], optimizer))
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def load_training_state(path: Path) -> dict:
    """optimizer.pt as tensors and plain containers; anything else is refused, never unpickled."""
    try:
        # mmap: each process of a sharded resume reads the whole file but keeps only its shards in memory
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{path}: holds objects other than tensors and plain data, so it is not loaded "
                          "(written by an older tunebench, or crafted); delete "
                          f"{path.parent.parent} to train from the start, or use another --run-dir") from exc
