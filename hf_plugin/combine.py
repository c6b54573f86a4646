"""The one combination formula of hf-plugin.

    p(y_t | context) ∝ p_base(y_t | context) · r(y_t | context)^α

computed in log space as ``log_softmax(log_softmax(base) + α · log_softmax(reweighter))``. Training loss,
evaluation and the logits processor all call :func:`combine_logits`; nothing else in the package
re-implements it. This module depends on nothing else of ours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def check_alpha(alpha, name: str = "alpha") -> float:
    """`alpha` as a float, checked by the one rule for a reweighter's strength everywhere (config, processor,
    training): a finite number, at least 0 (0 is the base alone).

    Raises:
        `ValueError`: naming the parameter `name`, when `alpha` is negative, infinite, NaN or not a number.
    """
    try:
        strength = float(alpha)
    except (TypeError, ValueError):
        strength = math.nan
    if not (math.isfinite(strength) and strength >= 0.0):
        raise ValueError(f"`{name}` must be a non-negative finite number, got {alpha!r}.")
    return strength


def combine_logits(
    base_logits: torch.Tensor,
    reweighter_logits: torch.Tensor | Sequence[torch.Tensor],
    alpha: float | Sequence[float] = 1.0,
) -> torch.Tensor:
    """Combines base-model and reweighter next-token scores into normalised log-probabilities.

    With several reweighters (stacking), each one's distribution is raised to its own strength and all of them
    multiply the base: `p ∝ p_base · r_1^alpha_1 · r_2^alpha_2 · ...`.

    Args:
        base_logits (`torch.Tensor` of shape `(..., vocab_size)`):
            Raw logits or log-probabilities of the frozen base model. `-inf` entries (masked tokens) stay `-inf`.
        reweighter_logits (`torch.Tensor` or a sequence of them, each of shape `(..., vocab_size)`):
            Raw logits or log-probabilities of the reweighter(s), on the same vocabulary.
        alpha (`float` or a sequence of floats, *optional*, defaults to 1.0):
            Strength of each reweighter: 0 leaves the base alone, 1 is the paper's product, larger values sharpen
            it. A single number applies to every reweighter.

    Returns:
        `torch.Tensor`: combined log-probabilities, in at least float32, of the broadcast shape of the inputs.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.combine import combine_logits
    >>> base = torch.tensor([0.0, 0.0, float("-inf")])
    >>> reweighter = torch.tensor([2.0, 0.0, 5.0])
    >>> combine_logits(base, reweighter).exp().round(decimals=3)
    tensor([0.8810, 0.1190, 0.0000])

    ```
    """
    reweighters = [reweighter_logits] if isinstance(reweighter_logits, torch.Tensor) else list(reweighter_logits)
    alphas = [alpha] * len(reweighters) if isinstance(alpha, (int, float)) else list(alpha)
    if len(alphas) != len(reweighters):
        raise ValueError(f"Got {len(alphas)} alphas for {len(reweighters)} reweighters.")
    dtype = torch.promote_types(base_logits.dtype, torch.float32)
    combined = torch.log_softmax(base_logits.to(dtype), dim=-1)
    for logits, strength in zip(reweighters, alphas):
        if logits.shape[-1] != base_logits.shape[-1]:
            raise ValueError(
                f"base logits have {base_logits.shape[-1]} vocabulary entries but the reweighter's have "
                f"{logits.shape[-1]}; align them first (see `align_vocab`)."
            )
        combined = combined + strength * torch.log_softmax(logits.to(dtype), dim=-1)
    return torch.log_softmax(combined, dim=-1)


def align_vocab(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Returns `logits` with its last dimension cut or padded with `-inf` to `width` entries.

    A token that one model has no row for has probability zero under it, so its product with the other
    model is zero too: padding with `-inf` is the exact extension of the formula, not an approximation.
    Whether a given width difference is legitimate (padded embedding rows only) is decided by the caller,
    see `hf_plugin.compatibility.check_vocab_width`.

    Args:
        logits (`torch.Tensor` of shape `(..., vocab_size)`): scores to align.
        width (`int`): the number of vocabulary entries wanted.

    Returns:
        `torch.Tensor`: `logits` itself when the widths already agree, otherwise a new tensor.
    """
    current = logits.shape[-1]
    if current == width:
        return logits
    if current > width:
        return logits[..., :width]
    pad = logits.new_full((*logits.shape[:-1], width - current), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


def combine_topk_nll(
    reweighter_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    label_logprobs: torch.Tensor,
    alpha: float = 1.0,
    fill: int = 256,
    extra_ids: torch.Tensor | None = None,
    extra_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """NLL of `labels` under the combination when the base model is known only through some of its log-probs.

    The partial form of `combine_logits` for training from a cache (or an API that returns top-k log-probs).
    Known exactly: the base log-probs of the top-k tokens, of the label `y` and, optionally, of a fixed set of
    extra tokens (the task vocabulary: the tokens the task's completions use). The rest of the base mass,
    `m = 1 - Σ_{v known} p_base(v)`, lies on unknown tokens, each holding at most `c`, the smallest top-k
    probability (they are outside the top-k). The unknown tokens' share of the normaliser, `Σ_{v unknown} p_base(v)
    r(v)^α`, is therefore at most what pouring `m` in portions of `c` onto the unknown tokens the reweighter likes
    best gives (the first `fill` of them; the rest of `m` at the `fill`-th one's rate). That bound makes the result
    an upper bound on the true NLL (equal to it when the known tokens cover the vocabulary, up to the rounding of
    stored log-probs), and it stops the reweighter from piling mass on tokens the base ranks low, which ignoring the
    unknown mass would let it do (not measured here: `benchmarks/tail_treatments.py` compares the bound with other
    treatments of the unknown mass, see benchmarks/README.md, not with ignoring it). The more of the tokens the
    task uses are known, the less the bound costs: with the task vocabulary known, it only constrains tokens the
    task never uses.

    Args:
        reweighter_logits (`torch.Tensor` of shape `(N, vocab_size)`): reweighter logits at N positions.
        topk_ids (`torch.Tensor` of shape `(N, k)`): ids of the base model's top-k tokens.
        topk_logprobs (`torch.Tensor` of shape `(N, k)`): their base log-probabilities.
        labels (`torch.Tensor` of shape `(N,)`): the true next tokens.
        label_logprobs (`torch.Tensor` of shape `(N,)`): their base log-probabilities.
        alpha (`float`, *optional*, defaults to 1.0): strength of the reweighter.
        fill (`int`, *optional*, defaults to 256): unknown tokens given their own portion of the unknown mass.
        extra_ids (`torch.Tensor` of shape `(m,)` or `(N, m)`, *optional*): further tokens whose base log-probs
            are known (e.g. the task vocabulary, the same at every position); they may overlap the top-k.
        extra_logprobs (`torch.Tensor` of shape `(N, m)`, *optional*): their base log-probabilities.

    Returns:
        `torch.Tensor` of shape `(N,)`: the NLL at each position (float32 or wider).
    """
    if (extra_ids is None) != (extra_logprobs is None):
        raise ValueError("extra_ids and extra_logprobs go together: pass both or neither.")
    dtype = torch.promote_types(reweighter_logits.dtype, torch.float32)
    reweighter = torch.log_softmax(reweighter_logits.to(dtype), dim=-1)
    rows = len(labels)
    # The known tokens of each row, label first: its exact value wins over the rounded copy a token may also have
    # in the top-k or the extra tokens. Everything below works on these columns, not on the whole vocabulary.
    known_ids = [labels.long()[:, None], topk_ids.long()]
    known_logprobs = [label_logprobs.to(dtype)[:, None], topk_logprobs.to(dtype)]
    if extra_ids is not None:
        known_ids.append(extra_ids.long().expand(rows, -1))
        known_logprobs.append(extra_logprobs.to(dtype))
    known_ids, known_logprobs = torch.cat(known_ids, dim=-1), torch.cat(known_logprobs, dim=-1)
    known_logprobs = known_logprobs.masked_fill(_repeated(known_ids), float("-inf"))  # each token counted once
    tail_mass = (1.0 - known_logprobs.exp().sum(-1)).clamp(min=0.0)
    cap = topk_logprobs.to(dtype).min(dim=-1).values.exp()
    outside = reweighter.scatter(1, known_ids, float("-inf")).topk(min(fill, reweighter.shape[-1]), dim=-1).values
    tail_terms = _tail_bound_terms(outside, tail_mass, cap, alpha)
    known_terms = known_logprobs + alpha * reweighter.gather(1, known_ids)
    log_normaliser = torch.logsumexp(torch.cat([known_terms, tail_terms], dim=-1), dim=-1)
    return log_normaliser - known_terms[:, 0]


def _repeated(ids: torch.Tensor) -> torch.Tensor:
    """True where a row's id already occurred earlier in that row."""
    order = torch.sort(ids, dim=-1, stable=True)
    repeated_sorted = torch.zeros_like(ids, dtype=torch.bool)
    repeated_sorted[:, 1:] = order.values[:, 1:] == order.values[:, :-1]
    return torch.zeros_like(repeated_sorted).scatter(1, order.indices, repeated_sorted)


def _tail_bound_terms(outside, tail_mass, cap, alpha) -> torch.Tensor:
    """Log-terms whose sum bounds `Σ_{v unknown} p_base(v) r(v)^α` given `Σ p_base = tail_mass`, `p_base(v) ≤ cap`.

    `outside` holds the reweighter's log-probs of the unknown tokens it likes best, in descending order (-inf where
    there are fewer unknown tokens).
    """
    count = outside.shape[-1]
    poured = torch.arange(count, device=outside.device, dtype=outside.dtype)
    portions = (tail_mass[:, None] - poured * cap[:, None]).clamp(min=0.0).minimum(cap[:, None])
    rest = (tail_mass - count * cap).clamp(min=0.0)
    masses = torch.cat([portions, rest[:, None]], dim=-1)
    rates = torch.cat([outside, outside[:, -1:]], dim=-1)
    # Zero mass or no such token contributes nothing (and must not turn 0 · -inf into NaN).
    usable = (masses > 0) & torch.isfinite(rates)
    terms = masses.clamp(min=1e-30).log() + alpha * rates.clamp(min=-1e30)
    return torch.where(usable, terms, float("-inf"))
