"""The Triton kernels of Gemma's one-token attention (decode_attention_kernels.py) against their torch
references. Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, numpy on CPU), which
executes the same kernel source; fp32 there, where the interpreter's dot is exact to float32 rounding,
and fp16 (the interpreter has no bf16 constants). The whole decode loop of a tiny Gemma runs through them
too, against the loop with the torch references."""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (a CPU-only install): the kernels are not used there")

from tunebench.generate import decode_attention_kernels as kernels  # noqa: E402
from tunebench.generate.decode_attention_kernels import (  # noqa: E402
    attend_new_token_reference,
    attend_new_token_triton,
    rotate_and_write_reference,
    rotate_and_write_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def interpreted():
    """Without a GPU, the kernels under Triton's interpreter (conftest.py sets TRITON_INTERPRET before Triton is
    imported), defined afresh for these tests."""
    import os

    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter was not chosen before Triton was imported")
    kernels.triton_kernels.cache_clear()
    yield
    kernels.triton_kernels.cache_clear()


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -9, atol=2 ** -9)


def rotary(rows, dim, dtype):
    positions = torch.arange(rows, dtype=torch.float32)[:, None] * 7 + 3
    angles = positions * (10000 ** (-torch.arange(0, dim, 2).float() / dim))
    angles = torch.cat([angles, angles], -1)
    sign = torch.ones(dim)
    sign[: dim // 2] = -1
    return angles.cos()[:, None].to(dtype), (angles.sin() * sign)[:, None].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotate_and_write_equals_its_reference(dtype):
    torch.manual_seed(0)
    rows, heads, kv_heads, dim, slots = 3, 4, 2, 16, 10
    qkv = (torch.randn(rows, 1, (heads + 2 * kv_heads) * dim) * 3).to(dtype).to(DEVICE)
    scale = (1 + torch.randn(heads + kv_heads, dim) * 0.3).to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in rotary(rows, dim, dtype))
    fed = torch.tensor([5], device=DEVICE)
    caches = [torch.zeros(rows, kv_heads, slots, dim, dtype=dtype, device=DEVICE) for _ in range(4)]
    expected = rotate_and_write_reference(qkv, scale, 1e-6, cos, sin, *caches[:2], fed, heads, kv_heads)
    got = rotate_and_write_triton(qkv, scale, 1e-6, cos, sin, *caches[2:], fed, heads, kv_heads)
    torch.testing.assert_close(got, expected, **tolerance(dtype))
    torch.testing.assert_close(caches[2], caches[0], **tolerance(dtype))  # keys, normalised and rotated
    assert torch.equal(caches[3], caches[1])  # values copied as they are
    assert caches[2][:, :, 5].abs().sum() > 0 and caches[2][:, :, [4, 6]].abs().sum() == 0  # only the fed slot
    # the comparison sees the rotation: sin's other half negated changes the keys
    wrong = [torch.zeros_like(c) for c in caches[:2]]
    rotate_and_write_triton(qkv, scale, 1e-6, cos, -sin, *wrong, fed, heads, kv_heads)
    assert not torch.allclose(wrong[0], caches[0], **tolerance(dtype))


def attend_mask(rows, slots, fed, starts, window=None):
    """(rows, slots) additive: each row attends from its prompt's start to the fed slot (within the window)."""
    slot = torch.arange(slots)
    attend = (slot[None] >= torch.tensor(starts)[:, None]) & (slot[None] <= fed)
    if window:
        attend &= slot[None] > fed - window
    return torch.where(attend, 0.0, float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fed, window", [(100, None), (100, 30), (63, None), (64, None), (127, None), (128, None),
                                         (127, 63), (127, 64), (128, 65), (191, 128)])
def test_attend_new_token_equals_its_reference(dtype, fed, window):
    """Chunks of 64 slots in a cache of 200 (the last chunk partial), the fed token and a sliding window's first
    slot on and beside chunk edges. Slots the kernel may skip without reading (whole chunks after the fed token or
    before the window) are filled with NaN: a skipped chunk that was read anyway would spread it."""
    torch.manual_seed(0)
    rows, heads, kv_heads, dim, slots, chunk = 3, 4, 2, 16, 200, kernels.CHUNK
    query = torch.randn(rows, heads, dim).to(dtype)
    keys, values = (torch.randn(rows, kv_heads, slots, dim).to(dtype) for _ in range(2))
    starts = [10, 0, fed - 20]
    mask = attend_mask(rows, slots, fed, starts, window=window)
    expected = attend_new_token_reference(query, keys, values, mask, 0.25)
    after = -(-(fed + 1) // chunk) * chunk  # the first chunk wholly after the fed slot
    before = (fed - window + 1) // chunk * chunk if window else 0  # chunks wholly before the window's first slot
    poisoned = [t.clone() for t in (keys, values)]
    for t in poisoned:
        t[:, :, after:] = float("nan")
        t[:, :, :before] = float("nan")
    fed_slot = torch.tensor([fed], device=DEVICE)
    got = attend_new_token_triton(*(t.to(DEVICE) for t in (query, *poisoned, mask)), 0.25, fed_slot, window)
    torch.testing.assert_close(got.cpu(), expected, **tolerance(dtype))
    # the comparison sees the mask: row 2 attending from one slot later changes its output and no other
    other = attend_new_token_triton(*(t.to(DEVICE) for t in (query, *poisoned)),
                                    attend_mask(rows, slots, fed, [10, 0, fed - 19], window=window).to(DEVICE),
                                    0.25, fed_slot, window)
    assert torch.equal(other[:2].cpu(), got[:2].cpu()) and not torch.allclose(other[2].cpu(), got[2].cpu())


def test_the_decode_loop_through_the_kernels_gives_the_references_logits(tokenizer, monkeypatch):
    """A tiny Gemma (a sliding window of 6 slots, two rows of different lengths) decoded with the kernels
    (interpreted on CPU, fp32) against the same loop with the torch references: every step's logits."""
    from .test_decode_step_inputs import prompts_of, step_logits
    from .test_graph_decode import tiny_gemma

    model = tiny_gemma(tokenizer).float()
    prompts = prompts_of(tokenizer)
    expected, answers, _ = step_logits(model, prompts, monkeypatch)
    calls = []
    triton_attend = kernels.attend_new_token_triton
    monkeypatch.setattr(kernels, "usable", lambda *tensors: True)
    monkeypatch.setattr(kernels, "attend_new_token_triton", lambda *a: calls.append(1) or triton_attend(*a))
    got, their_answers, _ = step_logits(model, prompts, monkeypatch)
    assert len(calls) == 2 * (len(expected) - 1)  # both layers, every step after the prompts' pass
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert answers == their_answers
