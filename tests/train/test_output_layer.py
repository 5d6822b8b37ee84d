"""The blockwise output layer (train/output_layer.py) against the plain full-logits computation.

Everything runs in float64, where the two differ only in summation order: a V-term log-sum-exp and
an N- or V-term gradient sum move by at most ~n·eps of their magnitudes, so 1e-12 holds on any CPU,
while a missing term (the soft-cap derivative, a block's remainder, the target's one-hot) moves
them by far more than that.
"""

import pytest
import torch
import torch.nn.functional as F

from tunebench.train import loss as loss_module
from tunebench.train import output_layer
from tunebench.train.output_layer import linear_label_logprobs, vocab_block

from .examples import course_batch

HIDDEN, VOCAB = 6, 23


def plain_label_logprobs(head, hidden, targets, cap):
    logits = head(hidden)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def values_and_grads(fn, head, hidden, targets):
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad()
    # an uneven incoming gradient, so each row's scale g reaches the backward pass
    out = fn(head, hidden, targets)
    (out * torch.linspace(-1.0, 2.0, len(out), dtype=out.dtype)).sum().backward()
    grads = {"hidden": hidden.grad}
    grads |= {name: p.grad.clone() for name, p in head.named_parameters() if p.requires_grad}
    return out.detach(), grads


def assert_close_1e12(a, b):
    scale = float(a.abs().max()) if a.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("rows, block", [(7, 5), (7, None), (1, 5), (0, 5)])
@pytest.mark.parametrize("train_head, bias", [(False, False), (True, False), (True, True)])
def test_blockwise_label_logprobs_equal_log_softmax(cap, rows, block, train_head, bias):
    """Values and gradients (hidden, and weight and bias when they train) equal log_softmax's, with
    and without soft-capping, for a block that does not divide the vocabulary and for 0 and 1 rows."""
    gen = torch.Generator().manual_seed(rows)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias, dtype=torch.float64)
    with torch.no_grad():  # logits of a few units: the soft cap of 3 bends them
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64))
    head.requires_grad_(train_head)
    hidden = torch.randn(rows, HIDDEN, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (rows,), generator=gen)
    if rows > 1:
        targets[-1] = VOCAB - 1  # a target in the last, partial block
    want, want_grads = values_and_grads(lambda h, x, t: plain_label_logprobs(h, x, t, cap), head, hidden, targets)
    got, got_grads = values_and_grads(lambda h, x, t: linear_label_logprobs(h, x, t, cap, block), head, hidden,
                                      targets)
    assert got.dtype == torch.float64 and got.shape == (rows,)
    assert_close_1e12(want, got)
    assert got_grads.keys() == want_grads.keys() == ({"hidden", "weight"} | ({"bias"} if bias else set())
                                                     if train_head else {"hidden"})
    for name in want_grads:
        assert_close_1e12(want_grads[name], got_grads[name])


def test_vocab_block_keeps_the_slab_near_16_mib():
    assert vocab_block(2048, 262144) == 2048  # 2,048 × 2,048 × 4 bytes = 16 MiB
    assert vocab_block(4000, 262144) * 4000 * 4 <= 16 * 2**20
    assert vocab_block(1, 262144) == vocab_block(0, 262144) == 262144  # never more than the vocabulary
    assert vocab_block(10**6, 262144) == output_layer.MIN_BLOCK


def tiny_batch(tokenizer):
    batch = course_batch(tokenizer)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    return batch


@pytest.mark.parametrize("method", ["lora", "full"])
def test_answer_only_sft_loss_and_dpo_logps_use_the_blockwise_head(tiny_model_dir, tokenizer, method, monkeypatch):
    """On the tiny Llama (Gemma's 262,144-entry vocabulary, tied head) token_loss_sum and
    label_logprobs with answer_only_logits take the blockwise path, in several uneven blocks, and
    equal the full-logits path in value and in every trainable gradient (the tied embedding too)."""
    from transformers import AutoModelForCausalLM

    from tunebench.config import TrainConfig
    from tunebench.train.methods import make_trainable

    def refuse(*_):
        raise AssertionError("the plain nn.Linear head fell back to checkpointed chunks")

    monkeypatch.setattr(loss_module, "checkpointed_label_logprobs", refuse)
    monkeypatch.setattr(output_layer, "SLAB_ELEMENTS", 100_000)  # several blocks, the last one partial
    batch = tiny_batch(tokenizer)
    objectives = {"sft": lambda m, b, a: loss_module.token_loss_sum(m, b, a),
                  "dpo": lambda m, b, a: (loss_module.label_logprobs(m, b, a)[0]
                                          * torch.linspace(0.5, 1.5, int((b["labels"][:, 1:] != -100).sum()),
                                                           dtype=torch.float64)).sum()}
    for objective in objectives.values():
        results = []
        for answer_only in (False, True):
            torch.manual_seed(0)
            model = make_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64),
                                   TrainConfig(method=method, lora_dropout=0.0, gradient_checkpointing=False))
            for name, param in model.named_parameters():
                if "lora_B" in name:  # B starts at zero; move it so A's gradients are not all zero
                    torch.nn.init.normal_(param, std=0.02)
            value = objective(model, batch, answer_only)
            value.backward()
            results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.requires_grad}))
        (value_a, grads_a), (value_b, grads_b) = results
        assert grads_a.keys() == grads_b.keys() and (method == "lora" or any("embed" in n for n in grads_a))
        torch.testing.assert_close(value_a, value_b, rtol=1e-12, atol=0)
        for name in grads_a:
            scale = float(grads_a[name].abs().max())
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-10, atol=1e-10 * scale,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("cap", [None, 30.0])
def test_under_autocast_logits_are_in_the_autocast_dtype(cap):
    """Under bf16 autocast the logits are bf16 as on the plain path (the same values to fp32
    rounding, where fp32 logits would differ by bf16's ~4e-3), the softmax fp32, and the gradients
    come back in the inputs' dtype, though autocast does not reach a custom Function's backward."""
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False)
    hidden = torch.randn(37, 64, generator=gen)
    targets = torch.randint(0, 1000, (37,), generator=gen)

    def plain(h, x, t):
        logits = h(x)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return F.log_softmax(logits.float(), dim=-1).gather(1, t[:, None]).squeeze(1)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = values_and_grads(plain, head, hidden, targets)
        got, got_grads = values_and_grads(lambda h, x, t: linear_label_logprobs(h, x, t, cap, 300), head, hidden,
                                          targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for name in want_grads:  # the plain path rounds grad_h to bf16; the blockwise one sums it in fp32
        assert got_grads[name].dtype == torch.float32
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=0,
                                   atol=2e-2 * float(want_grads[name].abs().max()))
