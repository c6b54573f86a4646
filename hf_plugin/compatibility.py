"""Binding a reweighter to the base model and vocabulary it was trained on: tokenizer fingerprints, width and
base-model checks, and a base model's recorded identity; and `renamed_keyword`, which keeps callers of a renamed
parameter working.

The checks work from a `PluginConfig` alone, and the module imports nothing else of ours at run time
(`PluginConfig` only for type hints), so the model, the engine, the Hub helpers, the loaders, the caches and the
server all import it without a cycle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.utils import logging



if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .configuration_plugin import PluginConfig

logger = logging.get_logger(__name__)

_SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF files whose Hub model is known (their metadata names no repository), for a portable base-model identity.
KNOWN_GGUF_MODELS = {SMOLLM2_GGUF: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def renamed_keyword(old: str, new: str):
    """Decorates a function whose parameter `old` is now `new`: a call passing `old=` still works, with a
    `FutureWarning`."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if old in kwargs:
                warnings.warn(f"`{function.__qualname__}`'s parameter `{old}` is renamed `{new}`; the old name will be "
                              "removed in a future version.", FutureWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper

    return decorate


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable hash of a tokenizer's vocabulary (every token and its id) and its special-token ids.

    Two tokenizers with the same fingerprint map text to the same ids, so a reweighter trained with one
    can score the other's ids. Stable across processes, machines and library versions.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): any transformers tokenizer.

    Returns:
        `str`: `"sha256:"` followed by 16 hexadecimal digits.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    specials = {name: getattr(tokenizer, name, None) for name in _SPECIAL_TOKEN_IDS}
    payload = json.dumps({"vocab": vocab, "special_token_ids": specials}, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def check_vocab_width(config: PluginConfig, width: int, model_name: str = "reweighter") -> None:
    """Raises unless base scores of `width` entries can be combined with this reweighter.

    Equal widths always pass. Different widths pass only when they differ by padded rows, i.e. when
    `width` is the base width recorded at training time (`config.base_vocab_size`), or when both widths
    cover every real token of the recorded tokenizer (`config.tokenizer_vocab_size`). The columns one side
    lacks are then given probability zero (see `hf_plugin.combine.align_vocab`).

    Args:
        config (`PluginConfig`): the reweighter's configuration.
        width (`int`): number of vocabulary entries in the base model's scores.
        model_name (`str`, *optional*, defaults to `"reweighter"`): what the model is called in the error message
            (the same rule binds the other models combined at decoding time: experts, assistants).
    """
    own = config.vocab_size
    if width == own or width == config.base_vocab_size:
        return
    real = config.tokenizer_vocab_size
    if real is not None and min(width, own) >= real:
        return
    known = f"; its tokenizer has {real} tokens" if real is not None else ""
    # A plain causal LM (an expert, an assistant) records no base: say only what is known.
    trained = (f" (trained against a base with {config.base_vocab_size}{known})" if config.base_vocab_size is not None
               else f" ({known[2:]})" if known else "")
    raise ValueError(
        f"Vocabulary mismatch: the base model's scores have {width} entries but the {model_name} has {own}{trained}. "
        f"The {model_name} only works with the tokenizer it was trained on."
    )


def check_tokenizer(config: PluginConfig, tokenizer: PreTrainedTokenizerBase, strict: bool = True) -> None:
    """Raises (or, with `strict=False`, logs a warning) when `tokenizer` is not the reweighter's tokenizer.

    Args:
        config (`PluginConfig`): the reweighter's configuration.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer the user generates with.
        strict (`bool`, *optional*, defaults to `True`): raise on a mismatch instead of warning.
    """
    if config.tokenizer_fingerprint is None:
        logger.warning("This reweighter records no tokenizer fingerprint; its vocabulary cannot be verified.")
        return
    theirs = tokenizer_fingerprint(tokenizer)
    if theirs == config.tokenizer_fingerprint:
        return
    message = (
        f"Tokenizer mismatch: the reweighter was trained with tokenizer {config.tokenizer_fingerprint} "
        f"({config.tokenizer_vocab_size} tokens) but the tokenizer given has fingerprint {theirs} "
        f"({len(tokenizer)} tokens)."
    )
    if strict:
        raise ValueError(message + " Pass strict=False to use it anyway.")
    logger.warning(message + " Continuing because strict=False.")



def check_base_model(
    config: PluginConfig, base_model, tokenizer: PreTrainedTokenizerBase | None = None, strict: bool = True
) -> None:
    """Checks a reweighter's recorded binding against the base model (and tokenizer) it is attached to.

    A vocabulary or tokenizer mismatch raises (or, with `strict=False`, warns). Another base model name with a
    compatible vocabulary only warns, once: a reweighter may well transfer to a sibling model that shares the
    tokenizer (e.g. from SmolLM2-135M to a larger SmolLM2), but the user should know.

    Args:
        config (`PluginConfig`): the reweighter's configuration.
        base_model (`PreTrainedModel`): the base model.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the tokenizer used with it.
        strict (`bool`, *optional*, defaults to `True`): raise on a vocabulary or tokenizer mismatch.
    """
    try:
        check_vocab_width(config, base_model.get_output_embeddings().weight.shape[0])
    except ValueError as error:
        if strict:
            raise
        logger.warning(f"{error} Continuing because strict=False.")
    if tokenizer is not None:
        check_tokenizer(config, tokenizer, strict=strict)
    recorded = config.base_model_name_or_path
    attached = base_model_identity(base_model.config.name_or_path)[0]
    if recorded is not None and attached is not None and recorded != attached:
        revision = f" (revision {config.base_model_revision})" if config.base_model_revision else ""
        logger.warning_once(
            f"This reweighter was trained against {recorded}{revision} and is attached to {attached}. The vocabulary "
            "is compatible, but its effect on another base model has not been measured."
        )

def base_model_identity(name_or_path: str | None, base_model_id: str | None = None) -> tuple[str | None, str | None]:
    """A portable name of a base model, and its GGUF file name: never a local absolute path.

    Args:
        name_or_path (`str`, *optional*): what the base was loaded from (its `config.name_or_path`): a Hub id, a
            local folder, or a `.gguf` file (see `hf_plugin.loading.load_base_model`).
        base_model_id (`str`, *optional*): the Hub id of the base, when the user knows it; it wins.

    Returns:
        `tuple[str | None, str | None]`: the Hub id (given, or known for a GGUF file such as the offline SmolLM2)
        or else the bare folder name; and the `.gguf` file name, or `None` for other bases.
    """
    if not name_or_path:
        return base_model_id, None
    path = Path(name_or_path)
    gguf_file = path.name if path.suffix == ".gguf" else None
    folder = path.parent if gguf_file else path
    if base_model_id is not None:
        return base_model_id, gguf_file
    if gguf_file in KNOWN_GGUF_MODELS:
        return KNOWN_GGUF_MODELS[gguf_file], gguf_file
    if gguf_file or path.is_absolute() or path.exists():  # a local folder or file: keep its name, not where it lies
        return folder.resolve().name, gguf_file
    return name_or_path, None


def binding_kwargs(
    base_model=None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    revision: str | None = None,
    base_model_id: str | None = None,
) -> dict:
    """The `PluginConfig` arguments that bind a new reweighter to a base model and its tokenizer.

    The base is recorded by a portable identity (see `base_model_identity`), never by a local path, because the
    config and its model card are shared.

    Args:
        base_model (`PreTrainedModel`, *optional*): the frozen base model the reweighter will be trained against.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the tokenizer shared by both models.
        revision (`str`, *optional*): the base model's revision, when it was loaded from the Hub.
        base_model_id (`str`, *optional*): the base model's Hub id, when it was loaded from a local folder or file.

    Returns:
        `dict`: keyword arguments for `PluginConfig`.

    Examples:

    ```python
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_plugin import PluginConfig, binding_kwargs
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32,
    ...                                     num_hidden_layers=1, num_attention_heads=2))
    >>> config = PluginConfig(vocab_size=128, hidden_size=16, intermediate_size=32, **binding_kwargs(base))
    >>> config.base_vocab_size
    128

    ```
    """
    kwargs: dict = {}
    if base_model is not None:
        name, gguf_file = base_model_identity(base_model.config.name_or_path, base_model_id)
        kwargs["base_model_name_or_path"] = name
        kwargs["base_model_file"] = gguf_file
        kwargs["base_model_revision"] = revision
        kwargs["base_vocab_size"] = base_model.get_output_embeddings().weight.shape[0]
    if tokenizer is not None:
        kwargs["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
        kwargs["tokenizer_vocab_size"] = len(tokenizer)
    return kwargs
