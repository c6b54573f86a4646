"""Where base-model log-probabilities come from during training: the `LossSource` contract the training loop takes
its loss from, and a live base model run on every batch (`LiveBaseModel`).

Both kinds of source give the training loop the same thing: the NLL of the completion tokens under the combination,
from the reweighter's logits. The other kind, a cache written in one pass (`CachedBaseLogits`), lives in
`hf_plugin.base_cache`, and the completion helpers in `hf_plugin.completions`; their names stay importable from here.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

# Re-exported: users import these from here, where they lived before the cache and the completion helpers had
# modules of their own.
from .base_cache import (IDENTITY_FIELDS, INDEX_FILE, LOGPROB_TOLERANCE, MANIFEST_FILE, SHARD_PATTERN,  # noqa: F401
                         BaseCachePlan, CachedBaseLogits, ShardSource, cached_base_sources, check_top_k,
                         open_base_caches, plan_base_caches, write_base_cache)
from .combine import align_vocab, combine_logits
from .completions import (DEFAULT_TASK_VOCAB_SIZE, completion_positions, examples_fingerprint,  # noqa: F401
                          loss_positions, task_vocabulary)


@runtime_checkable
class LossSource(Protocol):
    """What the training loop (`hf_plugin.training.train`, `completion_nll`) takes its loss from: the base model's
    log-probs combined with the reweighter's logits (`LiveBaseModel`, `CachedBaseLogits`), or any other loss on the
    model's logits (e.g. `hf_plugin.unlearning.UnlearningLoss`).

    A source may also have a `reference_name` (`str`): what its value at `alpha=0` is, for the training log;
    "base model alone" when it has none.
    """

    def nll(self, reweighter_logits: torch.Tensor, batch: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
        """Per-position loss at the completion positions of `batch`.

        Args:
            reweighter_logits (`torch.Tensor` of shape `(N, vocab_size)`): the model's logits at the
                `loss_positions(batch["labels"])`, in row-major order (`PluginModel.completion_logits`).
            batch (`dict`): a `hf_plugin.data.collate` batch.
            alpha (`float`): strength of the reweighter.

        Returns:
            `torch.Tensor` of shape `(N,)`: the loss at each of those positions; training minimises their mean.
        """



class LiveBaseModel:
    """Runs a frozen in-process base model on every batch (the paper's setup).

    Args:
        model (`PreTrainedModel`): the base model, any dtype or device; it is put in eval mode with gradients off.
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model.eval().requires_grad_(False)

    def nll(self, reweighter_logits: torch.Tensor, batch: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
        """Per-position NLL of the completion tokens under the full combination (arguments as `LossSource.nll`)."""
        with torch.no_grad():
            base_logits = self.model(
                input_ids=batch["input_ids"].to(self.model.device),
                attention_mask=batch["attention_mask"].to(self.model.device),
            ).logits
        positions = completion_positions(batch["labels"])
        base = base_logits[:, :-1][positions.to(base_logits.device)].to(reweighter_logits.device)
        reweighter = align_vocab(reweighter_logits, base.shape[-1])
        targets = batch["labels"][:, 1:][positions].to(reweighter_logits.device)
        return -combine_logits(base, reweighter, alpha).gather(-1, targets[:, None]).squeeze(-1)
