"""Proxy-tuning (Liu et al. 2024) and its DExperts form (Liu et al. 2021): a base steered by the difference between a
small expert and a small anti-expert."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..engine import AuxiliaryModelsLogitsProcessor, PromptedModel
from .auxiliary import aligned_log_softmax


def top_p_mask(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus of each row: the most probable tokens until their mass reaches `top_p` (the token that crosses it
    included, and always the most probable one).

    Args:
        log_probs (`torch.Tensor` of shape `(..., vocab_size)`): normalised log-probabilities.
        top_p (`float`): the nucleus mass, in (0, 1].

    Returns:
        `torch.BoolTensor` of the same shape: `True` inside the nucleus.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.methods import top_p_mask
    >>> top_p_mask(torch.tensor([0.5, 0.3, 0.15, 0.05]).log(), 0.7)
    tensor([ True,  True, False, False])

    ```
    """
    if top_p >= 1:  # the whole vocabulary, whatever the rounding of the cumulative sum
        return torch.ones_like(log_probs, dtype=torch.bool)
    sorted_log_probs, order = log_probs.sort(dim=-1, descending=True)
    probs = sorted_log_probs.exp()
    mass_before = probs.cumsum(dim=-1) - probs
    keep = mass_before < top_p
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


def proxy_tuning_scores(
    base_logits: torch.Tensor,
    expert_logits: torch.Tensor,
    anti_expert_logits: torch.Tensor,
    alpha: float = 1.0,
    plausibility_top_p: float | None = None,
) -> torch.Tensor:
    """Proxy-tuning's next-token log-probabilities: `log_softmax(log p_base + alpha * (log p_expert - log p_anti))`.

    With `plausibility_top_p=p` (DExperts), the tokens outside the base's top-p nucleus are set to `-inf` first. A
    column that the expert or the anti-expert lacks (a padded row of the base) gets `-inf`; `-inf` base scores stay
    `-inf`.

    Args:
        base_logits (`torch.Tensor` of shape `(..., vocab_size)`): the base model's scores.
        expert_logits, anti_expert_logits (`torch.Tensor` of shape `(..., expert_vocab_size)`): the small models'.
        alpha (`float`, *optional*, defaults to 1.0): the strength of the experts' term.
        plausibility_top_p (`float`, *optional*): the DExperts nucleus mass (0.9 in their paper).

    Returns:
        `torch.Tensor` of the base's shape: normalised log-probabilities, in float32.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.methods import proxy_tuning_scores
    >>> base = torch.tensor([2.0, 1.0, 0.0])
    >>> expert, anti = torch.tensor([0.0, 3.0, 0.0]), torch.tensor([0.0, 0.0, 0.0])
    >>> proxy_tuning_scores(base, expert, anti).exp().round(decimals=3)
    tensor([0.1170, 0.8670, 0.0160])
    >>> proxy_tuning_scores(base, expert, anti, plausibility_top_p=0.5).exp()
    tensor([1., 0., 0.])

    ```
    """
    width = base_logits.shape[-1]
    base = torch.log_softmax(base_logits.float(), dim=-1)
    if plausibility_top_p is not None:
        base = base.masked_fill(~top_p_mask(base, plausibility_top_p), float("-inf"))
    difference = aligned_log_softmax(expert_logits, width) - aligned_log_softmax(anti_expert_logits, width)
    steer = torch.where(torch.isfinite(difference), alpha * difference, float("-inf"))
    return torch.log_softmax(base + steer, dim=-1)


MAX_ALPHA = 1e6


class ProxyTuningLogitsProcessor(AuxiliaryModelsLogitsProcessor):
    r"""
    Proxy-tuning (Liu et al., *Tuning Language Models by Proxy*, 2024): steers a large base model with the difference
    between a small tuned expert and its untuned version, the anti-expert, at every decoding step:

        scores = log_softmax(log p_base + alpha · (log p_expert − log p_anti_expert))

    With `plausibility_top_p=p` it is DExperts (Liu et al., 2021): tokens outside the base's top-p nucleus are set to
    `-inf` before the experts' term is added (they used p = 0.9 and alpha = 2.0 to detoxify). See
    `proxy_tuning_scores` for the formula alone.

    The expert and anti-expert are any causal LMs on the base's tokenizer. Each keeps its own KV cache beside
    `generate()` (one new token per step after the first; beams, padding and new calls handled as in
    `PluginLogitsProcessor`), and each may read its own prompts: wrap it in a `PromptedModel` (e.g. a chat expert on
    the chat template while the base reads raw text).

    Args:
        expert (`PreTrainedModel` or `PromptedModel`): the tuned small model.
        anti_expert (`PreTrainedModel` or `PromptedModel`): the untuned small model it was tuned from.
        alpha (`float`, *optional*, defaults to 1.0): the strength of the experts' term (0: the base alone).
        plausibility_top_p (`float`, *optional*): the DExperts nucleus mass, in (0, 1]; `None` for proxy-tuning.
        attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*): the base prompts' mask.
        pad_token_id (`int`, *optional*): the padding id of the base prompts; defaults to the tokenizer's.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the base's tokenizer, checked against both models.
        strict (`bool`, *optional*, defaults to `True`): raise on a tokenizer or vocabulary mismatch.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_plugin import ProxyTuningLogitsProcessor
    >>> def tiny(layers, seed):
    ...     torch.manual_seed(seed)
    ...     return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, pad_token_id=0,
    ...                                         num_hidden_layers=layers, num_attention_heads=2)).eval()
    >>> base, expert, anti_expert = tiny(2, 0), tiny(1, 1), tiny(1, 2)
    >>> processor = ProxyTuningLogitsProcessor(expert, anti_expert, alpha=1.0, pad_token_id=0)
    >>> out = base.generate(torch.tensor([[3, 4, 5]]), logits_processor=[processor], max_new_tokens=4, do_sample=False)
    >>> out.shape
    torch.Size([1, 7])

    ```
    """

    def __init__(
        self,
        expert: PreTrainedModel | PromptedModel,
        anti_expert: PreTrainedModel | PromptedModel,
        alpha: float = 1.0,
        plausibility_top_p: float | None = None,
        attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        strict: bool = True,
    ):
        # Log-prob differences reach hundreds of nats: far larger strengths overflow float32 scores into NaN.
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not abs(alpha) <= MAX_ALPHA:
            raise ValueError(f"`alpha` must be a number between -{MAX_ALPHA:g} and {MAX_ALPHA:g}, got {alpha!r}.")
        if plausibility_top_p is not None and not (isinstance(plausibility_top_p, (int, float))
                                                   and 0 < plausibility_top_p <= 1):
            raise ValueError(f"`plausibility_top_p` must be in (0, 1] or None, got {plausibility_top_p!r}.")
        super().__init__([("expert", expert), ("anti-expert", anti_expert)], attention_mask, pad_token_id, tokenizer,
                         strict)
        self.alpha = float(alpha)
        self.plausibility_top_p = plausibility_top_p

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        expert, anti_expert = self.auxiliary_logits(input_ids, scores)
        return proxy_tuning_scores(scores, expert, anti_expert, self.alpha, self.plausibility_top_p).to(scores.dtype)
