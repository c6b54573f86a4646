"""Reweighter initialisations: a copy of a causal LM's first layers, and a start equal to the base model.

This module imports only `compatibility` of ours at run time (`PluginModel` only for type hints): `modeling_plugin`
imports it, and through it the remote-code and `custom_generate/` copies of a saved reweighter carry it (see
`hf_plugin.hub.write_remote_code`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from .compatibility import renamed_keyword


if TYPE_CHECKING:
    from .modeling_plugin import PluginModel


# Config fields holding the decoder-layer count, LLaMA-style first, then GPT-2-style.
_LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer")


def _layer_count_field(config) -> str:
    for name in _LAYER_COUNT_FIELDS:
        if isinstance(vars(config).get(name), int):
            return name
    raise ValueError(f"{type(config).__name__} has neither `num_hidden_layers` nor `n_layer`; cannot count its layers.")


def first_layers(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A smaller causal LM of the same class holding copies of `model`'s first `num_layers` decoder layers.

    The copy keeps `model`'s input embeddings (and position embeddings, if any), its first `num_layers` decoder
    layers, its final norm and its output head, so its logits are what `model` would predict if it stopped after
    layer `num_layers`. Any architecture whose config counts its layers in `num_hidden_layers` (LLaMA-style) or
    `n_layer` (GPT-2-style) and holds them in a `ModuleList` works. Per-layer config lists (such as
    `layer_types`: every list field as long as the layer count) are cut to the first `num_layers` entries. Tied
    embeddings stay tied. This is the initialisation of a reweighter "from the base model's own first layers"
    (`PluginModel.from_base_layers`) and of ULD's assistant.

    Args:
        model (`PreTrainedModel`): a causal LM; left untouched (it may be on any device, e.g. loaded from GGUF).
        num_layers (`int`): how many of its decoder layers to keep, from 1 to its layer count.

    Returns:
        `PreTrainedModel`: a new model of `type(model)`, in `model`'s dtype, on the CPU, in eval mode.

    Examples:

    ```python
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_plugin import first_layers
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
    ...                                      num_attention_heads=2))
    >>> small = first_layers(model, 1)
    >>> type(small).__name__, small.config.num_hidden_layers, len(small.model.layers), model.config.num_hidden_layers
    ('LlamaForCausalLM', 1, 1, 3)

    ```
    """
    config = copy.deepcopy(model.config)
    field = _layer_count_field(config)
    total = getattr(config, field)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be an integer from 1 to {total} (the layers of {type(model).__name__}), got {num_layers!r}.")
    if not any(isinstance(module, torch.nn.ModuleList) and len(module) == total for module in model.modules()):
        raise ValueError(f"{type(model).__name__} holds no list of {total} layers; cannot take its first {num_layers}.")
    setattr(config, field, num_layers)
    for name, value in vars(config).items():
        if name != "architectures" and isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, name, type(value)(value[:num_layers]))

    small = type(model)(config)
    source, target = model.state_dict(), small.state_dict()
    # Parameter names carry the layer index, so the small model's names are the first layers' names in `model`.
    missing = [name for name in target if name not in source or source[name].shape != target[name].shape]
    if missing:
        raise ValueError(f"{type(model).__name__}'s first {num_layers} layers do not map onto a {num_layers}-layer "
                         f"copy (no matching weight for {', '.join(missing[:3])}).")
    small.load_state_dict({name: source[name] for name in target})
    small.generation_config = copy.deepcopy(model.generation_config)
    return small.to(dtype=model.dtype).eval()


def _final_norm(backbone: PreTrainedModel) -> torch.nn.Module:
    """The norm applied after the last decoder layer (`model.norm` in LLaMA, `transformer.ln_f` in GPT-2)."""
    children = list(backbone.base_model.named_children())
    layers = [i for i, (_, module) in enumerate(children) if isinstance(module, torch.nn.ModuleList)]
    after_layers = children[layers[-1] + 1:] if layers else []
    norms = [module for _, module in after_layers
             if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None]
    if not norms:
        raise ValueError(f"Cannot find the final norm of the reweighter's {type(backbone).__name__} (a norm after its "
                         "layers); uniform_start_ needs one.")
    return norms[-1]


@renamed_keyword("plugin", "reweighter")
def uniform_start_(reweighter: PluginModel) -> PluginModel:
    """Makes the reweighter's next-token distribution exactly uniform, in place, so that the combination starts
    equal to the base model and training moves it only as far as the data asks.

    The backbone's final norm is zeroed (its weight, and its bias for a LayerNorm; a bias of the output head too),
    so every logit is 0. The head and the input embeddings are kept (zeroing a head tied to the embeddings would
    stop every gradient); the norm's weight still gets a gradient, so the first optimizer step moves the output.

    Args:
        reweighter (`PluginModel`): the reweighter, LLaMA- or GPT-2-style or any backbone with a final norm after
            its layers that scales its output by its weight (a parameter formerly named `plugin`).

    Returns:
        `PluginModel`: `reweighter` itself.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin import PluginConfig, PluginModel, uniform_start_
    >>> plugin = uniform_start_(PluginModel(PluginConfig(vocab_size=50, hidden_size=16, intermediate_size=32)))
    >>> bool((plugin(torch.tensor([[3, 4, 5]])).logits == 0).all())
    True

    ```
    """
    backbone = reweighter.backbone
    norm = _final_norm(backbone)
    head = backbone.get_output_embeddings()
    zeroed = [norm.weight, getattr(norm, "bias", None), getattr(head, "bias", None)]
    zeroed = [tensor for tensor in zeroed if isinstance(tensor, torch.Tensor)]
    saved = [tensor.detach().clone() for tensor in zeroed]
    with torch.no_grad():
        for tensor in zeroed:
            tensor.zero_()
        probe = torch.zeros((1, 1), dtype=torch.long, device=norm.weight.device)
        logits = backbone(input_ids=probe).logits
        if not (logits == logits[..., :1]).all():  # e.g. a norm scaling by (1 + weight), as in Gemma
            for tensor, value in zip(zeroed, saved):
                tensor.copy_(value)
            raise ValueError(f"Zeroing the final norm of the reweighter's {type(backbone).__name__} does not make its "
                             "logits uniform; uniform_start_ does not support this architecture.")
    return reweighter
