"""`PluginLogitsProcessor`: applies a reweighter inside any `model.generate()` call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import logging

from .combine import align_vocab, combine_logits
from .compatibility import check_tokenizer, check_vocab_width
from .modeling_plugin import (PluginModel, accepts_logits_to_keep, cache_keyword, output_cache,
                              position_ids_from_attention_mask)


logger = logging.get_logger(__name__)


@dataclass
class _RunnerState:
    """What a runner's KV cache currently holds: these ids, under this attention mask, the first `prompt_length`
    columns being the prompt of the generation."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: Cache
    prompt_length: int


class CachedModelRunner:
    r"""
    Runs a causal LM beside `generate()` with its own KV cache, and returns its next-token logits for whatever
    sequences it is shown: the engine of `PluginLogitsProcessor`, for any decode-time method that needs a second
    model's logits (a reweighter, a proxy-tuning expert, a mixture component).

    It works out from the ids alone what happened since its last call: one token appended to every row extends the
    cache; rows reordered or duplicated (beam search) gather the cache rows first; anything else (a new generation,
    assisted decoding rolling back) crops the cache to the longest prefix every row still shares, or rebuilds it.
    Left padding is handled with the masks given by `attention_mask_of`: padded rows see the positions an unpadded
    row would.

    A copy-aware reweighter (`PluginConfig.copy_mode`) is also given the whole sequences and where their prompt ends:
    the length of the sequences at the first call of a generation, kept while later calls extend, reorder or roll
    back past it. A call that keeps less of the cache than that prompt starts a new generation; a `generate()` call
    whose prompt continues the previous call's output is taken as the same generation unless `reset()` is called
    first (or a new processor is built).

    Args:
        model (`PreTrainedModel`): a causal LM (a `PluginModel` or any `AutoModelForCausalLM`), on any device or
            dtype; it is run under `torch.no_grad()` by the caller as needed and never modified.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from hf_plugin import CachedModelRunner
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)).eval()
    >>> runner = CachedModelRunner(model)
    >>> ids = torch.tensor([[0, 0, 7, 8], [5, 6, 7, 8]])  # the first row is left-padded with 0
    >>> mask_of = lambda ids: (ids != 0).long().cummax(dim=1).values
    >>> with torch.no_grad():
    ...     first = runner.next_token_logits(ids, mask_of)
    ...     step = runner.next_token_logits(torch.cat([ids, torch.tensor([[9], [9]])], dim=1), mask_of)
    ...     alone = model(torch.tensor([[7, 8, 9]])).logits[:, -1]
    >>> first.shape, bool(torch.allclose(step[0], alone[0], atol=1e-5))
    (torch.Size([2, 50]), True)

    ```
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.state: _RunnerState | None = None
        # Only the last position's logits are needed; skip the output layer elsewhere when the model can.
        self.last_logits_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        self.cache_keyword = cache_keyword(model)
        # A copy-aware reweighter also needs the ids its cache holds.
        self.reads_context = isinstance(model, PluginModel) and model.reads_context

    def reset(self) -> None:
        """Forgets the cache; the next call runs the whole sequence."""
        self.state = None

    def next_token_logits(
        self,
        input_ids: torch.LongTensor,
        attention_mask_of: Callable[[torch.LongTensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Runs the model on what its cache does not hold yet; returns float32 logits for the last position.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the whole sequences so far.
            attention_mask_of (`Callable`, *optional*): gives the full attention mask (1 real, 0 padding) of a batch
                of sequences; only called when the cache cannot simply be extended by one token. Without it no
                token is padding.

        Returns:
            `torch.Tensor` of shape `(batch_size, vocab_size)`.
        """
        device = self.model.device
        input_ids = input_ids.to(device)
        mask_of = attention_mask_of or torch.ones_like
        start, row_order, attention_mask = self._plan(input_ids, lambda ids: mask_of(ids).to(device))
        if start == 0:
            cache = DynamicCache()
        else:
            cache = self.state.cache
            if row_order is not None:
                cache.reorder_cache(row_order)
            _crop(cache, start)
        # An all-ones mask is passed as None: the model then need not build a padding mask at every step.
        padded = not bool(attention_mask.all())
        inputs = {}
        if padded:
            position_ids = position_ids_from_attention_mask(attention_mask)[:, start:]
            inputs = {"attention_mask": attention_mask, "position_ids": position_ids}
        same_generation = start > 0 and start >= self.state.prompt_length
        prompt_length = self.state.prompt_length if same_generation else input_ids.shape[1]
        if self.reads_context:
            inputs["context_ids"] = input_ids
            inputs["prompt_lengths"] = torch.full((input_ids.shape[0],), prompt_length, device=device)
        outputs = self.model(
            input_ids[:, start:], use_cache=True, **{self.cache_keyword: cache}, **inputs, **self.last_logits_only
        )
        # generate() may hand us views of buffers it later edits in place (beam search), so keep a copy.
        self.state = _RunnerState(input_ids.clone(), attention_mask, output_cache(outputs), prompt_length)
        logits = outputs.logits[:, -1].float()
        if not torch.isfinite(logits).all():
            raise FloatingPointError(
                f"The {type(self.model).__name__} produced NaN or infinite logits; its weights may be corrupt."
            )
        return logits

    def _plan(self, input_ids, attention_mask_of) -> tuple[int, torch.Tensor | None, torch.Tensor]:
        """Decides how much of the cache to keep: (tokens kept, row order to gather first, full attention mask)."""
        state = self.state
        rows, length = input_ids.shape
        if state is None or state.input_ids.shape[0] != rows:
            return 0, None, attention_mask_of(input_ids)
        cached = state.input_ids.shape[1]
        if length == cached + 1:
            matched, row_order = _match_rows(input_ids[:, :-1], state.input_ids)
            if matched:
                mask = state.attention_mask if row_order is None else state.attention_mask[row_order]
                return cached, row_order, torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        # Anything else: keep the longest prefix whose ids and mask agree in every row, but always re-run the
        # last token, since its logits are what the caller needs.
        mask = attention_mask_of(input_ids)
        shared = min(length - 1, cached)
        same = (input_ids[:, :shared] == state.input_ids[:, :shared]) & (mask[:, :shared] == state.attention_mask[:, :shared])
        start = int(same.long().cumprod(dim=1).sum(dim=1).min()) if shared > 0 else 0
        return start, None, mask


