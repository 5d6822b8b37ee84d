"""Checkpoints that resume exactly and are never half-written.

A checkpoint is written into a hidden temporary folder and renamed to `checkpoint-<step>` only
when complete, so a run killed during a save leaves at most a `.tmp-*` folder that resume ignores
(and deletes). It holds the trainable weights, optimizer, scheduler, every RNG state and the
step, which with the seeded data order is all an identical continuation needs.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The tensors training changes (adapters, or every weight for full fine-tuning)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in names}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write checkpoint-<step> atomically, then delete the oldest beyond `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
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
    """Restore weights, optimizer, scheduler and RNG; return the saved trainer state."""
    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(weights) - set(model.state_dict())
    if missing:
        raise ValueError(f"{path}: checkpoint does not match this model (e.g. {sorted(missing)[0]})")
    model.load_state_dict(weights, strict=False)
    extra = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
