"""Stop strings checked on the host every few tokens instead of on every token.

transformers' `stop_strings` run a dozen small device kernels per generated token (and decode
nothing); with a captured decode step those kernels cost more than the model's own. Here the rows'
recent tokens are copied to the host and decoded once every `every` tokens: a row that completed a
stop string is ended at the next check, up to `every - 1` tokens late. Those extra tokens are cut
off again afterwards (the answer text is cut at the first stop string either way, and
`tokens_until_stop` counts new tokens as if the row had stopped at once), so answers are the same.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria

STOP_CHECK_EVERY = 16


def stop_window(stops: list[str], every: int) -> int:
    """Tokens enough to hold any stop string that ended since the last check: the new tokens plus the
    stop string's own tokens (at most one per UTF-8 byte, with byte fallback)."""
    return every + max(len(s.encode("utf-8")) for s in stops) + 1


def rows_holding_stop(tokenizer, stops: list[str], rows: list[list[int]], window: int) -> list[bool]:
    """Whether the text of each row's last `window` tokens holds a stop string."""
    texts = tokenizer.batch_decode([row[-window:] for row in rows], skip_special_tokens=True)
    return [any(s in t for s in stops) for t in texts]


class StopStringsEvery(StoppingCriteria):
    """Ends a row whose generated text holds a stop string; looks once every `every` tokens."""

    def __init__(self, tokenizer, stops: list[str], prompt_width: int, every: int = STOP_CHECK_EVERY):
        self.tokenizer, self.stops, self.prompt_width, self.every = tokenizer, stops, prompt_width, every
        self.window = stop_window(stops, every)
        self.calls = 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.calls += 1
        if self.calls % self.every:  # no host sync on these steps
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tails = input_ids[:, max(self.prompt_width, input_ids.shape[1] - self.window):].tolist()
        return torch.tensor(rows_holding_stop(self.tokenizer, self.stops, tails, self.window), device=input_ids.device)


def tokens_until_stop(tokenizer, tokens: list[int], stops: list[str]) -> int | None:
    """The fewest leading tokens whose text holds a stop string (where per-token checking would have
    ended the row), or None when the text holds none. A stop string, once in the text, stays in it
    as tokens are added, so a binary search over prefixes finds the first."""
    def holds_stop(n: int) -> bool:
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        return any(s in text for s in stops)

    if not stops or not tokens or not holds_stop(len(tokens)):
        return None
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        if holds_stop(middle):
            high = middle
        else:
            low = middle + 1
    return low
