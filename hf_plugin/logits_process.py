"""`PluginLogitsProcessor`: applies a reweighter inside any `model.generate()` call."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .combine import align_vocab, check_alpha, combine_logits
from .compatibility import renamed_keyword
# The engine's names were first defined here; they stay importable from this module.
from .engine import (AuxiliaryModelsLogitsProcessor, CachedModelRunner, PromptedModel, PromptPadding,  # noqa: F401
                     check_scores_width, left_padding_mask)
from .modeling_plugin import PluginModel


class PluginLogitsProcessor(AuxiliaryModelsLogitsProcessor):
    r"""
    Multiplies one or more reweighters into the base model's next-token distribution at every decoding step:
    the returned scores are `log_softmax(log_softmax(scores) + Σ_i alpha_i * log_softmax(reweighter_i_logits))`.

    Each reweighter keeps its own KV cache and, after the first step of a generation, runs on one new token per
    row. The processor works out from `input_ids` alone what happened since its last call, so it stays exact
    without being told:

    - one token appended to every row (greedy, sampling): the cache is extended;
    - rows reordered or duplicated (beam search): the cache rows are gathered to match, then extended;
    - a shorter, longer or different sequence (a new `generate()` call, assisted decoding rolling back or
      accepting several candidate tokens): the cache is cropped to the longest prefix it still matches and the
      rest is run; with nothing in common it is rebuilt.

    Padding. Left-padded prompts need a mask. Pass `pad_token_id` (or a `tokenizer` that has one): leading pad
    tokens of each row are then masked, which is exactly what tokenizers' left padding produces, for every
    `generate()` call the processor is used in. Alternatively pass the prompts' `attention_mask`: it is bound to
    the first prompt batch the processor sees, and for a later call with other prompts the processor falls back
    to `pad_token_id`, or raises if there is none. Without either, no token is treated as padding.

    Vocabulary widths. Base scores whose width differs from a reweighter's only by padded embedding rows are
    accepted (see `hf_plugin.check_vocab_width`); the columns one side lacks get probability zero. Any other
    mismatch raises, naming both sizes.

    Limits. A sequence longer than a reweighter's `max_position_embeddings` (counting real tokens) raises a
    `ValueError`; NaN or infinite reweighter logits raise a `FloatingPointError`. `-inf` base scores (tokens
    masked by an earlier processor) stay `-inf`.

    Args:
        reweighter (`PluginModel` or a sequence of them):
            The reweighter(s) (a parameter formerly named `plugin`). Each may sit on another device or dtype than the scores, and each may read its own
            rendering of the prompts: wrap it in `hf_plugin.PromptedModel(plugin, input_ids, attention_mask)`.
        attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*):
            The mask of the prompts passed to `generate()`.
        pad_token_id (`int`, *optional*): id of the padding token; defaults to the tokenizer's.
        alpha (`float`, *optional*):
            One strength for every reweighter, overriding their configs' `alpha`: 0 gives the base model alone,
            1 the paper's product, larger values sharpen the reweighting.
        alphas (`list[float]`, *optional*): one strength per reweighter; not together with `alpha`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer used with the base model; checked against each reweighter's recorded fingerprint.
        base_model (`PreTrainedModel`, *optional*):
            The base model; checked against each reweighter's recorded binding (see `PluginModel.check_compatible`).
        strict (`bool`, *optional*, defaults to `True`):
            Raise on a tokenizer or vocabulary mismatch. With `False` a mismatch only logs a warning.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_plugin import PluginConfig, PluginLogitsProcessor, PluginModel
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                     num_hidden_layers=1, num_attention_heads=2, pad_token_id=0))
    >>> plugin = PluginModel(PluginConfig(vocab_size=64, hidden_size=16, intermediate_size=32))
    >>> processor = PluginLogitsProcessor(plugin, pad_token_id=0)
    >>> prompt = torch.tensor([[3, 4, 5]])
    >>> out = base.generate(prompt, logits_processor=[processor], max_new_tokens=5, do_sample=False)
    >>> out.shape
    torch.Size([1, 8])

    ```
    """

    supports_continuous_batching = False

    @renamed_keyword("plugin", "reweighter")
    def __init__(
        self,
        reweighter: PluginModel | Sequence[PluginModel],
        attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        alpha: float | None = None,
        alphas: Sequence[float] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        base_model: PreTrainedModel | None = None,
        strict: bool = True,
    ):
        given = list(reweighter) if isinstance(reweighter, (list, tuple)) else [reweighter]
        plugins = [p.model if isinstance(p, PromptedModel) else p for p in given]
        if not plugins or not all(isinstance(p, PluginModel) for p in plugins):
            raise TypeError(f"`reweighter` must be a PluginModel or a non-empty sequence of them, got {reweighter!r:.80}.")
        if alpha is not None and alphas is not None:
            raise ValueError("Pass either `alpha` (one strength for all) or `alphas` (one per reweighter), not both.")
        if alphas is None:
            alphas = [p.config.alpha if alpha is None else alpha for p in plugins]
        alphas = [check_alpha(a, "alpha`/`alphas") for a in alphas]
        if len(alphas) != len(plugins):
            raise ValueError(f"Got {len(alphas)} alphas for {len(plugins)} reweighters.")
        if base_model is not None:  # the whole binding, the tokenizer's fingerprint included
            for p in plugins:
                p.check_compatible(base_model, tokenizer=tokenizer, strict=strict)
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        super().__init__([("reweighter", p) for p in given], attention_mask, pad_token_id,
                         tokenizer=None if base_model is not None else tokenizer, strict=strict)
        self.alphas = alphas

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        width = scores.shape[-1]
        reweighter_logits = [align_vocab(logits, width) for logits in self.auxiliary_logits(input_ids, scores)]
        return combine_logits(scores, reweighter_logits, self.alphas).to(scores.dtype)
