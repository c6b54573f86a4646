"""What the processors of `hf_plugin.methods` share beyond the engine (`hf_plugin.engine`, where their auxiliary
models, `PromptedModel` and the shared processor step live)."""

from __future__ import annotations

import torch

from ..combine import align_vocab
from ..engine import AuxiliaryModel, AuxiliaryModelsLogitsProcessor, PromptedModel, output_width  # noqa: F401


def aligned_log_softmax(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Float32 log-probabilities over the model's own vocabulary, cut or padded with -inf to `width` columns."""
    return align_vocab(torch.log_softmax(logits.float(), dim=-1), width)
