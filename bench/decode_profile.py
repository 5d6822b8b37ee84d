"""Where a decode step's time goes (issue 15): GPU time of one captured decode step (CUDA events around
replays) against the wall time of the host loop, at 1 and 100 rows, for the decoder layers as written,
with their RMSNorms fused (decode_norms.py), with the loop's own masks, cache writes and rotary table on top
(decode_masks.py, decode_rotary.py), with Gemma's one-token attention and MLP fused on top of that
(decode_fused_layers.py), the layer's norms and adds in a Triton kernel (decode_kernels.py), its attention
after the projection in Triton kernels (decode_attention_kernels.py: the uncompiled loop's default) and compiled, and the kernels of one step
(torch.profiler), on a tunebench run (e.g. train_speed.py's Gemma LoRA run).

    python bench/decode_profile.py --run /tmp/bench-speed/gemma-lora+compile=false-512
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # generate_speed's variants

from generate_speed import Variant, set_levers  # noqa: E402

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


def kernel_check() -> None:
    """decode_kernels' Triton kernel against its torch reference on random bf16 rows (Gemma 3 270M's width)."""
    from tunebench.generate.decode_kernels import reference, triton_norm_add_norm

    torch.manual_seed(0)
    x, residual = torch.randn(100, 1, 640, device="cuda", dtype=torch.bfloat16) * 3, \
        torch.randn(100, 1, 640, device="cuda", dtype=torch.bfloat16) * 10
    s1, s2 = 1 + torch.randn(640, device="cuda") * 0.5, 1 + torch.randn(640, device="cuda") * 0.5
    for label, args in (("norm", (x, s1, 1e-6)), ("norm+add", (x, s1, 1e-6, residual)),
                        ("norm+add+norm", (x, s1, 1e-6, residual, s2))):
        got, expected = triton_norm_add_norm(*args), reference(*args)
        for name, a, b in zip(("summed", "normed"), got, expected):
            if a is None:
                continue
            differ = (a != b).float().mean().item()
            ulps = ((a.float() - b.float()).abs() / b.float().abs().clamp(min=1e-30)).max().item() * 2 ** 8
            print(f"kernel check {label:<14} {name}: {differ:.2%} of elements differ, largest by {ulps:.2f} bf16 ulp")
            if ulps > 1:
                raise SystemExit(f"decode_kernels' Triton kernel is off its reference by {ulps:.2f} bf16 ulp")


def attention_kernel_check() -> None:
    """decode_attention_kernels' Triton kernels against their torch references, bf16, Gemma 3 270M's heads (4 query
    heads on 1 key/value head of 256), 100 rows with prompts of different lengths, a cache of 700 slots, the fed
    token at slot 600, with and without a sliding window of 512."""
    from tunebench.generate import decode_attention_kernels as k

    torch.manual_seed(0)
    rows, heads, kv_heads, dim, slots, fed = 100, 4, 1, 256, 700, 600
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(rows, 1, (heads + 2 * kv_heads) * dim, **cuda) * 3
    scale = 1 + torch.randn(heads + kv_heads, dim, device="cuda") * 0.3
    angles = torch.rand(rows, 1, dim, device="cuda") * 6.3
    sign = torch.ones(dim, device="cuda")
    sign[: dim // 2] = -1
    at = torch.tensor([fed], device="cuda")
    caches = [torch.randn(rows, kv_heads, slots, dim, **cuda) for _ in range(2)]
    one, zero = torch.ones(rows, 1, dim, **cuda), torch.zeros(rows, 1, dim, **cuda)
    # each against the float32 result of the same bf16 inputs, beside the bf16 torch reference's own error;
    # "norm" (cos 1, sin 0) isolates the normalisation, "rotate" is the whole
    for label, cos, sin in (("norm", one, zero), ("rotate", angles.cos().to(torch.bfloat16),
                                                   (angles.sin() * sign).to(torch.bfloat16))):
        results = {}
        for name, fn, dtype in (("exact", k.rotate_and_write_reference, torch.float32),
                                ("reference", k.rotate_and_write_reference, torch.bfloat16),
                                ("kernel", k.rotate_and_write_triton, torch.bfloat16)):
            written = [c.clone().to(dtype) for c in caches]  # each its own cache (.to of the same dtype is a no-op)
            query = fn(qkv.to(dtype), scale, 1e-6, cos.to(dtype), sin.to(dtype), *written, at, heads, kv_heads)
            results[name] = (query, written[0][:, :, fed], written[1][:, :, fed])
        for i, part in enumerate(("query", "keys", "values")):
            exact, reference, kernel = (results[n][i] for n in ("exact", "reference", "kernel"))
            ours, theirs = ((t.float() - exact).abs().max().item() for t in (kernel, reference))
            print(f"kernel check {label} {part:<7}: largest error against float32 {ours:.5f} (torch's bf16 path "
                  f"{theirs:.5f}); {(kernel != reference).float().mean().item():.2%} of elements differ from it")
            if ours > 2 * theirs + 1e-6:
                raise SystemExit(f"decode_attention_kernels' {label} {part} is off by {ours:.5f}")
    got = results["kernel"][0]
    # the attention: the kernels' error against the float32 result, beside the bf16 reference's own error
    slot = torch.arange(slots, device="cuda")
    starts = torch.randint(0, 500, (rows,), device="cuda")
    for window in (None, 512):
        attend = (slot[None] >= starts[:, None]) & (slot[None] <= fed)
        if window:
            attend &= slot[None] > fed - window
        mask = torch.where(attend, 0.0, float("-inf"))
        exact = k.attend_new_token_reference(got.float(), *(c.float() for c in caches), mask, 256 ** -0.5)
        reference = k.attend_new_token_reference(got, *caches, mask, 256 ** -0.5)
        kernels = k.attend_new_token_triton(got, *caches, mask, 256 ** -0.5, at, window)
        ours, theirs = ((t.float() - exact).abs().max().item() for t in (kernels, reference))
        print(f"kernel check attend window={window}: largest error against float32 {ours:.5f} (torch's bf16 path "
              f"{theirs:.5f}); {(kernels != reference).float().mean().item():.2%} of elements differ from it")
        if ours > 2 * theirs + 1e-6:
            raise SystemExit(f"decode_attention_kernels' attention (window {window}) is off by {ours:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--replays", type=int, default=100)
    args = parser.parse_args()
    kernel_check()
    attention_kernel_check()
    loaded = load_for_inference(args.run)
    model = merge_for_generation(loaded.model, "auto")
    prompt = loaded.tokenizer.encode("日本の首都はどこですか。理由も説明してください。")
    settings = DecodeSettings(400, eos_ids=(-1,), pad_id=loaded.tokenizer.pad_token_id, repetition_penalty=1.2)
    rows_out = []
    loop = dict(merge_adapter=True, cuda_graphs=True, stop_check_every=16)
    modes = {"as written": Variant(**loop, fused_norms=False, step_inputs=False),
             "fused norms": Variant(**loop, step_inputs=False),  # the loop before its own step inputs
             "+step inputs": Variant(**loop, fused_layers=False),  # own masks, cache writes, rotary table
             # Gemma's one-token attention and MLP fused, in torch operations
             "+fused attn/MLP": Variant(**loop, layer_kernel=False, attention_kernels=False),
             "+layer kernel": Variant(**loop, attention_kernels=False),  # the layer's norms and adds in one Triton
             # kernel each
             "+attn kernels": Variant(**loop),  # the attention after its projection in Triton kernels: the default
             "compiled": Variant(**loop, compile=True)}
    for mode, variant in modes.items():
        set_levers(variant)
        for rows in (1, 100):
            decode = GraphDecode(model, [prompt] * rows, settings, compile=variant.compile)
            with torch.no_grad(), decode.running():
                decode.start()
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