class PluginLogitsProcessor(LogitsProcessor):
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
        plugin (`PluginModel` or a sequence of them):
            The reweighter(s). Each may sit on another device or dtype than the scores, and each may read its own
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

    def __init__(
        self,
        plugin: PluginModel | Sequence[PluginModel],
        attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        alpha: float | None = None,
        alphas: Sequence[float] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        base_model: PreTrainedModel | None = None,
        strict: bool = True,
    ):
        # The related methods build on this module, hence the import here.
        from .methods.auxiliary import AuxiliaryModel, PromptedModel

        given = list(plugin) if isinstance(plugin, (list, tuple)) else [plugin]
        plugins = [p.model if isinstance(p, PromptedModel) else p for p in given]
        if not plugins or not all(isinstance(p, PluginModel) for p in plugins):
            raise TypeError(f"`plugin` must be a PluginModel or a non-empty sequence of them, got {plugin!r:.80}.")
        if alpha is not None and alphas is not None:
            raise ValueError("Pass either `alpha` (one strength for all) or `alphas` (one per reweighter), not both.")
        if alphas is None:
            alphas = [p.config.alpha if alpha is None else alpha for p in plugins]
        alphas = [float(a) for a in alphas]
        if len(alphas) != len(plugins):
            raise ValueError(f"Got {len(alphas)} alphas for {len(plugins)} reweighters.")
        if not all(a >= 0.0 for a in alphas):
            raise ValueError(f"`alpha`/`alphas` must be non-negative numbers, got {alphas}.")
        for p in plugins:
            if base_model is not None:
                p.check_compatible(base_model, tokenizer=tokenizer, strict=strict)
            elif tokenizer is not None:
                check_tokenizer(p.config, tokenizer, strict=strict)
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        self.padding = PromptPadding(attention_mask, pad_token_id, owner=type(self).__name__)
        self.runners = [AuxiliaryModel(p, "reweighter") for p in given]
        self.alphas = alphas
        self.strict = strict
        self._checked_width: int | None = None

    def reset(self) -> None:
        """Forgets the reweighters' caches; the next call starts afresh. Never needed for correctness."""
        for runner in self.runners:
            runner.reset()

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        width = scores.shape[-1]
        if width != self._checked_width:
            self._check_width(width)
        reweighter_logits = [
            align_vocab(runner.next_token_logits(input_ids, self.padding).to(scores.device), width)
            for runner in self.runners
        ]
        return combine_logits(scores, reweighter_logits, self.alphas).to(scores.dtype)

    def _check_width(self, width: int) -> None:
        check_scores_width([runner.binding for runner in self.runners], width, self.strict)
        self._checked_width = width


