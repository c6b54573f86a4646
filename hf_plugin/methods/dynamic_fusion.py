"""Dynamic Logit Fusion (Fan et al., NeurIPS 2024): weak-to-strong transfer from several small experts, choosing
at every step the expert and its strength whose effect on the large model matches its effect on the small base."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..combine import align_vocab
from ..engine import AuxiliaryModelsLogitsProcessor, PromptedModel, output_width


DEFAULT_ALPHA_GRID = tuple(i / 10 for i in range(21))  # 0.0, 0.1, ..., 2.0: the paper's grid


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dimension of finite log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def dynamic_fusion_scores(
    large_logits: torch.Tensor,
    small_base_logits: torch.Tensor,
    expert_logits: Sequence[torch.Tensor] | torch.Tensor,
    alpha_grid: Sequence[float] | torch.Tensor = DEFAULT_ALPHA_GRID,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic Logit Fusion's next-token log-probabilities, and the (expert, alpha) chosen for each row.

    With `P` the large model's distribution, `Q` the small base's and `Q_t` expert t's, every pair (t, α) of the
    experts and the grid gives `P̃ = softmax(log P + α (log Q_t − log Q))`; the pair minimising

        (KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))²

    is applied (one expert per step, as in the paper). The experts are searched one after the other, each over all
    rows and grid values at once (one `(grid, batch, vocab)` tensor at a time bounds memory), and the best pair so far
    is kept. Ties go to the first expert and the smallest α. The large model's scores
    are used on the columns the small models have; a column they lack gets `-inf`.

    Args:
        large_logits (`torch.Tensor` of shape `(batch, vocab_size)`): the large model's scores (`-inf` allowed).
        small_base_logits (`torch.Tensor` of shape `(batch, small_vocab_size)`): the small base's logits.
        expert_logits (sequence of `torch.Tensor` of shape `(batch, small_vocab_size)`): each expert's logits.
        alpha_grid (sequence of `float`, *optional*, defaults to 0.0, 0.1, ..., 2.0): the strengths searched.

    Returns:
        `tuple`: the log-probabilities `(batch, vocab_size)` in float32, the chosen expert's index `(batch,)` and
        the chosen α `(batch,)`.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.methods import dynamic_fusion_scores
    >>> large = torch.tensor([[1.0, 0.0, 0.0]])
    >>> small_base, expert = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    >>> _, chosen_expert, chosen_alpha = dynamic_fusion_scores(large, small_base, [expert])
    >>> int(chosen_expert), round(float(chosen_alpha), 1)   # the KLs of P's shift match Q's near alpha = 1
    (0, 1.1)

    ```
    """
    experts = torch.stack(list(expert_logits)) if not isinstance(expert_logits, torch.Tensor) else expert_logits
    grid = torch.as_tensor(alpha_grid, dtype=torch.float32, device=large_logits.device)
    width = large_logits.shape[-1]
    shared = min(width, small_base_logits.shape[-1])
    log_q = torch.log_softmax(small_base_logits.float(), dim=-1)
    log_p = torch.log_softmax(large_logits[..., :shared].float(), dim=-1)
    p = log_p.exp()
    best = torch.full(log_p.shape[:-1], float("inf"), device=log_p.device)
    chosen_expert = torch.zeros(log_p.shape[:-1], dtype=torch.long, device=log_p.device)
    chosen_alpha = torch.zeros(log_p.shape[:-1], device=log_p.device)
    steers = []
    for index, logits in enumerate(experts):
        log_qt = torch.log_softmax(logits.float(), dim=-1)
        target_forward, target_backward = _kl(log_qt, log_q), _kl(log_q, log_qt)
        steer = (log_qt - log_q)[..., :shared]
        steers.append(steer)
        # KL(P̃‖P) = α E_P̃[d] − log Z and KL(P‖P̃) = log Z − α E_P[d], with d the expert's steer and Z the
        # normaliser of P·exp(α d): no difference of -inf log-probs (tokens masked in P) is ever formed.
        # One exponential pass over (grid, batch, vocab), in place: the search is memory-bound.
        fused = torch.addcmul(log_p, grid[:, None, None], steer)
        peak = fused.amax(dim=-1, keepdim=True)
        weights = fused.sub_(peak).exp_()
        total = weights.sum(dim=-1)
        log_z = peak.squeeze(-1) + total.log()
        mean_tilde = torch.einsum("gbv,bv->gb", weights, steer) / total
        mean_p = (p * steer).sum(dim=-1)
        forward = grid[:, None] * mean_tilde - log_z
        backward = log_z - grid[:, None] * mean_p
        objective = (forward - target_forward) ** 2 + (backward - target_backward) ** 2
        value, position = objective.min(dim=0)
        better = value < best
        best = torch.where(better, value, best)
        chosen_expert = torch.where(better, index, chosen_expert)
        chosen_alpha = torch.where(better, grid[position], chosen_alpha)
    steer = torch.stack(steers).gather(0, chosen_expert[None, :, None].expand(1, *log_p.shape)).squeeze(0)
    fused = torch.log_softmax(log_p + chosen_alpha[:, None] * steer, dim=-1)
    return align_vocab(fused, width), chosen_expert, chosen_alpha


