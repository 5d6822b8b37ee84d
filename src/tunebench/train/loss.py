"""The training objective: next-token cross-entropy summed over labelled (answer) positions.

One definition serves training, held-out eval loss and the reference-answer NLL, so the three
numbers are the same quantity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunebench.config_checks import answer_only_logits_refusal
from tunebench.data.batches import pad_batch
from tunebench.data.tokens import IGNORE
from tunebench.errors import ConfigError
from tunebench.train.output_layer import linear_label_logprobs
from tunebench.train.wrapped import causal_lm, decoder_hidden

# Model types whose logits are exactly the output layer on the decoder's last hidden state (Gemma
# adds the soft-capping handled below). Others may rescale logits (Cohere's logit_scale, Granite's
# logits_scaling, MiniCPM's width scaling), which answer_only_logits would silently drop.
PLAIN_LOGITS = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}


def loss_tokens(labels: torch.Tensor) -> int:
    """Positions the loss sees: labelled tokens after the first column (which is never predicted)."""
    return int((labels[:, 1:] != IGNORE).sum())


def answer_tokens(row: dict) -> int:
    """The same count for one unpadded row of label ids."""
    return sum(1 for label in row["labels"][1:] if label != IGNORE)


def use_answer_only_logits(setting: bool | None, model, method: str, sharded: bool = False) -> bool:
    """Resolve train.answer_only_logits for this model: null decides, true insists, false declines.
    With model None (before loading) only the method and sharding are checked."""
    if setting is False:
        return False
    causal = causal_lm(model) if model is not None else None
    kind = getattr(getattr(causal, "config", None), "model_type", None)
    why = answer_only_logits_refusal(method, sharded)
    if why is None and model is not None and kind not in PLAIN_LOGITS:
        why = (f"it is verified only for model types {sorted(PLAIN_LOGITS)}; this model is '{kind}' "
               "(it may rescale its logits)")
    if why and setting:
        raise ConfigError(f"train.answer_only_logits: {why}; set it to false or leave it null")
    return why is None


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits go up to fp32 for the softmax; fp64 stays fp64 (the exactness tests run in it)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def head_label_logprobs(causal, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) log-prob of each target under the output layer (with Gemma's soft-capping) on (N, H)
    hidden states, never holding vocabulary-wide logits for all N rows at once.

    A plain nn.Linear head (the normal case: peft's "all-linear" leaves lm_head out, and
    bitsandbytes keeps it unquantised) goes through output_layer.linear_label_logprobs, blockwise
    over the vocabulary. Anything else (a peft-wrapped or quantised head, one with hooks that move
    or change its weight) must be called as a module, so it falls back to checkpointed row chunks.
    """
    head = causal.get_output_embeddings()
    cap = getattr(causal.config, "final_logit_softcapping", None)
    if type(head) is torch.nn.Linear and not (head._forward_hooks or head._forward_pre_hooks
                                               or hasattr(head, "_hf_hook")):
        return linear_label_logprobs(head, hidden, targets, cap)
    return checkpointed_label_logprobs(causal, hidden, targets)


def checkpointed_label_logprobs(causal, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The fallback of head_label_logprobs: `chunk` rows of full logits at a time, recomputed in the
    backward pass instead of kept (one chunk is chunk × vocabulary logits and their gradient)."""
    if len(hidden) <= chunk:
        return module_label_logprobs(causal, hidden, targets)
    from torch.utils.checkpoint import checkpoint

    return torch.cat([checkpoint(module_label_logprobs, causal, hidden[i : i + chunk], targets[i : i + chunk],
                                 use_reentrant=False) for i in range(0, len(hidden), chunk)])


def module_label_logprobs(causal, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probs of targets from full logits of the output layer called as a module (soft-capped)."""
    logits = causal.get_output_embeddings()(hidden)
    cap = getattr(causal.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return -F.cross_entropy(at_least_fp32(logits), targets, reduction="none")


def token_loss_sum(model, batch: dict[str, torch.Tensor], answer_only_logits: bool = False) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions.

    answer_only_logits: run the decoder, then the output layer only on the hidden states that
    predict a labelled token (N of B×T), blockwise over the vocabulary (head_label_logprobs), so no
    position's vocabulary-wide logits are ever held whole.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    if answer_only_logits:
        causal = causal_lm(model)
        hidden = decoder_hidden(model, inputs)  # (B, T, H)
        targets = labels[:, 1:]
        keep = targets != IGNORE
        return -head_label_logprobs(causal, hidden[:, :-1][keep], targets[keep]).sum()
    logits = model(**inputs, use_cache=False).logits
    logits = logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual tokens to the logits
    return F.cross_entropy(at_least_fp32(logits[:, :-1].flatten(0, 1)), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def label_logprobs(model, batch: dict[str, torch.Tensor], answer_only_logits: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each labelled token, its row-major position index) for a batch.

    With answer_only_logits the output layer runs only on the hidden states that predict a label,
    blockwise over the vocabulary as for the SFT loss (head_label_logprobs): a response's label
    log-probs never need vocabulary-wide logits at prompt positions, nor whole ones anywhere.
    """
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    where = keep.flatten().nonzero().squeeze(1)
    if answer_only_logits:
        causal = causal_lm(model)
        hidden = decoder_hidden(model, inputs)[:, :-1][keep]
        return head_label_logprobs(causal, hidden, targets[keep]), where
    logits = model(**inputs, use_cache=False).logits[:, :-1][keep]
    return -F.cross_entropy(at_least_fp32(logits), targets[keep], reduction="none"), where


@torch.no_grad()
def loss_totals(model, rows: list[dict], batch_size: int, pad_id: int, device) -> tuple[float, int]:
    """(summed loss, loss tokens) over rows of ids and labels, in batches."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(rows[i : i + batch_size], pad_id).items()}
        total += token_loss_sum(model, batch).item()
        count += loss_tokens(batch["labels"])
    return total, count


def evaluate(model, rows: list[dict], batch_size: int, pad_id: int, device, autocast) -> float:
    """Mean per-token loss on held-out rows."""
    model.eval()
    with autocast():
        total, count = loss_totals(model, rows, batch_size, pad_id, device)
    model.train()
    return total / max(count, 1)
