"""ULD (Ji et al. 2024): unlearning at decoding time by subtracting an assistant's log-probabilities from the target's."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..engine import AuxiliaryModelsLogitsProcessor, PromptedModel
from .auxiliary import aligned_log_softmax


def relative_top_mask(log_probs: torch.Tensor, relative_top: float) -> torch.Tensor:
    """The plausible tokens of each row: `log p(v) ≥ min(max log p + log r, the log-prob ranked ⌊r·V⌋)`.

    A token is kept when it is at least `r` times as likely as the most likely one, and the `⌊r·V⌋` most likely
    tokens (at least one) are always kept.

    Args:
        log_probs (`torch.Tensor` of shape `(..., vocab_size)`): normalised log-probabilities.
        relative_top (`float`): `r`, in (0, 1].

    Returns:
        `torch.BoolTensor` of the same shape: `True` for the kept tokens.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.methods import relative_top_mask
    >>> relative_top_mask(torch.tensor([0.6, 0.3, 0.05, 0.05]).log(), 0.1)
    tensor([ True,  True, False, False])

    ```
    """
    ranked = max(int(relative_top * log_probs.shape[-1]), 1)
    at_rank = log_probs.topk(ranked, dim=-1).values[..., -1:]
    relative = log_probs.max(dim=-1, keepdim=True).values + math.log(relative_top)
    return log_probs >= torch.minimum(relative, at_rank)


def logit_difference_scores(
    target_logits: torch.Tensor, assistant_logits: torch.Tensor, beta: float = 0.75, relative_top: float = 1e-2
) -> torch.Tensor:
    """ULD's next-token log-probabilities: `log_softmax(log p_target − beta · log p_assistant)` over the tokens that
    pass `relative_top_mask` on the target's distribution; every other token gets `-inf` (also when all kept scores
    are negative: the reference code's greedy path lets a masked token win then, which is not reproduced here).

    Args:
        target_logits (`torch.Tensor` of shape `(..., vocab_size)`): the target (base) model's scores.
        assistant_logits (`torch.Tensor` of shape `(..., assistant_vocab_size)`): the assistant's.
        beta (`float`, *optional*, defaults to 0.75): the weight of the assistant (0.75 for TOFU in the paper).
        relative_top (`float`, *optional*, defaults to 1e-2): `r` of the plausibility mask.

    Returns:
        `torch.Tensor` of the target's shape: normalised log-probabilities, in float32.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.methods import logit_difference_scores
    >>> target = torch.tensor([0.6, 0.3, 0.05, 0.05]).log()
    >>> assistant = torch.tensor([0.9, 0.05, 0.03, 0.02]).log()   # remembers the answer the target would give
    >>> logit_difference_scores(target, assistant, beta=1.0, relative_top=0.1).exp().round(decimals=3)
    tensor([0.1000, 0.9000, 0.0000, 0.0000])

    ```
    """
    target = torch.log_softmax(target_logits.float(), dim=-1)
    assistant = aligned_log_softmax(assistant_logits, target.shape[-1])
    keep = relative_top_mask(target, relative_top) & torch.isfinite(assistant)
    return torch.log_softmax(torch.where(keep, target - beta * assistant, float("-inf")), dim=-1)


class LogitDifferenceLogitsProcessor(AuxiliaryModelsLogitsProcessor):
    r"""
    ULD (Ji et al., *Reversing the Forget-Retain Objectives: An Efficient LLM Unlearning Framework from Logit
    Difference*, 2024): a target model unlearns a "forget" set at decoding time by subtracting the log-probabilities
    of an assistant that remembers the forget set and knows nothing else:

        scores = log_softmax(log p_target − beta · log p_assistant)   on the tokens with
        log p_target(v) ≥ min(max log p_target + log r, the log-prob ranked ⌊r·V⌋),   −inf elsewhere

    The mask keeps the subtraction from promoting tokens the target finds implausible. Train an assistant with
    `hf_plugin.unlearning.train_assistant` (the target's first layers with LoRA adapters, as ULD builds it), or
    pass any causal LM on the target's tokenizer (a `PromptedModel` for one with its own prompts). The assistant
    keeps its own KV cache beside `generate()`, exactly as a reweighter does in `PluginLogitsProcessor`.

    Args:
        assistant (`PreTrainedModel` or `PromptedModel`): the assistant model.
        beta (`float`, *optional*, defaults to 0.75): the assistant's weight (0.75 TOFU, 0.5 Harry Potter in the
            paper; the reference code uses 0.8); 0 gives the target alone.
        relative_top (`float`, *optional*, defaults to 1e-2): `r` of the plausibility mask, in (0, 1].
        attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*): the prompts' mask.
        pad_token_id (`int`, *optional*): the padding id of the prompts; defaults to the tokenizer's.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the target's tokenizer, checked against the assistant.
        strict (`bool`, *optional*, defaults to `True`): raise on a tokenizer or vocabulary mismatch.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_plugin import LogitDifferenceLogitsProcessor, first_layers
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> target = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, pad_token_id=0,
    ...                                       num_hidden_layers=2, num_attention_heads=2)).eval()
    >>> assistant = first_layers(target, 1)   # untrained here: see hf_plugin.unlearning.train_assistant
    >>> processor = LogitDifferenceLogitsProcessor(assistant, beta=0.75, relative_top=0.1, pad_token_id=0)
    >>> out = target.generate(torch.tensor([[3, 4, 5]]), logits_processor=[processor], max_new_tokens=4)
    >>> out.shape
    torch.Size([1, 7])

    ```
    """

    def __init__(
        self,
        assistant: PreTrainedModel | PromptedModel,
        beta: float = 0.75,
        relative_top: float = 1e-2,
        attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        strict: bool = True,
    ):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
            raise ValueError(f"`beta` must be a finite number, got {beta!r}.")
        if isinstance(relative_top, bool) or not isinstance(relative_top, (int, float)) or not 0 < relative_top <= 1:
            raise ValueError(f"`relative_top` must be in (0, 1], got {relative_top!r}.")
        super().__init__([("assistant", assistant)], attention_mask, pad_token_id, tokenizer, strict)
        self.beta = float(beta)
        self.relative_top = float(relative_top)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        (assistant,) = self.auxiliary_logits(input_ids, scores)
        return logit_difference_scores(scores, assistant, self.beta, self.relative_top).to(scores.dtype)
