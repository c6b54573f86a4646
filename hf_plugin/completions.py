"""The completions of tokenised examples, as the training loss and the base-logit cache see them: which positions
of a batch are learned, which tokens the completions use (the task vocabulary), and a fingerprint of the data.

Both `hf_plugin.base_logits` (the live base model) and `hf_plugin.base_cache` (the cache) build on these, so they
live apart from either.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence

import torch

from .data import EncodedExample


def completion_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean `(batch, length - 1)` mask of the positions whose next token is a learned (completion) token."""
    return labels[:, 1:] != -100


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """`completion_positions` as a `(batch, length)` mask, for `PluginModel.completion_logits`."""
    return torch.nn.functional.pad(completion_positions(labels), (0, 1), value=False)


# The task vocabulary's default cap: E2E's 4,299 devel completions use 1,185 distinct SmolLM2 tokens, and the most
# frequent 512 already cover 99.2% of their occurrences; 2,048 float16 log-probs cost 4 KiB per completion token.
DEFAULT_TASK_VOCAB_SIZE = 2048


def task_vocabulary(examples: Sequence[EncodedExample], max_size: int = DEFAULT_TASK_VOCAB_SIZE) -> list[int]:
    """The token ids the completions of `examples` use (their EOS included), most frequent first, at most `max_size`.

    These are the tokens a reweighter learns to lift; caching the base log-probs of all of them (not only of the
    base's top-k) lets the cached loss treat them exactly (see `combine_topk_nll`). Ties in frequency go to the
    smaller id, so the list is a function of the data alone.

    Args:
        examples (`Sequence[EncodedExample]`): the tokenised training data.
        max_size (`int`, *optional*, defaults to 2048): the most ids kept (the most frequent ones); at least 1.

    Returns:
        `list[int]`: the ids, in descending order of frequency.

    Examples:

    ```python
    >>> from hf_plugin.data import EncodedExample
    >>> from hf_plugin.completions import task_vocabulary
    >>> examples = [EncodedExample([5, 7, 8, 2], [-100, 7, 8, 2], 0), EncodedExample([5, 8, 2], [-100, 8, 2], 1)]
    >>> task_vocabulary(examples)
    [2, 8, 7]

    ```
    """
    if not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"The task vocabulary's size must be a positive integer, got {max_size!r}.")
    counts = Counter(label for example in examples for label in example.labels if label != -100)
    return sorted(counts, key=lambda token: (-counts[token], token))[:max_size]


def examples_fingerprint(examples: Sequence[EncodedExample]) -> str:
    """A hash of the token ids and labels of the examples, to tie a cache to the exact data it was built from."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return "sha256:" + digest.hexdigest()[:16]
