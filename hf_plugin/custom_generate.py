"""`custom_generate/generate.py` of a shared reweighter: applies it with transformers alone.

`hf_plugin.hub.write_custom_generate` copies this module, as `custom_generate/generate.py`, into a saved reweighter
with the modules it imports, so that

    base.generate(**inputs, custom_generate="user/reweighter", trust_remote_code=True, max_new_tokens=64)

loads the reweighter beside this file and runs the standard `generate()` with a `PluginLogitsProcessor`: the same
code, and so the same tokens, as with hf-plugin installed. Nothing here re-implements the engine or the processor.
"""

from __future__ import annotations

import collections
import inspect
import os
import re
from pathlib import Path

import torch
from transformers import LogitsProcessorList

# transformers 5.3 copies only the relative imports written in this very file (later releases follow them
# recursively): every module the processor needs is therefore imported here.
from ._version import __version__  # noqa: F401
from .combine import combine_logits  # noqa: F401
from .compact_head import CompactHead  # noqa: F401
from .compatibility import check_base_model  # noqa: F401
from .configuration_plugin import PluginConfig  # noqa: F401
from .copying import first_occurrences  # noqa: F401
from .engine import CachedModelRunner  # noqa: F401
from .hub import WEIGHTS_FILE  # noqa: F401
from .initialization import first_layers  # noqa: F401
from .logits_process import PluginLogitsProcessor
from .model_card_template import REWEIGHTER_CARD_TEMPLATE  # noqa: F401
from .modeling_plugin import PluginModel


# What `generate(..., custom_generate=..., revision=...)` passes on for loading this repository: it locates the
# weights too, and the standard `generate()` would reject it as an unused model argument.
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
_LOADED: collections.OrderedDict = collections.OrderedDict()
_KEEP_LOADED = 4


def calling_repository(model) -> str | None:
    """The `custom_generate` argument of the `model.generate()` call now running, or `None`.

    transformers gives the custom function neither the repository id nor its folder, and this file runs from a copy
    in the modules cache, so the repository is read from the caller's own argument.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            names = frame.f_locals
            if frame.f_code.co_name == "generate" and names.get("self") is model:
                if isinstance(names.get("custom_generate"), (str, os.PathLike)):
                    return str(names["custom_generate"])
            frame = frame.f_back
        return None
    finally:
        del frame  # frames hold their locals: do not keep a cycle alive


def code_commit() -> str | None:
    """The commit this file was downloaded at, when it came from the Hub, else `None`.

    transformers keeps a Hub repository's code under `.../<commit>/custom_generate/`: loading the weights at that
    commit keeps code and weights of one revision even if the branch moves in between.
    """
    name = Path(__file__).resolve().parents[1].name
    return name if re.fullmatch(r"[0-9a-f]{40}", name) else None


def load_reweighter(location: str, device: torch.device, **hub_kwargs) -> PluginModel:
    """The reweighter saved at `location` (a folder or a Hub id), safetensors only, on `device`, in eval mode.

    The last few loaded are kept, so a loop of `generate()` calls reads the weights once; a local folder is read
    again when its files change.
    """
    stamp = None
    if os.path.isdir(location):
        stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in Path(location).iterdir() if p.is_file()))
    key = (location, str(device), stamp, tuple(sorted((k, repr(v)) for k, v in hub_kwargs.items())))
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    with torch.random.fork_rng(devices=[]):  # a seeded sampling call sees the random stream it would without us
        plugin = PluginModel.from_pretrained(location, **hub_kwargs).to(device).eval()
    _LOADED[key] = plugin
    while len(_LOADED) > _KEEP_LOADED:
        _LOADED.popitem(last=False)
    return plugin


def generate(
    model,
    alpha: float | None = None,
    strict: bool = True,
    reweighter: str | os.PathLike | None = None,
    logits_processor: LogitsProcessorList | None = None,
    **kwargs,
):
    r"""
    Runs `model.generate()` with this repository's reweighter multiplied into the base model's next-token
    distribution, `p ∝ p_base · r^alpha`, exactly as `hf_plugin.PluginLogitsProcessor` does (its own KV cache,
    beams, left padding and roll-backs included). Called by transformers for
    `model.generate(..., custom_generate=REPO_OR_FOLDER, trust_remote_code=True)`.

    Args:
        model (`PreTrainedModel`): the base model `generate()` was called on.
        alpha (`float`, *optional*): the strength; defaults to the one recorded in the reweighter's config. 0 gives
            the base model alone.
        strict (`bool`, *optional*, defaults to `True`): raise on a vocabulary or tokenizer mismatch between the
            reweighter's recorded binding and `model` (and `tokenizer=`, when given); `False` only warns.
        reweighter (`str` or `os.PathLike`, *optional*): where to load the reweighter from; defaults to the
            repository or folder given as `custom_generate`.
        logits_processor (`LogitsProcessorList`, *optional*): further processors, applied after the reweighter.
        kwargs: the other arguments of `generate()` (`max_new_tokens`, `do_sample`, `num_beams`, `attention_mask`,
            `tokenizer`, ...), and the loading arguments (`revision`, `cache_dir`, `token`, `local_files_only`), used
            for the weights as transformers used them for this file.

    Returns:
        What `model.generate()` returns.
    """
    hub_kwargs = {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}
    hub_kwargs = {name: value for name, value in hub_kwargs.items() if value is not None}
    location = reweighter if reweighter is not None else calling_repository(model)
    if location is None:
        raise ValueError("Cannot tell which repository this custom generate() belongs to; pass reweighter=<its folder "
                         "or Hub id>.")
    if reweighter is None and not os.path.isdir(location) and code_commit() is not None:
        hub_kwargs["revision"] = code_commit()
    plugin = load_reweighter(str(location), model.device, **hub_kwargs)
    tokenizer = kwargs.get("tokenizer")  # also used by generate() itself (stop strings): left in kwargs
    generation_config = kwargs.get("generation_config") or model.generation_config
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = generation_config.pad_token_id
    # The processor checks the binding (vocabulary width, tokenizer fingerprint when a tokenizer is given) and
    # raises one line naming both sides, as with hf-plugin installed.
    processor = PluginLogitsProcessor(plugin, attention_mask=kwargs.get("attention_mask"), pad_token_id=pad_token_id,
                                      alpha=alpha, tokenizer=tokenizer, base_model=model, strict=strict)
    processors = LogitsProcessorList([processor, *(logits_processor or [])])
    # The class's own generate(): a model loaded with trust_remote_code from a repository holding custom_generate/
    # has this very function as its instance attribute `generate`.
    return type(model).generate(model, logits_processor=processors, **kwargs)
