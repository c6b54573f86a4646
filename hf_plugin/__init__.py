"""hf-plugin: adapt language models you cannot fine-tune by reweighting their next-token logits."""

from transformers import AutoConfig, AutoModel

from ._version import __version__
from .combine import align_vocab, combine_logits
from .compatibility import binding_kwargs, check_base_model, check_tokenizer, check_vocab_width, tokenizer_fingerprint
from .configuration_plugin import PluginConfig
from .data import with_demonstrations
from .initialization import first_layers, uniform_start_
from .engine import CachedModelRunner
from .logits_process import PluginLogitsProcessor
from .methods import (DynamicLogitFusionLogitsProcessor, LogitDifferenceLogitsProcessor, PromptedModel,
                      ProxyTuningLogitsProcessor)
from .modeling_plugin import PluginModel, PluginPreTrainedModel, score_with_reweighters


AutoConfig.register(PluginConfig.model_type, PluginConfig, exist_ok=True)
AutoModel.register(PluginConfig, PluginModel, exist_ok=True)

__all__ = [
    "CachedModelRunner",
    "DynamicLogitFusionLogitsProcessor",
    "LogitDifferenceLogitsProcessor",
    "PluginConfig",
    "PluginLogitsProcessor",
    "PluginModel",
    "PluginPreTrainedModel",
    "PromptedModel",
    "ProxyTuningLogitsProcessor",
    "__version__",
    "align_vocab",
    "binding_kwargs",
    "check_base_model",
    "check_tokenizer",
    "check_vocab_width",
    "combine_logits",
    "first_layers",
    "score_with_reweighters",
    "tokenizer_fingerprint",
    "uniform_start_",
    "with_demonstrations",
]
