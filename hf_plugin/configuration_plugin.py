"""`PluginConfig`: the reweighter's architecture, its strength α, and its binding to a base model."""

from __future__ import annotations

import inspect
from typing import Any

from transformers import AutoConfig, LlamaConfig, PreTrainedConfig
from transformers.utils import logging

from ._version import __version__
from .combine import check_alpha
from .copying import COPY_MODES, COPY_SOURCES, POINTER_OCCURRENCES


logger = logging.get_logger(__name__)


# Architecture fields a saved config must carry when it has no `backbone` (defaults would silently differ).
_REQUIRED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings",
)
# Keys transformers itself may write into any config.json, besides the `PreTrainedConfig` dataclass fields.
_TRANSFORMERS_KEYS = {
    "model_type", "auto_map", "_name_or_path", "name_or_path", "torch_dtype", "attn_implementation",
    "output_attentions", "experts_implementation", "use_cache", "tie_word_embeddings", "pad_token_id",
    "bos_token_id", "eos_token_id", "quantization_config", "_commit_hash",
}


def _known_config_keys() -> set[str]:
    own = set(inspect.signature(PluginConfig.__init__).parameters) - {"self", "kwargs"}
    # What a plain config writes (its fields differ between transformers releases), and the legacy RoPE key.
    return own | set(PreTrainedConfig().to_dict()) | _TRANSFORMERS_KEYS | {"rope_theta"}


# The fields of the default LLaMA-style reweighter, named as in `LlamaConfig`.
_LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "max_position_embeddings", "rope_parameters", "rms_norm_eps", "hidden_act", "initializer_range",
)


