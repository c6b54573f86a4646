"""`PluginModel`: the reweighter as a transformers `PreTrainedModel`."""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from huggingface_hub import CommitInfo, ModelCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from .combine import align_vocab, check_alpha, combine_logits
from .compatibility import check_base_model, check_vocab_width, renamed_keyword
from .configuration_plugin import PluginConfig
from .compact_head import CompactHead
from .copying import (apply_copy_mode, continuations, copy_set_columns, copy_set_first_occurrences, first_occurrences,
                      pointer_scores, pointer_scores_every, preceding_embeddings, uncopied_ids, whole_context,
                      word_form_occurrences, word_start_aliases, word_start_spellings)
from .initialization import first_layers
from .hub import (CARD_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, WEIGHTS_SHARD, card_sections, push_folder,
                  render_model_card, ships_custom_generate, write_remote_code)
# Some transformers releases (5.3, 5.8) copy only the direct relative imports of a remote-code model loaded from a
# folder: every module of the `with_code` copy is therefore imported here (tests/test_hub.py runs on 5.3 in CI).
from ._version import __version__  # noqa: F401
from .model_card_template import REWEIGHTER_CARD_TEMPLATE  # noqa: F401


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded row sees the positions an unpadded one would.

    Padding positions get position 0; they are masked out of attention anyway.
    """
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


logger = logging.get_logger(__name__)


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which `model.forward` takes a KV cache: `cache` from transformers 5.25 on (where
    `past_key_values` is deprecated), `past_key_values` before, and for `PluginModel` (its own argument)."""
    return _cache_keyword_of(type(model))


@functools.cache
def _cache_keyword_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def output_cache(outputs) -> Cache | None:
    """The KV cache a model's forward returned, under either name of the output field."""
    return outputs.cache if "cache" in type(outputs).__dataclass_fields__ else outputs.past_key_values