def check_scores_width(configs: Sequence, width: int, strict: bool = True, model_name: str = "reweighter") -> None:
    """`check_vocab_width` for every config; with `strict=False` a mismatch only logs a warning."""
    for config in configs:
        try:
            check_vocab_width(config, width, model_name=model_name)
        except ValueError as error:
            if strict:
                raise
            logger.warning(f"{error} Continuing because strict=False.")


class PromptPadding:
    r"""
    The attention mask of the sequences `generate()` hands a logits processor, worked out from their ids: what every
    processor that runs its own models beside `generate()` needs (the processor sees `input_ids`, never the mask).

    With `pad_token_id`, the leading pad tokens of each row are masked, which is exactly what tokenizers' left
    padding produces, for any prompts. With the prompts' `attention_mask`, the mask is bound to the first prompt
    batch it is called on; for other prompts later it falls back to `pad_token_id`, or raises if there is none.
    With neither, no token is padding.

    Args:
        attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*): the prompts' mask.
        pad_token_id (`int`, *optional*): the padding token's id.
        owner (`str`, *optional*, defaults to `"PluginLogitsProcessor"`): named in error messages.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.logits_process import PromptPadding
    >>> PromptPadding(pad_token_id=0)(torch.tensor([[0, 0, 5, 0], [4, 5, 6, 7]]))
    tensor([[0, 0, 1, 1],
            [1, 1, 1, 1]])

    ```
    """

    def __init__(self, attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
                 owner: str = "PluginLogitsProcessor"):
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[1] == 0):
            raise ValueError(
                f"`attention_mask` must have shape (batch_size, prompt_length), got {tuple(attention_mask.shape)}."
            )
        self.pad_token_id = pad_token_id
        self.owner = owner
        self._prompt_mask = None if attention_mask is None else attention_mask.long()
        self._bound_prompt: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor) -> torch.Tensor:
        rows, length = input_ids.shape
        if self._prompt_mask is not None:
            batch, prompt_length = self._prompt_mask.shape
            if self._bound_prompt is None:
                if rows % batch or length < prompt_length:
                    raise ValueError(
                        f"The attention_mask given to {self.owner} has shape {(batch, prompt_length)} but "
                        f"generate() was called on {rows} rows of {length} tokens. Pass the mask of the prompts given "
                        "to this generate() call."
                    )
                self._bound_prompt = input_ids[:, :prompt_length].clone()
            bound = self._bound_prompt.to(input_ids.device)
            if bound.shape[0] == rows and length >= prompt_length and torch.equal(input_ids[:, :prompt_length], bound):
                mask = self._prompt_mask.to(input_ids.device).repeat_interleave(rows // batch, dim=0)
                return torch.cat([mask, mask.new_ones(rows, length - prompt_length)], dim=1)
            if self.pad_token_id is None:
                raise ValueError(
                    f"{self.owner} was built with the attention_mask of other prompts than this generate() "
                    "call's. Pass `pad_token_id` (then each call's left padding is found from the ids) or build a "
                    "new processor for each batch of prompts."
                )
        if self.pad_token_id is not None:
            return left_padding_mask(input_ids, self.pad_token_id)
        return torch.ones_like(input_ids)


def left_padding_mask(input_ids: torch.LongTensor, pad_token_id: int) -> torch.Tensor:
    """The attention mask of left-padded rows: 0 on the leading `pad_token_id` tokens of each row, 1 after."""
    return (input_ids != pad_token_id).long().cummax(dim=1).values


def _match_rows(prefixes: torch.Tensor, cached: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
    """Finds, for each row of `prefixes`, a cached row with the same ids (beam search reorders rows).

    Returns `(True, None)` when the rows are unchanged, `(True, order)` when row `i` continues cached row
    `order[i]`, and `(False, None)` when some row continues none of them.
    """
    if torch.equal(prefixes, cached):
        return True, None
    equal = (prefixes[:, None, :] == cached[None, :, :]).all(dim=-1)
    if not bool(equal.any(dim=1).all()):
        return False, None
    return True, equal.long().argmax(dim=1)


def _crop(cache: Cache, keep: int) -> None:
    """Crops `cache` to its first `keep` tokens, checking the result: `crop`'s argument changed meaning across
    transformers releases (a length to keep, now a negative count to remove)."""
    length = cache.get_seq_length()
    if keep < length:
        cache.crop(keep - length)
    if cache.get_seq_length() != keep:
        raise RuntimeError(f"Could not crop the reweighter's cache from {length} to {keep} tokens.")
