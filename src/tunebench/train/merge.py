"""`tunebench merge`: fold a LoRA adapter into its base model and save plain safetensors.

The base is always loaded unquantised (bf16 on a GPU, fp32 on CPU), never 4-bit: merging into a
4-bit base rounds the sum back onto the NF4 grid and loses much of what the adapter learned.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tunebench.errors import ModelError
from tunebench.models.load import pick_device
from tunebench.models.trained import find_trained, load_for_inference
from tunebench.runs import MERGED, TRAINED_META, write_json_atomic
from tunebench.train.methods import get_method


def merge(run_path: Path, out: Path | None = None, dtype: torch.dtype | None = None) -> Path:
    trained = find_trained(run_path)
    if trained is None or not (trained / "adapter_config.json").exists():
        raise ModelError(f"{run_path}: no trained adapter found (train first; full fine-tuning needs no merge)")
    meta = json.loads((trained / TRAINED_META).read_text(encoding="utf-8"))
    if not get_method(meta["method"]).lora:
        raise ModelError(f"{meta['method']} adapters cannot be merged into the weights; only LoRA can")
    if dtype is None:
        dtype = torch.bfloat16 if pick_device().type == "cuda" else torch.float32
    loaded = load_for_inference(str(trained), dtype=dtype)
    merged = loaded.model.merge_and_unload()
    out = out or trained.parent / MERGED
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / TRAINED_META, {**meta, "merged_from": str(trained), "method": "merged"})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