# The field name of the cache in transformers' output classes (renamed `cache` in 5.25).
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def next_token_nll(log_probs: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Mean NLL of `labels` (aligned with the inputs, shifted here as in transformers; -100 ignored)."""
    targets = labels[:, 1:].to(log_probs.device).reshape(-1)
    return F.nll_loss(log_probs[:, :-1].reshape(-1, log_probs.shape[-1]), targets, ignore_index=-100)


def _card_file(name_or_path: str | os.PathLike, subfolder: str = "", **hub_kwargs) -> str | None:
    """The model card beside a reweighter's weights (a folder's, or a Hub repository's at `revision`), or None where
    there is none or the Hub cannot be reached: the weights are already loaded, and the card is only their record."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, subfolder, CARD_FILE)
        return path if os.path.isfile(path) else None
    try:
        return hf_hub_download(str(name_or_path), CARD_FILE, subfolder=subfolder or None, **hub_kwargs)
    except EntryNotFoundError:  # missing there, or (offline, unreachable) not in the local cache
        return None


class PluginPreTrainedModel(PreTrainedModel):
    """Base class wiring `PluginConfig` into transformers' loading, saving and initialisation machinery."""

    config_class = PluginConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class PluginModel(PluginPreTrainedModel):
    r"""
    A reweighter: a small causal language model whose next-token distribution multiplies a frozen base model's,
    `p ∝ p_base · r^alpha`.

    The network itself is a transformers causal LM built from `config.backbone_config()` (the paper's 1-layer
    LLaMA-style decoder by default), held as `self.backbone`. Called without `base_logits` it is a plain causal
    LM; called with them it returns the combined log-probabilities and their loss.

    Args:
        config (`PluginConfig`): the reweighter's configuration.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin import PluginConfig, PluginModel
    >>> plugin = PluginModel(PluginConfig(vocab_size=100, hidden_size=32, intermediate_size=64))
    >>> input_ids = torch.tensor([[5, 6, 7, 8]])
    >>> base_logits = torch.randn(1, 4, 100)
    >>> out = plugin(input_ids, base_logits=base_logits, labels=input_ids)
    >>> out.logits.shape, bool(torch.allclose(out.logits.exp().sum(-1), torch.ones(1, 4)))
    (torch.Size([1, 4, 100]), True)
    >>> out.loss.ndim
    0

    ```
    """

    def __init__(self, config: PluginConfig):
        # What the caller asked for (e.g. `from_pretrained(..., attn_implementation=, dtype=)`), read before the
        # outer model resolves its own default attention: the backbone is the network that uses them. transformers
        # (5.3 to 5.25) has no public getter for a config's requested attention: `_attn_implementation` is the
        # property its own models read, and the backbone is no registered sub-config it would pass the value to.
        requested = {"attn_implementation": config._attn_implementation, "dtype": config.dtype}
        super().__init__(config)
        self.backbone = AutoModelForCausalLM.from_config(
            config.backbone_config(), **{key: value for key, value in requested.items() if value is not None}
        )
        if config.head_ids is not None:
            self.backbone.set_output_embeddings(CompactHead(config.hidden_size, config.vocab_size, config.head_ids))
        # One scalar per step for the ids already in the context (see `hf_plugin.copying`); zero at the start.
        self.copy_head = torch.nn.Linear(config.hidden_size, 1) if config.copy_mode is not None else None
        # The pointer (see `hf_plugin.copying`): a query read from the hidden state, keys from the embeddings before
        # each context column. The query starts at zero, so an untrained pointer changes nothing.
        self.copy_query = self.copy_keys = None
        if config.copy_pointer:
            key_size = max(config.hidden_size // 4, 1)
            width = self.get_input_embeddings().embedding_dim * config.copy_pointer
            self.copy_query = torch.nn.Linear(config.hidden_size, key_size, bias=False)
            self.copy_keys = torch.nn.Linear(width, key_size, bias=False)
        # Coverage: one more scalar per step for the prompt ids the output has written; zero at the start.
        self.copy_written = torch.nn.Linear(config.hidden_size, 1) if config.copy_coverage else None
        # Continuation: one more for the prompt ids after the last token written; zero at the start.
        self.copy_continue = torch.nn.Linear(config.hidden_size, 1) if config.copy_continuation else None
        # One value per word form (a piece's word start, a word spelled in 2, 3 pieces); zero at the start.
        self.copy_forms = torch.nn.Linear(config.hidden_size, config.copy_word_pieces) if config.copy_word_forms else None
        if config.copy_word_starts:  # saved with the weights: the table belongs to the tokenizer it was trained with
            self.register_buffer("copy_aliases", torch.full((config.vocab_size,), -1, dtype=torch.long))
        if config.copy_word_pieces > 1:
            self.register_buffer(
                "copy_word_spellings", torch.full((config.vocab_size, config.copy_word_pieces), -1, dtype=torch.long)
            )
        # What the model card was rendered from (training, metrics, evaluation, ...); kept across save and load.
        self.card_sections: dict = {}
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        if any(module is head for head in (self.copy_head, self.copy_query, self.copy_written, self.copy_continue,
                                           self.copy_forms)):
            torch.nn.init.zeros_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, **kwargs) -> PluginModel:
        """Loads a reweighter from a folder or a Hub repository (`revision=` honoured), safetensors only.

        Raises rather than return a half-loaded model: a config that is not a reweighter's, a weights file that
        cannot be read, or weights that do not match the config (missing, unexpected or mis-shaped tensors).
        Never reads a pickle (`.bin`) file and never runs code from the repository.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a folder or a Hub repository id.
            model_args, kwargs: as for `transformers.PreTrainedModel.from_pretrained` (`revision`, `cache_dir`,
                `local_files_only`, `token`, `dtype`, `device_map`, ...).
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("hf-plugin loads reweighters from safetensors only; pickle files are never read.")
        kwargs["use_safetensors"] = True
        kwargs.pop("trust_remote_code", None)  # this class is the code; nothing from the repository is run
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except SafetensorError as error:
            raise OSError(f"Cannot read the reweighter's weights in {pretrained_model_name_or_path}: {error}") from error
        problems = {key: info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
        if problems:
            raise ValueError(f"{pretrained_model_name_or_path} does not hold weights matching its config: {problems}")
        hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token", "subfolder") if k in kwargs}
        card_path = _card_file(pretrained_model_name_or_path, **hub_kwargs)
        model.card_sections = card_sections(ModelCard.load(card_path)) if card_path else {}
        return (model, info) if want_info else model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | None = None,
        model_card: dict | None = None,
        with_code: bool = False,
        **kwargs,
    ) -> None:
        """Writes `config.json`, `model.safetensors`, the model card `README.md` and, if given, the tokenizer.

        Args:
            save_directory (`str` or `os.PathLike`): the folder to write.
            tokenizer (`PreTrainedTokenizerBase`, *optional*): the tokenizer the reweighter was trained with.
            model_card (`dict`, *optional*): card sections to add or replace (see `hf_plugin.hub.render_model_card`);
                they are kept with the model (`self.card_sections`).
            with_code (`bool`, *optional*, defaults to `False`): also write the modeling code and an `auto_map`, so
                users without hf-plugin can load it with `trust_remote_code=True` (see `hf_plugin.hub.write_remote_code`),
                and, for a reweighter, `custom_generate/`, so that they can apply it with
                `base.generate(..., custom_generate=repo, trust_remote_code=True)` (see
                `hf_plugin.hub.write_custom_generate`).
            kwargs: as for `transformers.PreTrainedModel.save_pretrained`, except `push_to_hub` (use `push_to_hub`).
        """
        if kwargs.pop("push_to_hub", False):
            raise ValueError("Use `PluginModel.push_to_hub(repo_id)`: it uploads what save_pretrained writes, card included.")
        if Path(save_directory).is_dir():  # weights of an earlier save (sharded or not) must not be loaded instead
            for path in Path(save_directory).iterdir():
                if path.name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE) or WEIGHTS_SHARD.match(path.name):
                    path.unlink()
        super().save_pretrained(save_directory, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        self.card_sections = {**self.card_sections, **(model_card or {})}
        custom_generate = ships_custom_generate(self.card_sections, with_code)
        self.card_sections.pop("custom_generate", None)  # what this save writes decides, not an earlier card
        if custom_generate:
            self.card_sections["custom_generate"] = True
        sections = {**self.card_sections, "num_parameters": self.num_parameters()}
        render_model_card(self.config, sections).save(Path(save_directory) / CARD_FILE)
        if with_code:
            write_remote_code(save_directory, custom_generate=custom_generate)

    def push_to_hub(
        self,
        repo_id: str,
        tokenizer: PreTrainedTokenizerBase | None = None,
        model_card: dict | None = None,
        with_code: bool = False,
        revision: str | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
    ) -> CommitInfo:
        """Uploads exactly what `save_pretrained` writes — weights, config, tokenizer and this library's model card.

        Unlike the inherited transformers method, the card is ours, never replaced by a generic one.

        Args:
            repo_id (`str`): the Hub repository, created if missing.
            tokenizer, model_card, with_code: as for `save_pretrained`.
            revision, commit_message, private, token, create_pr: as for `hf_plugin.hub.push_folder`.
        """
        with tempfile.TemporaryDirectory() as directory:
            self.save_pretrained(directory, tokenizer=tokenizer, model_card=model_card, with_code=with_code)
            return push_folder(
                directory, repo_id, revision=revision, commit_message=commit_message, private=private, token=token,
                create_pr=create_pr, with_code=with_code,
            )

    @classmethod
    def from_causal_lm(cls, model: PreTrainedModel, **config_kwargs) -> PluginModel:
        """Builds a reweighter initialised from an existing (e.g. pretrained) causal LM.

        The paper's best reweighter was a pretrained GPT-2 small sharing the base model's tokenizer. The
        weights are copied; `model` itself is left untouched.

        Args:
            model (`PreTrainedModel`): a causal LM (any architecture `AutoModelForCausalLM` knows).
            config_kwargs: further `PluginConfig` arguments, e.g. `alpha` or the base-model binding
                (see `hf_plugin.binding_kwargs`).

        Returns:
            `PluginModel`: a new reweighter in float32 with `model`'s architecture and weights.
        """
        config = PluginConfig(backbone=model.config.to_dict(), **config_kwargs)
        plugin = cls(config)
        plugin.backbone.load_state_dict(model.state_dict())
        return plugin

    @classmethod
    def from_base_layers(cls, model: PreTrainedModel, num_layers: int, **config_kwargs) -> PluginModel:
        """Builds a reweighter from a base model's input embeddings, first `num_layers` decoder layers, final norm
        and output head (see `hf_plugin.first_layers`): possible when the base model's weights are at hand.

        Args:
            model (`PreTrainedModel`): the (open) base model; left untouched.
            num_layers (`int`): how many of its decoder layers to copy.
            config_kwargs: further `PluginConfig` arguments, as for `from_causal_lm`.

        Returns:
            `PluginModel`: a new reweighter in float32.
        """
        return cls.from_causal_lm(first_layers(model, num_layers), **config_kwargs)

    def check_compatible(
        self, base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, strict: bool = True
    ) -> None:
        """Checks that this reweighter can be used with `base_model` (and `tokenizer`).

        Compares the recorded binding with what it is attached to: vocabulary width and tokenizer fingerprint
        (a mismatch raises, naming both sides, unless `strict=False`), and the base model's name (another name
        logs one warning: a reweighter may transfer to a sibling model sharing the tokenizer).

        Args:
            base_model (`PreTrainedModel`): the base model.
            tokenizer (`PreTrainedTokenizerBase`, *optional*): the tokenizer used with it.
            strict (`bool`, *optional*, defaults to `True`): raise on a vocabulary or tokenizer mismatch.
        """
        check_base_model(self.config, base_model, tokenizer=tokenizer, strict=strict)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.backbone.set_output_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        base_logits: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        alpha: float | None = None,
        logits_to_keep: int = 0,
        context_ids: torch.LongTensor | None = None,
        prompt_lengths: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, past_length + sequence_length)`, *optional*):
                1 for real tokens, 0 for padding. Left-padded rows give the same results as unpadded ones.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Defaults to counting the real tokens of `attention_mask` when it is given.
            past_key_values (`Cache`, *optional*): the reweighter's own KV cache.
            use_cache (`bool`, *optional*): whether to return the updated cache.
            base_logits (`torch.Tensor` of shape `(batch_size, sequence_length, base_vocab_size)`, *optional*):
                The frozen base model's raw logits or log-probabilities at the same positions. When given,
                `.logits` are the combined log-probabilities and `.loss` their NLL.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets aligned with `input_ids` (shifted inside, as in transformers); -100 is ignored.
            alpha (`float`, *optional*): strength for this call; defaults to `config.alpha`.
            logits_to_keep (`int`, *optional*, defaults to 0):
                Compute the reweighter's own logits for the last `logits_to_keep` positions only (0: all). Saves
                the output layer's work when only the next token matters; not combinable with `base_logits`
                or `labels`. (Training selects arbitrary positions with `completion_logits` instead.)
            context_ids (`torch.LongTensor` of shape `(batch_size, past_length + sequence_length)`, *optional*):
                The whole sequences so far, ending with `input_ids`, for a reweighter with a `copy_mode` run on a
                KV cache (the ids in the cache are part of its context). Defaults to `input_ids` when there is no
                cache; ignored without a copy mode. `attention_mask` (the full one) marks its padding.
            prompt_lengths (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                For `copy_source="prompt"`: how many columns of `context_ids` (padding included) are the prompt in
                each row. Defaults to the columns before the first label when `labels` are given; otherwise needed.

        Returns:
            `CausalLMOutputWithPast`: `.logits` of shape `(batch_size, sequence_length, vocab)` (the last
            `logits_to_keep` positions when given) are the reweighter's own logits, exactly as its backbone's
            forward returns them, without `base_logits`; with them they are the combined log-probabilities (the
            width of `base_logits`). `.loss` is set when `labels` are.
        """
        if logits_to_keep and (base_logits is not None or labels is not None):
            raise ValueError("`logits_to_keep` cannot be combined with `base_logits` or `labels`.")
        self._check_positions(input_ids, attention_mask, position_ids, past_key_values)
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        if position_ids is None and attention_mask is not None:
            position_ids = position_ids_from_attention_mask(attention_mask)[:, -input_ids.shape[1] :]
        copying = self.config.copy_mode is not None
        if copying:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            context_ids = whole_context(input_ids, context_ids, past)
            kwargs["output_hidden_states"] = True
        kwargs[cache_keyword(self.backbone)] = past_key_values
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        logits = outputs.logits
        if copying:
            kept = logits.shape[1]
            if prompt_lengths is None and labels is not None and self.config.copy_source == "prompt":
                prompt_lengths = (labels != -100).long().argmax(dim=1)
            first = self._first_occurrences(context_ids, logits.shape[-1], attention_mask, prompt_lengths)
            positions = torch.arange(context_ids.shape[1] - kept, context_ids.shape[1], device=first.device)
            present = first[:, None, :] <= positions[None, :, None]
            pointer = self._pointer(context_ids, attention_mask, prompt_lengths, outputs.hidden_states[-1][:, -kept:])
            written = self._written(context_ids, attention_mask, prompt_lengths, logits.shape[-1])
            if written is not None:
                written = written[:, None, :] <= positions[None, :, None]
            continuing = self._continuing(context_ids, attention_mask, prompt_lengths, positions)
            forms = self._word_forms(context_ids, attention_mask, prompt_lengths)
            if forms is not None:
                forms = forms[:, None] <= positions[None, :, None, None]
            logits = self._copy(logits, outputs.hidden_states[-1][:, -kept:], present, pointer, written, continuing,
                                forms)
        if base_logits is not None:
            if base_logits.shape[:2] != input_ids.shape:
                raise ValueError(
                    f"`base_logits` must have shape (batch, sequence, vocab) matching input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(base_logits.shape)}."
                )
            check_vocab_width(self.config, base_logits.shape[-1])
            base_logits = base_logits.to(logits.device)
            logits = align_vocab(logits, base_logits.shape[-1])
            logits = combine_logits(base_logits, logits, self.config.alpha if alpha is None else alpha)

        loss = None
        if labels is not None:
            loss = next_token_nll(logits if base_logits is not None else logits.float().log_softmax(-1), labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: output_cache(outputs)})

    def completion_logits(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, logits_mask: torch.Tensor
    ) -> torch.Tensor:
        r"""The reweighter's own logits at the positions where `logits_mask` is true: what training needs.

        Equal to `self(input_ids, attention_mask=attention_mask).logits[logits_mask]` for every backbone, including
        those whose head post-processes logits (Gemma-2's final soft-capping, Granite's `logits_scaling`), but the
        output layer — most of the work with a large vocabulary — skips the positions that carry no loss. The
        default LLaMA-style reweighter's head is its output layer alone, so it runs on the selected positions only;
        another backbone runs its own forward with `logits_to_keep` set to the columns holding any selected position.
        Call it through `CompletionLogits` when training with several processes.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding.
            logits_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): the positions to score, e.g.
                `hf_plugin.completions.loss_positions(labels)`.

        Returns:
            `torch.Tensor` of shape `(num_selected, vocab_size)`: one row per selected position, in row-major order.
        """
        if logits_mask.shape != input_ids.shape:
            raise ValueError(
                f"`logits_mask` must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(logits_mask.shape)}."
            )
        self._check_positions(input_ids, attention_mask, None, None)
        position_ids = position_ids_from_attention_mask(attention_mask) if attention_mask is not None else None
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}
        mask = logits_mask.to(device=input_ids.device, dtype=torch.bool)
        if self.config.backbone is None:
            hidden = self.backbone.base_model(**inputs).last_hidden_state[mask]
            logits = self.backbone.get_output_embeddings()(hidden)
        else:
            if self.config.copy_mode is not None:
                inputs["output_hidden_states"] = True
            if not accepts_logits_to_keep(self.backbone):
                outputs = self.backbone(**inputs)
                logits = outputs.logits[mask]
            else:
                columns = mask.any(dim=0).nonzero().squeeze(1)
                outputs = self.backbone(**inputs, logits_to_keep=columns)
                logits = outputs.logits[mask[:, columns]]
            hidden = outputs.hidden_states[-1][mask] if self.config.copy_mode is not None else None
        if self.config.copy_mode is None:
            return logits
        rows, positions = mask.nonzero(as_tuple=True)
        # The prompt of a row ends where its first scored position predicts the first completion token.
        prompt_lengths = mask.long().argmax(dim=1) + 1
        first = self._first_occurrences(input_ids, logits.shape[-1], attention_mask, prompt_lengths)
        pointer = None
        if self.config.copy_pointer:  # each row's queries against its own keys (no per-position copy of the index)
            keys, where = self._pointer_keys(input_ids, attention_mask, prompt_lengths)
            pointer = torch.cat([self._pointer_scores(states[None], keys[row : row + 1], where[row : row + 1])[0]
                                 for row, states in enumerate(hidden.split(mask.sum(dim=1).tolist()))])
        written = self._written(input_ids, attention_mask, prompt_lengths, logits.shape[-1])
        if written is not None:
            written = written[rows] <= positions[:, None]
        continuing = self._continuing(input_ids, attention_mask, prompt_lengths, positions, rows)
        forms = self._word_forms(input_ids, attention_mask, prompt_lengths)
        if forms is not None:
            forms = forms[rows] <= positions[:, None, None]
        return self._copy(logits, hidden, first[rows] <= positions[:, None], pointer, written, continuing, forms)

    def set_copy_aliases(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Fills the word-start tables of a `copy_word_starts` reweighter from the base's tokenizer (see
        `hf_plugin.copying.word_start_aliases` and `word_start_spellings`); `hf-plugin train` does it."""
        if not self.config.copy_word_starts:
            raise ValueError("This reweighter has no word-start table: its config has copy_word_starts=False.")
        aliases = word_start_aliases(tokenizer)[: self.config.vocab_size]
        self.copy_aliases.fill_(-1)
        self.copy_aliases[: len(aliases)] = aliases.to(self.copy_aliases.device)
        if self.config.copy_word_pieces > 1:
            spellings = word_start_spellings(tokenizer, self.config.copy_word_pieces)[: self.config.vocab_size]
            self.copy_word_spellings.fill_(-1)
            self.copy_word_spellings[: len(spellings)] = spellings.to(self.copy_word_spellings.device)

    def ignore_uncopied_ids(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        min_fraction: float = 0.1,
        max_copy_rate: float = 0.05,
        judge_word_starts: bool = False,
    ) -> list[int]:
        """Adds to `config.copy_ignore_ids` the ids that training prompts hold but their completions do not repeat
        (the rule: `hf_plugin.copying.uncopied_ids`), and records the arguments in `config.copy_ignore_uncopied`.

        They leave the copy sets after aliases and spellings, so the reweighter keeps its say over them. Only ids
        written in the prompts are judged, unless `judge_word_starts`: the word-start forms their aliases and
        spellings bring are then judged too (`ĠThe` of the many E2E names that begin with `The`).
        Call it on the training pairs before training (after `set_copy_aliases`); `hf-plugin train
        --copy-ignore-uncopied` does.

        Args:
            pairs, min_fraction, max_copy_rate: as `hf_plugin.copying.uncopied_ids`.
            judge_word_starts (`bool`, *optional*, defaults to `False`): judge the word-start forms in the copy sets.

        Returns:
            `list[int]`: the ids added, in increasing order.
        """
        if self.config.copy_mode is None:
            raise ValueError("Only a reweighter with a `copy_mode` has copy sets.")
        chosen = uncopied_ids(pairs, self.config.vocab_size, min_fraction, max_copy_rate,
                              copy_sets=self._first_occurrences if judge_word_starts else None, device=self.device)
        ignored = set(self.config.copy_ignore_ids or [])
        self.config.copy_ignore_ids = sorted(ignored | set(chosen))
        self.config.copy_ignore_uncopied = {"min_fraction": float(min_fraction), "max_copy_rate": float(max_copy_rate),
                                            "judge_word_starts": bool(judge_word_starts)}
        return sorted(set(chosen) - ignored)

    @property
    def reads_context(self) -> bool:
        """Whether the logits depend on which ids the context holds (a `copy_mode`): a cached runner then passes the
        whole sequence as `context_ids`."""
        return self.config.copy_mode is not None

    def _copy_tables(self) -> dict:
        return {"aliases": self.copy_aliases if self.config.copy_word_starts else None,
                "spellings": self.copy_word_spellings if self.config.copy_word_pieces > 1 else None}

    def _first_occurrences(self, context_ids, vocab_size, context_mask, prompt_lengths, last=False) -> torch.LongTensor:
        return copy_set_first_occurrences(self.config, context_ids, vocab_size, context_mask, prompt_lengths,
                                          last=last, **self._copy_tables())

    def _pointer_keys(self, context_ids, context_mask, prompt_lengths) -> tuple[torch.Tensor, torch.LongTensor]:
        """One pointer key per prompt column, and where each id's score is read: the column of its last occurrence,
        or with `copy_pointer_occurrences="every"` the ids each column brings (see `hf_plugin.copying`)."""
        columns = int(torch.as_tensor(prompt_lengths).max())
        context_ids = context_ids[:, :columns]
        context_mask = context_mask[:, :columns] if context_mask is not None else None
        if self.config.copy_pointer_occurrences == "every":
            where = copy_set_columns(self.config, context_ids, self.config.vocab_size, context_mask, prompt_lengths,
                                     **self._copy_tables())
        else:
            where = self._first_occurrences(context_ids, self.config.vocab_size, context_mask, prompt_lengths, last=True)
        embeddings = self.get_input_embeddings()
        embedded = embeddings(context_ids.clamp(0, embeddings.num_embeddings - 1).to(embeddings.weight.device))
        return self.copy_keys(preceding_embeddings(embedded, context_mask, self.config.copy_pointer)), where

    def _pointer_scores(self, hidden: torch.Tensor, keys: torch.Tensor, where: torch.LongTensor) -> torch.Tensor:
        query = self.copy_query(hidden.to(keys.dtype))
        if self.config.copy_pointer_occurrences == "every":
            return pointer_scores_every(query, keys, where, self.config.vocab_size)
        return pointer_scores(query, keys, where)

    def _pointer(self, context_ids, context_mask, prompt_lengths, hidden) -> torch.Tensor | None:
        if not self.config.copy_pointer:
            return None
        return self._pointer_scores(hidden, *self._pointer_keys(context_ids, context_mask, prompt_lengths))

    def _written(self, context_ids, context_mask, prompt_lengths, vocab_size) -> torch.LongTensor | None:
        """With coverage, where each id is first written after the prompt (`length` where it is not)."""
        if not self.config.copy_coverage:
            return None
        columns = torch.arange(context_ids.shape[1], device=context_ids.device)
        after = columns[None, :] >= torch.as_tensor(prompt_lengths, device=context_ids.device).view(-1, 1)
        return first_occurrences(context_ids, vocab_size, after if context_mask is None else after & context_mask.bool())

    def _continuing(self, context_ids, context_mask, prompt_lengths, positions, rows=None) -> torch.Tensor | None:
        """With continuation, the prompt ids that follow, somewhere in the prompt, the token a scored position ends
        with when the output wrote it: `positions` of every row, or with `rows` one position of each given row."""
        if not self.config.copy_continuation:
            return None
        brought, following = copy_set_columns(self.config, context_ids, self.config.vocab_size, context_mask,
                                              prompt_lengths, following=True, **self._copy_tables())
        one_each = rows is not None
        if one_each:
            brought, following = brought[rows], following[rows]
            rows, columns = rows[:, None], positions[:, None]
        else:
            rows, columns = torch.arange(context_ids.shape[0], device=context_ids.device)[:, None], positions[None, :]
        written = columns >= torch.as_tensor(prompt_lengths, device=context_ids.device)[rows]
        if context_mask is not None:
            written &= context_mask.to(context_ids.device).bool()[rows, columns]
        last = torch.where(written, context_ids[rows, columns], -1)
        continuing = continuations(brought, following, last, self.config.vocab_size)
        return continuing[:, 0] if one_each else continuing

    def _word_forms(self, context_ids, context_mask, prompt_lengths) -> torch.LongTensor | None:
        """With word forms, where each id first joins the copy set in each form (`word_form_occurrences`)."""
        if not self.config.copy_word_forms:
            return None
        return word_form_occurrences(self.config, context_ids, self.config.vocab_size, context_mask, prompt_lengths,
                                     **self._copy_tables())

    def _copy(self, logits: torch.Tensor, hidden: torch.Tensor, present: torch.Tensor,
              pointer: torch.Tensor | None = None, written: torch.Tensor | None = None,
              continuing: torch.Tensor | None = None, forms: torch.Tensor | None = None) -> torch.Tensor:
        gate = self.copy_head(hidden.to(self.copy_head.weight.dtype))
        if pointer is not None:  # one value per id instead of one per step
            gate = gate + pointer.to(gate.device)
        if written is not None:  # the prompt ids written so far: one more value per step
            gate = gate + self.copy_written(hidden.to(gate.dtype)) * written.to(gate.device)
        if continuing is not None:  # the prompt ids that continue the last token written: one more
            gate = gate + self.copy_continue(hidden.to(gate.dtype)) * continuing.to(gate.device)
        if forms is not None:  # which form brought each id (shape (..., forms, vocab)): one value per form
            values = self.copy_forms(hidden.to(gate.dtype))
            for form in range(values.shape[-1]):
                gate = gate + values[..., form : form + 1] * forms.select(-2, form).to(gate.device)
        return apply_copy_mode(self.config.copy_mode, logits, gate, present.to(logits.device))

    def _check_positions(self, input_ids, attention_mask, position_ids, past_key_values) -> None:
        """Raises when a sequence is longer than the reweighter's `max_position_embeddings`."""
        limit = self.config.max_position_embeddings
        if position_ids is not None:
            longest = int(position_ids.max()) + 1
        elif attention_mask is not None:
            longest = int(attention_mask.sum(-1).max())
        else:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            longest = past + input_ids.shape[1]
        if longest > limit:
            raise ValueError(
                f"The sequence has {longest} tokens but the reweighter accepts at most "
                f"max_position_embeddings={limit}. Shorten the prompt or `max_new_tokens`."
            )
        trained = self.config.trained_max_length
        if trained is not None and longest > trained:
            # Once per trained length, not per sequence length: generation grows the sequence at every step.
            logger.warning_once(
                f"Sequences longer than any the reweighter was trained on ({trained} tokens) run on positions it "
                "never saw (RoPE extrapolates; learned position embeddings do not)."
            )


