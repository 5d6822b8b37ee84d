"""Where a decode step's time goes (issue 15): GPU time of one captured decode step (CUDA events around
replays) against the wall time of the host loop, at 1 and 100 rows, for the decoder layers as written,
with their RMSNorms fused (decode_norms.py, the uncompiled loop's default), with the new token's attention
as one SDPA call on top (decode_attention.GROUPED_SDPA, prepared) and compiled, and the kernels of one step
(torch.profiler), on a tunebench run (e.g. train_speed.py's Gemma LoRA run).

    python bench/decode_profile.py --run /tmp/bench-speed/gemma-lora+compile=false-512
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunebench.generate import decode_attention as decode_attention_module  # noqa: E402
from tunebench.generate.decode_attention import decode_attention  # noqa: E402
from tunebench.generate.decode_compile import compiled_decode_layers  # noqa: E402
from tunebench.generate.decode_norms import fused_norms  # noqa: E402
from tunebench.generate.graph_decode import DecodeSettings, GraphDecode  # noqa: E402
from tunebench.generate.merge_adapter import merge_for_generation  # noqa: E402
from tunebench.models.trained import load_for_inference  # noqa: E402


def replay_times(decode: GraphDecode, replays: int) -> tuple[float, float]:
    """(GPU ms per replay by CUDA events, host wall ms per replay) of the captured step."""
    step = decode.capture()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    wall = time.perf_counter()
    start.record()
    for _ in range(replays):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays, (time.perf_counter() - wall) * 1000 / replays


@contextlib.contextmanager
def one_call_attention(model):
    """Fused norms and the new token's attention as one SDPA call (decode_attention.GROUPED_SDPA, prepared)."""
    decode_attention_module.GROUPED_SDPA = True
    try:
        with fused_norms(model):
            yield
    finally:
        decode_attention_module.GROUPED_SDPA = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--replays", type=int, default=100)
    args = parser.parse_args()
    loaded = load_for_inference(args.run)
    model = merge_for_generation(loaded.model, "auto")
    prompt = loaded.tokenizer.encode("日本の首都はどこですか。理由も説明してください。")
    settings = DecodeSettings(400, eos_ids=(-1,), pad_id=loaded.tokenizer.pad_token_id, repetition_penalty=1.2)
    rows_out = []
    layers = {"as written": lambda: contextlib.nullcontext(), "fused norms": lambda: fused_norms(model),
              "+1-call attn": lambda: one_call_attention(model), "compiled": lambda: compiled_decode_layers(model)}
    for mode, context in layers.items():
        for rows in (1, 100):
            decode = GraphDecode(model, [prompt] * rows, settings, compile=mode == "compiled")
            with torch.no_grad(), decode_attention(model), context():
                decode.prefill()
                gpu_ms, wall_ms = replay_times(decode, args.replays)
                if rows == 1:
                    from torch.profiler import ProfilerActivity, profile
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        decode.forward_newest()
                        torch.cuda.synchronize()
                    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                    top = Counter()
                    for e in kernels:
                        top[e.name[:60]] += e.device_time_total
                    print(f"{mode}: one step launched eagerly: {len(kernels)} kernels, "
                          f"{sum(top.values()) / 1000:.2f} ms GPU")
                    for name, us in top.most_common(12):
                        print(f"    {us / 1000:7.3f} ms  {name}")
            rows_out.append((mode, rows, gpu_ms, wall_ms))
            del decode
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'layers':<13}{'rows':>6}{'GPU ms/step':>13}{'wall ms/step':>14}")
    for mode, rows, gpu_ms, wall_ms in rows_out:
        print(f"{mode:<13}{rows:>6}{gpu_ms:>13.3f}{wall_ms:>14.3f}")


if __name__ == "__main__":
    main()
