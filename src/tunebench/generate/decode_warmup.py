"""The decode loop's Triton kernels brought into the process while the model loads (load_for_inference).

The first generation of a process pays for each Triton kernel's first use: importing Triton, building
its launcher, loading the compiled kernel from Triton's disk cache (or compiling it, the first time on a
machine). On Gemma 3 270M that was most of the ~1 s a process's first generation took over its second
(docs/PERFORMANCE.md). What the kernels are specialised on (dtype, head counts, head and hidden sizes,
alignments) follows from the model's config.json, so `start` runs each kernel once on small tensors of
those shapes in a background thread while the weights are read; `wait` (GraphDecode, before its first
step) joins it, so no warm-up kernel runs while a step is captured as a CUDA graph. Only for a local
Gemma 3 of the size the loop fuses (decode_fused_layers.py), on a CUDA GPU with Triton; a failure is
logged and changes nothing (the kernels then load at their first use, as without this).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import torch

from tunebench.errors import failure_reason

log = logging.getLogger(__name__)
GEMMA3 = ("gemma3", "gemma3_text")
STARTED: list[threading.Thread] = []


def text_config(folder: str) -> dict | None:
    """The text model's config.json fields of a local model folder (None elsewhere, e.g. a hub id)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    return config.get("text_config", config) | {"model_type": config.get("model_type")}


def fused_size(config: dict) -> bool:
    """A Gemma 3 whose parameters (embedding + layers, from the config) are under the fused layers' limit."""
    from tunebench.generate.decode_fused_layers import FUSE_BELOW_PARAMETERS

    try:
        hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
        heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
        inner = config["intermediate_size"]
    except KeyError:
        return False
    per_layer = hidden * dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inner
    return config["model_type"] in GEMMA3 and vocab * hidden + layers * per_layer < FUSE_BELOW_PARAMETERS


def warm(config: dict, dtype: torch.dtype, device: torch.device) -> None:
    """Each kernel the fused Gemma layers run, once, on tensors of the model's shapes."""
    from tunebench.generate import decode_attention_kernels as attention
    from tunebench.generate import decode_kernels

    if attention.triton_kernels() is None or decode_kernels.triton_kernel() is None:
        return
    heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    hidden, eps = config["hidden_size"], config.get("rms_norm_eps", 1e-6)
    on = dict(dtype=dtype, device=device)
    with torch.no_grad(), torch.cuda.device(device):
        qkv = torch.zeros(1, 1, (heads + 2 * kv_heads) * dim, **on)
        scale = torch.ones(heads + kv_heads, dim, device=device)
        cos, sin = torch.ones(1, 1, dim, **on), torch.zeros(1, 1, dim, **on)
        keys, values = (torch.zeros(1, kv_heads, attention.CHUNK, dim, **on) for _ in range(2))
        fed = torch.zeros(1, dtype=torch.long, device=device)
        query = attention.rotate_and_write_triton(qkv, scale, eps, cos, sin, keys, values, fed, heads, kv_heads)
        mask = torch.zeros(1, attention.CHUNK, device=device)
        attention.attend_new_token_triton(query, keys, values, mask, 1.0, fed, None)
        x, norm = torch.zeros(1, 1, hidden, **on), torch.ones(hidden, device=device)
        for args in ((x, norm, eps), (x, norm, eps, x), (x, norm, eps, x, norm)):
            decode_kernels.triton_norm_add_norm(*args)
        torch.cuda.synchronize(device)


def start(folder: str, dtype: torch.dtype, device: torch.device) -> threading.Thread | None:
    """Starts `warm` in a background thread where the loop will run this model's layers through its Triton
    kernels (see the module's docstring); returns the thread, or None."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    config = text_config(folder)
    if config is None or not fused_size(config):
        return None

    def run():
        try:
            warm(config, dtype, device)
        except Exception as exc:  # noqa: BLE001 - a warm-up only: the kernels load at first use instead
            log.warning("warming the decode loop's Triton kernels failed (%s); they load at first use", failure_reason(exc))

    thread = threading.Thread(target=run, name="tunebench-decode-warmup", daemon=True)
    thread.start()
    STARTED.append(thread)
    return thread


def wait() -> None:
    """Joins every warm-up started (GraphDecode before its first step: nothing else runs on the GPU from them)."""
    while STARTED:
        STARTED.pop().join()