class CompletionLogits(torch.nn.Module):
    """`PluginModel.completion_logits` as a module's `forward`, for training with Accelerate.

    Distributed data parallel synchronises gradients only through the forward of the module it wraps, so the
    trainer prepares this wrapper rather than the reweighter itself.

    Args:
        reweighter (`PluginModel`): the reweighter, available as `.plugin` (e.g. to save it).
    """

    @renamed_keyword("plugin", "reweighter")
    def __init__(self, reweighter: PluginModel):
        super().__init__()
        self.plugin = reweighter

    def forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, logits_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.plugin.completion_logits(input_ids, attention_mask, logits_mask)


def accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    """Whether a causal LM's forward takes `logits_to_keep` (to run its output layer on some positions only)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@renamed_keyword("plugins", "reweighters")
def score_with_reweighters(
    reweighters: Sequence[PluginModel],
    input_ids: torch.LongTensor,
    base_logits: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    alphas: Sequence[float] | None = None,
    labels: torch.LongTensor | None = None,
    prompt_lengths: torch.LongTensor | None = None,
) -> CausalLMOutputWithPast:
    """Scores whole sequences under a base model and several stacked reweighters, `p ∝ p_base · Π_i r_i^alpha_i`.

    The offline counterpart of `PluginLogitsProcessor([r1, r2, ...], alphas=[...])`.

    Args:
        reweighters (`Sequence[PluginModel]`): the reweighters (a parameter formerly named `plugins`).
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids.
        base_logits (`torch.Tensor` of shape `(batch_size, sequence_length, base_vocab_size)`):
            the base model's raw logits or log-probabilities at the same positions.
        attention_mask (`torch.Tensor`, *optional*): 1 for real tokens, 0 for padding.
        alphas (`Sequence[float]`, *optional*): one strength per reweighter; defaults to each config's `alpha`.
        labels (`torch.LongTensor`, *optional*): targets aligned with `input_ids`; -100 is ignored.
        prompt_lengths (`torch.LongTensor` of shape `(batch_size,)`, *optional*): where each row's prompt ends, for
            reweighters with `copy_source="prompt"` (see `PluginModel.forward`).

    Returns:
        `CausalLMOutputWithPast`: `.logits` are the combined log-probabilities, `.loss` the NLL of `labels`.
    """
    if base_logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"`base_logits` must have shape (batch, sequence, vocab) matching input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(base_logits.shape)}."
        )
    alphas = [r.config.alpha for r in reweighters] if alphas is None else [check_alpha(a, "alphas") for a in alphas]
    if prompt_lengths is None and labels is not None:  # the prompt ends where the labels begin
        prompt_lengths = (labels != -100).long().argmax(dim=1)
    width = base_logits.shape[-1]
    reweighter_logits = []
    for reweighter in reweighters:
        check_vocab_width(reweighter.config, width)
        device = reweighter.device
        mask = attention_mask.to(device) if attention_mask is not None else None
        logits = reweighter(input_ids.to(device), attention_mask=mask, prompt_lengths=prompt_lengths).logits
        reweighter_logits.append(align_vocab(logits.to(base_logits.device), width))
    combined = combine_logits(base_logits, reweighter_logits, alphas)
    loss = next_token_nll(combined, labels) if labels is not None else None
    return CausalLMOutputWithPast(loss=loss, logits=combined)
