"""The logit-level methods related to the Plugin one, each a `LogitsProcessor` built on `CachedModelRunner`:
proxy-tuning and DExperts, ULD, and Dynamic Logit Fusion; `PromptedModel` gives any of their models its own prompts."""

from ..engine import PromptedModel
from .dynamic_fusion import DynamicLogitFusionLogitsProcessor, dynamic_fusion_scores
from .logit_difference import LogitDifferenceLogitsProcessor, logit_difference_scores, relative_top_mask
from .proxy_tuning import ProxyTuningLogitsProcessor, proxy_tuning_scores, top_p_mask


__all__ = [
    "DynamicLogitFusionLogitsProcessor",
    "LogitDifferenceLogitsProcessor",
    "PromptedModel",
    "ProxyTuningLogitsProcessor",
    "dynamic_fusion_scores",
    "logit_difference_scores",
    "proxy_tuning_scores",
    "relative_top_mask",
    "top_p_mask",
]
