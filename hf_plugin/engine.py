"""The engine of every decode-time method: a second model run beside `generate()` and kept in step with it.

`CachedModelRunner` keeps one model's KV cache in step with `generate()` (beams, padding, roll-backs);
`PromptPadding` tells which of `generate()`'s tokens are padding; `AuxiliaryModel` maps `generate()`'s ids onto a
model's own prompts; `AuxiliaryModelsLogitsProcessor` is the processor step every method shares (the Plugin one in
`hf_plugin.logits_process`, the related ones in `hf_plugin.methods`): each model's next-token logits, width checked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import logging

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
    cache; rows reordered, duplicated (beam search) or dropped (a finished request of a serving engine) gather the
    cache rows first; anything else (a new generation,
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
        if state is None:
            return 0, None, attention_mask_of(input_ids)
        cached = state.input_ids.shape[1]
        if length == cached + 1:  # each row continues a cached one: reordered, duplicated, or some rows gone
            matched, row_order = _match_rows(input_ids[:, :-1], state.input_ids)
            if matched:
                mask = state.attention_mask if row_order is None else state.attention_mask[row_order]
                return cached, row_order, torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        if state.input_ids.shape[0] != rows:
            return 0, None, attention_mask_of(input_ids)
        # Anything else: keep the longest prefix whose ids and mask agree in every row, but always re-run the
        # last token, since its logits are what the caller needs.
        mask = attention_mask_of(input_ids)
        shared = min(length - 1, cached)
        same = (input_ids[:, :shared] == state.input_ids[:, :shared]) & (mask[:, :shared] == state.attention_mask[:, :shared])
        start = int(same.long().cumprod(dim=1).sum(dim=1).min()) if shared > 0 else 0
        return start, None, mask


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
    >>> from hf_plugin.engine import PromptPadding
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


class PromptedModel:
    r"""
    A causal LM that reads its own rendering of the prompts instead of the base model's: e.g. an expert trained on a
    chat template sees the conversation in its template while the base sees raw text (as proxy-tuning does). The
    tokens `generate()` produces are appended to each model's own prompt. Give it wherever a processor of
    `hf_plugin.methods` takes a model.

    Row `i` of `input_ids` is the model's version of prompt `i` of the `generate()` call; rows may be left-padded
    (give their `attention_mask`) and of another length than the base's prompts. A processor holding a
    `PromptedModel` is bound to the prompts of the first `generate()` call it serves (it may serve them again, e.g.
    to sample anew); for other prompts build a new processor.

    Args:
        model (`PreTrainedModel`): the causal LM (a `PluginModel` or any `AutoModelForCausalLM`).
        input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`): its prompts.
        attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*): their mask; defaults to
            no padding.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from hf_plugin.methods import PromptedModel
    >>> expert = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    >>> chat = PromptedModel(expert, torch.tensor([[0, 9, 3, 4], [9, 6, 7, 8]]), torch.tensor([[0, 1, 1, 1], [1] * 4]))
    >>> chat.input_ids.shape
    torch.Size([2, 4])

    ```
    """

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"PromptedModel takes a causal LM (a PreTrainedModel), got {type(model).__name__}.")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"`input_ids` must be a (batch_size, prompt_length) tensor of the model's prompts, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` has "
                             f"{tuple(input_ids.shape)}.")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("The prompts must be left-padded: the last token of every row must be a real one.")
        self.model = model
        self.input_ids = input_ids.long()
        self.attention_mask = attention_mask.long()


def output_width(model: PreTrainedModel) -> int:
    """The number of logits a causal LM returns per position (its output layer's rows)."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


class AuxiliaryModel:
    """One auxiliary model of a processor: its runner, and how generate()'s ids map onto its own ids and mask.

    Args:
        model (`PreTrainedModel` or `PromptedModel`): the model, on the base's prompts or on its own.
        role (`str`): what the model is to the method (named in errors).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the base's tokenizer, to check the model against.
        strict (`bool`, *optional*, defaults to `True`): raise on a tokenizer mismatch instead of warning.
    """

    def __init__(self, model: PreTrainedModel | PromptedModel, role: str,
                 tokenizer: PreTrainedTokenizerBase | None = None, strict: bool = True):
        prompted = model if isinstance(model, PromptedModel) else None
        model = prompted.model if prompted else model
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"The {role} must be a causal LM (a PreTrainedModel or a PromptedModel), got "
                            f"{type(model).__name__}.")
        self.role = role
        self.prompted = prompted
        self.runner = CachedModelRunner(model)
        self._bound: torch.Tensor | None = None
        if isinstance(model, PluginModel):
            self.binding = model.config
            if tokenizer is not None:
                check_tokenizer(model.config, tokenizer, strict=strict)
        else:
            # A plain causal LM records no tokenizer: it must at least have a row for every token of the base's.
            real = len(tokenizer) if tokenizer is not None else None
            self.binding = SimpleNamespace(vocab_size=output_width(model), base_vocab_size=None,
                                           tokenizer_vocab_size=real)
            if real is not None and output_width(model) < real:
                message = (f"The {role} has {output_width(model)} output rows but the tokenizer has {real} tokens: it "
                           "cannot score every token of the base's vocabulary.")
                if strict:
                    raise ValueError(message + " Pass strict=False to use it anyway.")
                logger.warning(message + " Continuing because strict=False.")

    def reset(self) -> None:
        self.runner.reset()
        self._bound = None

    def next_token_logits(self, input_ids: torch.LongTensor, padding: PromptPadding) -> torch.Tensor:
        """The model's float32 next-token logits (its own width) for generate()'s sequences `input_ids`."""
        if self.prompted is None:
            return self.runner.next_token_logits(input_ids, padding)
        own_ids, own_mask = self._own_view(input_ids)
        return self.runner.next_token_logits(own_ids, lambda ids: own_mask)

    def _own_view(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """generate()'s sequences with the base's prompt replaced by this model's prompt, and their mask."""
        rows, length = input_ids.shape
        prompts, prompt_mask = self.prompted.input_ids.to(input_ids.device), self.prompted.attention_mask
        batch = prompts.shape[0]
        if rows % batch:
            raise ValueError(f"The {self.role} was given {batch} prompts of its own but generate() runs {rows} rows: "
                             "give one prompt per prompt of the generate() call.")
        repeats = rows // batch  # beams or returned sequences of each prompt, which generate() keeps together
        if self._bound is None:  # the first call of a generation holds the base's prompts alone
            self._bound = input_ids[::repeats].clone()
        bound = self._bound.to(input_ids.device)
        base_length = bound.shape[1]
        if length < base_length or not torch.equal(input_ids[:, :base_length], bound.repeat_interleave(repeats, dim=0)):
            raise ValueError(f"The {self.role}'s own prompts belong to the prompts of an earlier generate() call, not "
                             "to this one's: build a new processor for each batch of prompts.")
        own_ids = torch.cat([prompts.repeat_interleave(repeats, dim=0), input_ids[:, base_length:]], dim=1)
        own_mask = prompt_mask.to(input_ids.device).repeat_interleave(repeats, dim=0)
        own_mask = torch.cat([own_mask, own_mask.new_ones(rows, length - base_length)], dim=1)
        return own_ids, own_mask


class AuxiliaryModelsLogitsProcessor(LogitsProcessor):
    """What the processors of `hf_plugin.methods` share: padding, the auxiliary models and the width checks.

    A subclass gives its models with their roles and turns the base scores and the models' logits into new scores.

    Args:
        models (`Sequence[tuple[str, PreTrainedModel | PromptedModel]]`): (role, model) pairs.
        attention_mask, pad_token_id: the base prompts' padding, as for `PluginLogitsProcessor`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the base's tokenizer; every model is checked against it,
            and its `pad_token_id` is the default.
        strict (`bool`, *optional*, defaults to `True`): raise on a tokenizer or vocabulary mismatch.
    """

    supports_continuous_batching = False

    def __init__(self, models: Sequence[tuple[str, PreTrainedModel | PromptedModel]],
                 attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, strict: bool = True):
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        self.padding = PromptPadding(attention_mask, pad_token_id, owner=type(self).__name__)
        self.auxiliaries = [AuxiliaryModel(model, role, tokenizer, strict) for role, model in models]
        self.strict = strict
        self._checked_width: int | None = None

    def reset(self) -> None:
        """Forgets the models' caches and bound prompts. Never needed for correctness with the base's prompts."""
        for auxiliary in self.auxiliaries:
            auxiliary.reset()

    def auxiliary_logits(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> list[torch.Tensor]:
        """Every auxiliary model's float32 next-token logits, on the scores' device, in the models' own widths."""
        width = scores.shape[-1]
        if width != self._checked_width:
            for auxiliary in self.auxiliaries:
                check_scores_width([auxiliary.binding], width, self.strict, model_name=auxiliary.role)
            self._checked_width = width
        return [auxiliary.next_token_logits(input_ids, self.padding).to(scores.device) for auxiliary in self.auxiliaries]