class DynamicLogitFusionLogitsProcessor(AuxiliaryModelsLogitsProcessor):
    r"""
    Dynamic Logit Fusion (Fan et al., *On Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits Fusion*,
    NeurIPS 2024): transfers what several small experts learned, each fine-tuned from the same small base, to a large
    model at decoding time. At every step and for every row it picks the expert t and strength α from `alpha_grid`
    whose shift of the large model's distribution P matches the expert's shift of the small base's Q:

        P̃ = softmax(log P + α (log Q_t − log Q)),  minimising  (KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))²

    and returns log P̃ for that single pair (the paper's procedure: each expert searched alone, the best kept). The
    search runs over all rows and grid values at once (`dynamic_fusion_scores`). The choices are recorded: after
    each call, `choices` gains `{"expert": LongTensor(batch), "alpha": Tensor(batch)}`.

    Every small model keeps its own KV cache beside `generate()` (one new token per step after the first), and may
    read its own prompts (`PromptedModel`).

    Args:
        experts (`PreTrainedModel`/`PromptedModel` or a sequence of them): the small experts.
        small_base (`PreTrainedModel` or `PromptedModel`): the small model the experts were fine-tuned from.
        alpha_grid (sequence of `float`, *optional*, defaults to 0.0, 0.1, ..., 2.0): the strengths searched.
        attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*): the prompts' mask.
        pad_token_id (`int`, *optional*): the padding id of the prompts; defaults to the tokenizer's.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the large model's tokenizer, checked against every model.
        strict (`bool`, *optional*, defaults to `True`): raise on a tokenizer or vocabulary mismatch.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_plugin import DynamicLogitFusionLogitsProcessor
    >>> def tiny(layers, seed):
    ...     torch.manual_seed(seed)
    ...     return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, pad_token_id=0,
    ...                                         num_hidden_layers=layers, num_attention_heads=2)).eval()
    >>> large, small_base, expert_a, expert_b = tiny(2, 0), tiny(1, 1), tiny(1, 2), tiny(1, 3)
    >>> processor = DynamicLogitFusionLogitsProcessor([expert_a, expert_b], small_base, pad_token_id=0)
    >>> out = large.generate(torch.tensor([[3, 4, 5]]), logits_processor=[processor], max_new_tokens=4)
    >>> len(processor.choices), sorted(processor.choices[0])
    (4, ['alpha', 'expert'])

    ```
    """

    def __init__(
        self,
        experts: PreTrainedModel | PromptedModel | Sequence[PreTrainedModel | PromptedModel],
        small_base: PreTrainedModel | PromptedModel,
        alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
        attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        strict: bool = True,
    ):
        experts = list(experts) if isinstance(experts, (list, tuple)) else [experts]
        if not experts:
            raise ValueError("`experts` must hold at least one model.")
        grid = [float(a) for a in alpha_grid] if isinstance(alpha_grid, (list, tuple, torch.Tensor)) else None
        if not grid or not all(math.isfinite(a) for a in grid):
            raise ValueError(f"`alpha_grid` must be a non-empty sequence of finite numbers, got {alpha_grid!r}.")
        roles = [("small base", small_base)] + [(f"expert {i}", expert) for i, expert in enumerate(experts)]
        super().__init__(roles, attention_mask, pad_token_id, tokenizer, strict)
        widths = {role: output_width(auxiliary.runner.model) for (role, _), auxiliary in zip(roles, self.auxiliaries)}
        if len(set(widths.values())) > 1:
            raise ValueError(f"The experts must share the small base's vocabulary, but their output widths differ: "
                             f"{widths}.")
        self.alpha_grid = torch.tensor(grid)
        self.choices: list[dict[str, torch.Tensor]] = []

    def reset(self) -> None:
        """Forgets the models' caches, bound prompts and recorded choices."""
        super().reset()
        self.choices.clear()

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        small_base, *experts = self.auxiliary_logits(input_ids, scores)
        fused, expert, alpha = dynamic_fusion_scores(scores, small_base, experts, self.alpha_grid)
        self.choices.append({"expert": expert.cpu(), "alpha": alpha.cpu()})
        return fused.to(scores.dtype)
