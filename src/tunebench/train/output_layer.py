"""Label log-probabilities of a linear output layer without vocabulary-wide logits.

log softmax(W h + b)[target] is computed one block of vocabulary rows at a time with a running
maximum and log-sum-exp, and the backward pass recomputes each block's logits. Extra memory is one
(rows × block) slab of logits, about 16 MiB whatever the vocabulary (Gemma 3's 262,144 entries made
the 1,024-row chunks of full logits cost gigabytes).

Dtypes follow the plain path: logits (and Gemma's soft-capping) in the compute dtype (the autocast
dtype on GPU, else the inputs' dtype), the softmax in at least fp32 (fp64 stays fp64). Autocast is
off inside the Function and the casts are explicit, because autocast does not reach a custom
Function's backward.
"""

from __future__ import annotations

import torch

# rows × block fp32 logits per block: 16 MiB. 64 MiB measured no faster on Gemma 3 270M and 0.2 GiB more
# at peak (docs/PERFORMANCE.md, 'Compiled layers with offload').
SLAB_ELEMENTS = 4 * 2**20
MIN_BLOCK = 256  # keep the matmuls wide enough to be efficient when there are very many rows


def vocab_block(rows: int, vocab: int) -> int:
    """Vocabulary rows per block: rows × block stays about SLAB_ELEMENTS (never under MIN_BLOCK)."""
    return max(1, min(vocab, max(MIN_BLOCK, SLAB_ELEMENTS // max(rows, 1))))


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: the autocast dtype where autocast is on (it leaves
    fp64 alone), else the promoted input dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def capped_logits(hidden, weight, bias, cap, start, stop, dtype):
    """Logits of vocabulary rows [start, stop) in `dtype`, soft-capped when cap is set, and the
    tanh (for the soft-cap derivative; None without a cap)."""
    logits = hidden @ weight[start:stop].to(dtype).T
    if bias is not None:
        logits = logits + bias[start:stop].to(dtype)
    if not cap:
        return logits, None
    squashed = torch.tanh(logits / cap)
    return squashed * cap, squashed


def in_block(targets, start, stop):
    """(whether each target lies in [start, stop), its column there, clamped into range for the
    rows outside): gather/scatter with a mask instead of boolean indexing, which syncs a GPU."""
    return (targets >= start) & (targets < stop), (targets - start).clamp(0, stop - start - 1)


class LinearLabelLogprobs(torch.autograd.Function):
    """(N,) log softmax(cap·tanh((h Wᵀ + b)/cap))[target] for h (N, H), W (V, H), b (V,) or None."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, cap, dtype, block):
        with torch.autocast(hidden.device.type, enabled=False):
            acc = torch.promote_types(dtype, torch.float32)
            h = hidden.to(dtype)
            rows, vocab = len(h), len(weight)
            block = block or vocab_block(rows, vocab)
            running_max = torch.full((rows,), float("-inf"), dtype=acc, device=h.device)
            running_sum = torch.zeros(rows, dtype=acc, device=h.device)
            target_logit = torch.zeros(rows, dtype=acc, device=h.device)
            for start in range(0, vocab, block):
                stop = min(start + block, vocab)
                logits = capped_logits(h, weight, bias, cap, start, stop, dtype)[0].to(acc)
                new_max = torch.maximum(running_max, logits.max(dim=1).values)
                running_sum = (running_sum * torch.exp(running_max - new_max)
                               + torch.exp(logits - new_max[:, None]).sum(dim=1))
                running_max = new_max
                inside, column = in_block(targets, start, stop)
                picked = logits.gather(1, column[:, None]).squeeze(1)
                target_logit = torch.where(inside, picked, target_logit)
            logsumexp = running_max + torch.log(running_sum)
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        ctx.cap, ctx.dtype, ctx.block = cap, dtype, block
        return target_logit - logsumexp

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        cap, dtype, block = ctx.cap, ctx.dtype, ctx.block
        want_w, want_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(hidden.device.type, enabled=False):
            acc = logsumexp.dtype
            h = hidden.to(dtype)
            g = grad_out.to(acc)
            grad_h = torch.zeros(h.shape, dtype=acc, device=h.device)
            grad_w = torch.zeros_like(weight) if want_w else None
            grad_b = torch.zeros_like(bias) if want_b else None
            for start in range(0, len(weight), block):
                stop = min(start + block, len(weight))
                logits, squashed = capped_logits(h, weight, bias, cap, start, stop, dtype)
                # d logprob / d logit_j = onehot_j − softmax_j, scaled by the incoming gradient
                grad_logits = torch.exp(logits.to(acc) - logsumexp[:, None]) * -g[:, None]
                inside, column = in_block(targets, start, stop)
                grad_logits.scatter_add_(1, column[:, None], torch.where(inside, g, 0)[:, None])
                if squashed is not None:  # d cap·tanh(z/cap) / dz = 1 − tanh²(z/cap)
                    grad_logits = grad_logits * (1 - squashed.to(acc) ** 2)
                grad_z = grad_logits.to(dtype)
                grad_h += grad_z @ weight[start:stop].to(dtype)
                if want_w:
                    grad_w[start:stop] = (grad_z.T @ h).to(weight.dtype)
                if want_b:
                    grad_b[start:stop] = grad_logits.sum(dim=0).to(bias.dtype)
        grad_h = grad_h.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_label_logprobs(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                          cap: float | None = None, block: int | None = None) -> torch.Tensor:
    """(N,) log-prob of each target under the output layer `head` (optionally soft-capped), in at
    least fp32, computed `block` vocabulary rows at a time (default: vocab_block)."""
    dtype = compute_dtype(hidden, head.weight)
    return LinearLabelLogprobs.apply(hidden, head.weight, head.bias, targets, cap or None, dtype, block)