class PluginConfig(PreTrainedConfig):
    r"""
    Configuration of a reweighter: a small autoregressive model whose next-token distribution multiplies the
    frozen base model's (Hiranandani et al., ICML 2025, "Logits are All We Need to Adapt Closed Models").

    By default the reweighter is the paper's LLaMA-style decoder (1 layer, hidden size 256, 1 head, MLP 1024,
    RoPE) built from the fields below. Any other causal-LM architecture (for example a pretrained GPT-2 that
    shares the base tokenizer) is described by `backbone`, the full config dictionary of that architecture;
    the architecture fields are then read from it. See `PluginModel.from_causal_lm`.

    The config also records what the reweighter was trained against, so that it can refuse, loudly, to be
    attached to a model or tokenizer with another vocabulary.

    Args:
        vocab_size (`int`, *optional*, defaults to 49152):
            Rows of the reweighter's embedding and output layer (the base tokenizer's vocabulary).
        hidden_size (`int`, *optional*, defaults to 256): width of the hidden states.
        num_hidden_layers (`int`, *optional*, defaults to 1): number of decoder layers.
        num_attention_heads (`int`, *optional*, defaults to 1): attention heads per layer.
        num_key_value_heads (`int`, *optional*): key/value heads (grouped-query attention); defaults to
            `num_attention_heads`.
        intermediate_size (`int`, *optional*, defaults to 1024): width of the MLP.
        max_position_embeddings (`int`, *optional*, defaults to 2048):
            Longest sequence (in real, non-padding tokens) the reweighter accepts; longer inputs raise a
            `ValueError` rather than run on positions it never saw.
        rope_parameters (`dict`, *optional*): RoPE parameters as in `LlamaConfig`; defaults to
            `{"rope_type": "default", "rope_theta": 10000.0}`. The legacy `rope_theta=` (configs written by
            hf-plugin 0.1) is still read.
        rms_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of the RMS norms.
        hidden_act (`str`, *optional*, defaults to `"silu"`): MLP activation.
        initializer_range (`float`, *optional*, defaults to 0.02): standard deviation of the initial weights.
        backbone (`dict`, *optional*):
            Config dictionary (with its `model_type`) of another causal-LM architecture to use instead of the
            default LLaMA-style decoder.
        alpha (`float`, *optional*, defaults to 1.0):
            Strength of the reweighter in `p ∝ p_base · r^alpha`; 0 is the base alone, 1 the paper's product.
        base_model_name_or_path (`str`, *optional*): Hub id or path of the base model it was trained against.
        base_model_revision (`str`, *optional*): revision (branch, tag or commit) of that base model.
        base_model_file (`str`, *optional*): file name of that base model's weights when it was a single GGUF file.
        base_vocab_size (`int`, *optional*): width of that base model's logits.
        tokenizer_fingerprint (`str`, *optional*):
            `hf_plugin.tokenizer_fingerprint` of the tokenizer it was trained with.
        tokenizer_vocab_size (`int`, *optional*): number of real tokens of that tokenizer (`len(tokenizer)`).
        copy_mode (`str`, *optional*):
            How the reweighter treats the ids already in its context (the prompt and the tokens generated so far):
            `None` (the paper's reweighter), `"gate"`, `"shared"` or `"floor"`; see `hf_plugin.copying`. A mode adds
            a linear copy head (`hidden_size + 1` parameters) read at every step.
        copy_source (`str`, *optional*):
            Which ids the copy mode treats: those of the prompt (`"prompt"`, the default with a `copy_mode`) or of
            the whole sequence so far (`"context"`); see `hf_plugin.copying`.
        copy_ignore_ids (`list[int]`, *optional*):
            Ids never counted as context by the copy mode, typically the tokenizer's special tokens
            (`hf-plugin train` records `tokenizer.all_special_ids`). Padding is never counted.
        head_ids (`list[int]`, *optional*):
            A compact output layer (`hf_plugin.compact_head.CompactHead`, the default LLaMA-style reweighter only):
            one row for each of these ids (typically the task vocabulary, `hf_plugin.completions.task_vocabulary`)
            and one logit shared by every other id. `None`: a row for every id.
        trained_max_length (`int`, *optional*):
            The longest sequence (prompt + completion, in tokens) it was trained on, recorded by `hf_plugin.train`.
            Longer sequences, up to `max_position_embeddings`, run with a warning.
        copy_word_starts (`bool`, *optional*, defaults to `False`):
            Also count the word-start form of each context token (`G` → `ĠG`, see `hf_plugin.copying`); the table
            is a buffer of the model, filled from the tokenizer by `PluginModel.set_copy_aliases`.
        copy_word_pieces (`int`, *optional*, defaults to 1):
            With `copy_word_starts`, also count a marked word whose unmarked spelling takes up to this many pieces
            when they occur in a row (`D`, `irt` → `ĠDirt`); 1, 2 or 3. Above 1 a second table is a buffer.
        copy_pointer (`int`, *optional*, defaults to 0):
            With a `copy_mode` on the prompt, a pointer over the prompt's columns (see `hf_plugin.copying`): each
            prompt id also gets a score from the reweighter's state and the input embeddings of the `copy_pointer`
            tokens before the id's last occurrence, so it can say which slot's value comes next. 0 leaves it out;
            otherwise 1 to 16. Adds `hidden_size * key_size * (copy_pointer + 1)` parameters, `key_size = hidden_size // 4`.
        copy_pointer_occurrences (`str`, *optional*, defaults to `"last"`):
            Which columns of an id the pointer reads: `"last"`, its last occurrence in the prompt; `"every"`, each
            occurrence, keeping the best score (a piece shared by a name and the template, `:` in `Dirt: Showdown`,
            can then be pointed at inside the name).
        copy_coverage (`bool`, *optional*, defaults to `False`):
            With a `copy_mode` on the prompt, the prompt ids the output has already written get one more learned
            value per step (see `hf_plugin.copying`), so the reweighter can hold back a value it has written (a loop
            on a short value) apart from those it has not. Adds `hidden_size + 1` parameters.
        copy_continuation (`bool`, *optional*, defaults to `False`):
            With a `copy_mode` on the prompt, the prompt ids that follow, somewhere in the prompt, the token the
            output wrote last get one more learned value per step (see `hf_plugin.copying`), so a value begun is
            finished (`Need for Speed` → `: Payback`). Adds `hidden_size + 1` parameters.
        copy_word_forms (`bool`, *optional*, defaults to `False`):
            With `copy_word_starts`, the ids the prompt brings in as a piece's word-start form, and those it brings as
            a word spelled in 2, ..., `copy_word_pieces` pieces, get one more learned value per step each (see
            `hf_plugin.copying.word_form_occurrences`), so the reweighter can prefer the whole word (`ĠCoc`, spelled
            `C`, `oc` in `name[Cocum]`) to its first piece's word start (`ĠC`). Adds
            `(hidden_size + 1) * copy_word_pieces` parameters.
        copy_ignore_uncopied (`dict`, *optional*):
            Recorded by `PluginModel.ignore_uncopied_ids`: its arguments (`min_fraction`, `max_copy_rate`,
            `judge_word_starts`), the rule by which
            ids the training prompts hold but their completions do not repeat were added to `copy_ignore_ids`.

    Examples:

    ```python
    >>> from hf_plugin import PluginConfig
    >>> config = PluginConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, alpha=0.5)
    >>> config.model_type, config.num_hidden_layers, config.alpha
    ('plugin', 1, 0.5)

    ```
    """

    model_type = "plugin"

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 256,
        num_hidden_layers: int = 1,
        num_attention_heads: int = 1,
        num_key_value_heads: int | None = None,
        intermediate_size: int = 1024,
        max_position_embeddings: int = 2048,
        rope_parameters: dict[str, Any] | None = None,
        rms_norm_eps: float = 1e-5,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        backbone: dict[str, Any] | None = None,
        alpha: float = 1.0,
        base_model_name_or_path: str | None = None,
        base_model_revision: str | None = None,
        base_model_file: str | None = None,
        base_vocab_size: int | None = None,
        tokenizer_fingerprint: str | None = None,
        tokenizer_vocab_size: int | None = None,
        copy_mode: str | None = None,
        copy_ignore_ids: list[int] | None = None,
        copy_source: str | None = None,
        copy_word_starts: bool = False,
        copy_word_pieces: int = 1,
        copy_ignore_uncopied: dict[str, float] | None = None,
        copy_pointer: int = 0,
        copy_pointer_occurrences: str = "last",
        copy_coverage: bool = False,
        copy_continuation: bool = False,
        copy_word_forms: bool = False,
        trained_max_length: int | None = None,
        head_ids: list[int] | None = None,
        hf_plugin_version: str = __version__,
        **kwargs,
    ):
        if backbone is not None:
            if "model_type" not in backbone:
                raise ValueError("`backbone` must be a config dictionary with a `model_type` key.")
            arch = AutoConfig.for_model(**backbone)
            vocab_size = arch.vocab_size
            hidden_size = arch.hidden_size
            num_hidden_layers = arch.num_hidden_layers
            num_attention_heads = arch.num_attention_heads
            num_key_value_heads = getattr(arch, "num_key_value_heads", None)
            intermediate_size = getattr(arch, "intermediate_size", None) or getattr(arch, "n_inner", None) or 4 * hidden_size
            max_position_embeddings = arch.max_position_embeddings
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("intermediate_size", intermediate_size),
            ("max_position_embeddings", max_position_embeddings),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must be a multiple of `num_attention_heads` ({num_attention_heads})."
            )
        check_alpha(alpha)
        if copy_mode is not None and copy_mode not in COPY_MODES:
            raise ValueError(f"`copy_mode` must be None or one of {', '.join(COPY_MODES)}, got {copy_mode!r}.")
        if copy_ignore_ids is not None and not (
            isinstance(copy_ignore_ids, (list, tuple))
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in copy_ignore_ids)
        ):
            raise ValueError(f"`copy_ignore_ids` must be a list of non-negative token ids, got {copy_ignore_ids!r:.80}.")
        if head_ids is not None:
            if backbone is not None:
                raise ValueError("`head_ids` (a compact output layer) is for the default LLaMA-style reweighter, not a "
                                 "`backbone`.")
            if not (isinstance(head_ids, (list, tuple)) and head_ids
                    and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in head_ids)
                    and len(set(head_ids)) == len(head_ids)):
                raise ValueError(f"`head_ids` must be a non-empty list of distinct ids in [0, {vocab_size}).")
        if copy_source is not None and (copy_mode is None or copy_source not in COPY_SOURCES):
            raise ValueError(f"`copy_source` must be one of {', '.join(COPY_SOURCES)}, with a `copy_mode`; got "
                             f"{copy_source!r}.")
        if copy_word_starts and copy_mode is None:
            raise ValueError("`copy_word_starts` needs a `copy_mode`.")
        if copy_word_pieces not in (1, 2, 3) or isinstance(copy_word_pieces, bool):
            raise ValueError(f"`copy_word_pieces` must be 1, 2 or 3, got {copy_word_pieces!r}.")
        if copy_word_pieces > 1 and not copy_word_starts:
            raise ValueError("`copy_word_pieces` above 1 needs `copy_word_starts`.")
        if not isinstance(copy_pointer, int) or isinstance(copy_pointer, bool) or not 0 <= copy_pointer <= 16:
            raise ValueError(f"`copy_pointer` must be an integer from 0 to 16, got {copy_pointer!r}.")
        if copy_pointer and (copy_mode is None or copy_source not in (None, "prompt")):
            raise ValueError("`copy_pointer` needs a `copy_mode` with the prompt as its source.")
        if copy_pointer_occurrences not in POINTER_OCCURRENCES:
            raise ValueError(f"`copy_pointer_occurrences` must be one of {', '.join(POINTER_OCCURRENCES)}, got "
                             f"{copy_pointer_occurrences!r}.")
        if copy_pointer_occurrences != "last" and not copy_pointer:
            raise ValueError("`copy_pointer_occurrences` needs a `copy_pointer`.")
        if not isinstance(copy_coverage, bool):
            raise ValueError(f"`copy_coverage` must be True or False, got {copy_coverage!r}.")
        if copy_coverage and (copy_mode is None or copy_source not in (None, "prompt")):
            raise ValueError("`copy_coverage` needs a `copy_mode` with the prompt as its source.")
        if not isinstance(copy_continuation, bool):
            raise ValueError(f"`copy_continuation` must be True or False, got {copy_continuation!r}.")
        if copy_continuation and (copy_mode is None or copy_source not in (None, "prompt")):
            raise ValueError("`copy_continuation` needs a `copy_mode` with the prompt as its source.")
        if not isinstance(copy_word_forms, bool):
            raise ValueError(f"`copy_word_forms` must be True or False, got {copy_word_forms!r}.")
        if copy_word_forms and not copy_word_starts:
            raise ValueError("`copy_word_forms` needs `copy_word_starts`.")
        if isinstance(copy_ignore_uncopied, dict) and set(copy_ignore_uncopied) == {"min_fraction", "max_copy_rate"}:
            # A record written before `judge_word_starts` existed; the release that wrote it judged the written ids
            # only. The ids it chose are in `copy_ignore_ids` either way: this is the record, not the rule.
            copy_ignore_uncopied = {**copy_ignore_uncopied, "judge_word_starts": False}
        if copy_ignore_uncopied is not None and (
            copy_mode is None or not isinstance(copy_ignore_uncopied, dict)
            or set(copy_ignore_uncopied) != {"min_fraction", "max_copy_rate", "judge_word_starts"}
            or not all(isinstance(copy_ignore_uncopied[k], (int, float)) and not isinstance(copy_ignore_uncopied[k], bool)
                       and 0 <= copy_ignore_uncopied[k] <= 1 for k in ("min_fraction", "max_copy_rate"))
            or not isinstance(copy_ignore_uncopied["judge_word_starts"], bool)
        ):
            raise ValueError("`copy_ignore_uncopied` must be {'min_fraction': f, 'max_copy_rate': r, "
                             "'judge_word_starts': b} with f and r in [0, 1], with a `copy_mode`; got "
                             f"{copy_ignore_uncopied!r:.80}.")
        for name, value in (("base_vocab_size", base_vocab_size), ("tokenizer_vocab_size", tokenizer_vocab_size),
                            ("trained_max_length", trained_max_length)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        # Configs written before `rope_parameters` carry a bare `rope_theta`.
        rope_theta = kwargs.pop("rope_theta", 10000.0)
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": rope_theta})
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.backbone = backbone
        self.alpha = float(alpha)
        self.base_model_name_or_path = base_model_name_or_path
        self.base_model_file = base_model_file
        self.base_model_revision = base_model_revision
        self.base_vocab_size = base_vocab_size
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.copy_mode = copy_mode
        self.copy_ignore_ids = sorted(set(copy_ignore_ids)) if copy_ignore_ids else None
        self.copy_word_starts = bool(copy_word_starts)
        self.copy_word_pieces = copy_word_pieces
        self.copy_ignore_uncopied = dict(copy_ignore_uncopied) if copy_ignore_uncopied is not None else None
        self.copy_pointer = copy_pointer
        self.copy_pointer_occurrences = copy_pointer_occurrences
        self.copy_coverage = copy_coverage
        self.copy_continuation = copy_continuation
        self.copy_word_forms = copy_word_forms
        self.copy_source = (copy_source or "prompt") if copy_mode is not None else None
        self.trained_max_length = trained_max_length
        self.head_ids = list(head_ids) if head_ids is not None else None
        self.hf_plugin_version = hf_plugin_version
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> PluginConfig:
        """Builds a config from a saved dictionary, refusing what is not a complete reweighter config.

        Keys this version of hf-plugin does not know (written by a newer one) are dropped with one warning.
        """
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"This is not an hf-plugin reweighter: its config has model_type={model_type!r}, not "
                f"{cls.model_type!r}."
            )
        if not config_dict.get("backbone"):
            missing = [name for name in _REQUIRED_FIELDS if name not in config_dict]
            if missing:
                raise ValueError(f"The reweighter's config lacks required fields: {', '.join(missing)}.")
        unknown = sorted(set(config_dict) - _known_config_keys())
        if unknown:
            logger.warning(
                f"Ignoring config keys unknown to hf-plugin {__version__} (the config was written by hf-plugin "
                f"{config_dict.get('hf_plugin_version', 'of an unknown version')}): {', '.join(unknown)}."
            )
            config_dict = {key: value for key, value in config_dict.items() if key not in unknown}
        return super().from_dict(config_dict, **kwargs)

    def backbone_config(self) -> PreTrainedConfig:
        """The transformers config of the causal LM that computes the reweighter's logits."""
        if self.backbone is not None:
            return AutoConfig.for_model(**self.backbone)
        fields = {name: getattr(self, name) for name in _LLAMA_FIELDS}
        return LlamaConfig(**fields, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
