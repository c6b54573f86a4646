"""A compact output layer: one row per task token, one shared logit for every other token.

The reweighter's own output layer ranks every token of the vocabulary against every other, including the tens of
thousands its training completions never contain; it can only learn to push those down, which is how it suppresses
values its data lacks. `CompactHead` covers the task vocabulary (the tokens of the training completions, as the
base-logit cache records them) and gives all other tokens one shared logit, so it cannot rank them against each
other; and it is a small fraction of the full layer (257 × 2,049 instead of 256 × 49,152 weights for the paper's
reweighter on SmolLM2's vocabulary with 2,048 task tokens). The simplest form of the VQ-Logits idea (one shared
code for the tokens outside the task vocabulary).

This module imports nothing else of ours: the remote-code copy of a saved reweighter carries it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class CompactHead(torch.nn.Module):
    r"""
    An output layer over `vocab_size` tokens with `len(head_ids) + 1` rows: `head_ids` get their own rows, all other
    ids the last, shared one.

    Args:
        hidden_size (`int`): width of the hidden states.
        vocab_size (`int`): width of the logits it returns.
        head_ids (`Sequence[int]`): the ids with a row of their own (distinct, in `[0, vocab_size)`).

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.compact_head import CompactHead
    >>> head = CompactHead(hidden_size=4, vocab_size=6, head_ids=[2, 5])
    >>> logits = head(torch.randn(3, 4))
    >>> logits.shape, bool((logits[:, [0, 1, 3, 4]] == logits[:, :1]).all())
    (torch.Size([3, 6]), True)

    ```
    """

    def __init__(self, hidden_size: int, vocab_size: int, head_ids: Sequence[int]):
        super().__init__()
        ids = [int(i) for i in head_ids]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"`head_ids` must be distinct ids in [0, {vocab_size}), got {len(ids)} ids.")
        self.proj = torch.nn.Linear(hidden_size, len(ids) + 1, bias=False)
        # Column of each vocabulary id in the compact logits (the shared last one for ids without a row). Derived
        # from the config: neither a parameter nor a saved buffer, and built on the CPU even while transformers
        # builds the model on the meta device.
        columns = torch.full((vocab_size,), len(ids), dtype=torch.long, device="cpu")
        columns[torch.tensor(ids, device="cpu")] = torch.arange(len(ids), device="cpu")
        self._columns = {columns.device: columns}

    def columns(self, device: torch.device) -> torch.LongTensor:
        if device not in self._columns:
            self._columns[device] = next(iter(self._columns.values())).to(device)
        return self._columns[device]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        compact = self.proj(hidden_states)
        return compact.index_select(-1, self.columns(compact.device))
