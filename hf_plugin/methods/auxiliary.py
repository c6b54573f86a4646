"""The auxiliary models of the logit-level methods: each kept in step with `generate()` by its own
`CachedModelRunner`, each on its own prompts when it has them, each checked against the base's vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from ..combine import align_vocab
from ..compatibility import check_tokenizer
from ..logits_process import CachedModelRunner, PromptPadding, check_scores_width
from ..modeling_plugin import PluginModel


logger = logging.get_logger(__name__)


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


def aligned_log_softmax(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Float32 log-probabilities over the model's own vocabulary, cut or padded with -inf to `width` columns."""
    return align_vocab(torch.log_softmax(logits.float(), dim=-1), width)
