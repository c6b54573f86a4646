"""ULD's assistant (Ji et al. 2024), trained here: the target's first layers with LoRA adapters, taught to remember the
forget set and to be uniform on the retain set, for `LogitDifferenceLogitsProcessor` to subtract at decoding time."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from .compatibility import binding_kwargs
from .completions import completion_positions
from .data import EncodedExample
from .modeling_plugin import PluginModel
from .training import PluginTrainingArguments, train


class UnlearningLoss:
    r"""
    The loss of ULD's assistant at each completion position: the NLL of the next token on a forget example, and
    `beta · KL(uniform ‖ q)` on a retain example (q: the assistant's next-token distribution), so that the assistant
    remembers the forget set and knows nothing of the rest. It plugs into `hf_plugin.training.train` in place of a
    base-logit source (a `hf_plugin.base_logits.LossSource`; `alpha` is not used).

    Args:
        forget_indices (`Sequence[int]`): the `index` of every forget example (`EncodedExample.index`); the other
            examples are retain examples.
        beta (`float`, *optional*, defaults to 5.0): the weight of the retain term (5 in ULD's configuration).

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.unlearning import UnlearningLoss
    >>> batch = {"labels": torch.tensor([[-100, 7, 8], [-100, 7, 8]]), "index": torch.tensor([0, 1])}
    >>> uniform = torch.zeros(4, 10)   # logits at the 4 completion positions: 2 per row
    >>> UnlearningLoss(forget_indices=[0], beta=5.0).nll(uniform, batch, alpha=1.0).round(decimals=4)  # log 10, KL 0
    tensor([2.3026, 2.3026, 0.0000, 0.0000])

    ```
    """

    # What the training loop's first evaluation (alpha=0, before any step) measures with this loss.
    reference_name = "untrained assistant"

    def __init__(self, forget_indices: Sequence[int], beta: float = 5.0):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f"`beta` must be a non-negative number, got {beta!r}.")
        self.forget_indices = torch.tensor(sorted(set(int(i) for i in forget_indices)), dtype=torch.long)
        self.beta = float(beta)

    def nll(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
        """Per-position loss at the completion positions of `batch`, in the row-major order of `logits`."""
        positions = completion_positions(batch["labels"]).to(logits.device)
        log_q = torch.log_softmax(logits.float(), dim=-1)
        targets = batch["labels"][:, 1:].to(logits.device)[positions]
        nll = -log_q.gather(-1, targets[:, None]).squeeze(-1)
        kl_from_uniform = -math.log(log_q.shape[-1]) - log_q.mean(dim=-1)
        forget = torch.isin(batch["index"].to(logits.device), self.forget_indices.to(logits.device))
        forget = forget[:, None].expand_as(positions)[positions]
        return torch.where(forget, nll, self.beta * kl_from_uniform)


@torch.no_grad()
def kl_from_uniform(model: PreTrainedModel, examples: Sequence[EncodedExample]) -> float:
    """Mean KL(uniform ‖ q) of a causal LM at the positions that predict the completion tokens of `examples`: 0 for
    an assistant that is perfectly flat there. ULD's subtraction leaves an example alone only where this is small,
    so measure it on the retain set before decoding with an assistant.

    Args:
        model (`PreTrainedModel`): the assistant (or any causal LM).
        examples (`Sequence[EncodedExample]`): tokenised pairs (`hf_plugin.data.encode_examples`).

    Returns:
        `float`: nats per completion position.
    """
    values = []
    for example in examples:
        input_ids = torch.tensor([example.input_ids], device=model.device)
        log_q = torch.log_softmax(model(input_ids).logits[0, :-1].float(), dim=-1)
        predicts_completion = torch.tensor(example.labels[1:], device=log_q.device) != -100
        values.append(-math.log(log_q.shape[-1]) - log_q[predicts_completion].mean(dim=-1))
    return float(torch.cat(values).mean())


def _adapted_layers(assistant: PluginModel) -> list[str]:
    """The names of the assistant's linear layers (Linear or GPT-2's Conv1D), the output head excepted."""
    head = assistant.get_output_embeddings()
    return [name for name, module in assistant.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head]


def build_assistant(
    target: PreTrainedModel,
    num_layers: int,
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    base_model_id: str | None = None,
) -> PluginModel:
    """ULD's assistant before training: a copy of the target's embeddings, first `num_layers` decoder layers, final
    norm and output head (`hf_plugin.first_layers`), frozen, with LoRA adapters from `peft` on every linear layer but
    the head. Bound to the target like a reweighter (`binding_kwargs`).

    Args:
        target (`PreTrainedModel`): the model to unlearn from (an open causal LM); left untouched.
        num_layers (`int`): decoder layers copied (8 of 32 in the paper).
        lora_rank (`int`, *optional*, defaults to 16): the adapters' rank (16–32 in the paper).
        lora_alpha (`float`, *optional*, defaults to 32.0): the adapters' scaling numerator (`lora_alpha / rank`).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the target's tokenizer, recorded in the binding.
        base_model_id (`str`, *optional*): the target's Hub id when it was loaded from a local folder.

    Returns:
        `PluginModel`: the assistant, only its adapters trainable; `merge_adapters` gives its plain form.

    Examples:

    ```python
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_plugin.unlearning import build_assistant
    >>> target = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
    ...                                       num_attention_heads=2))
    >>> assistant = build_assistant(target, num_layers=1, lora_rank=4)
    >>> trainable = {name.split(".")[-3] for name, p in assistant.named_parameters() if p.requires_grad}
    >>> sorted(trainable)
    ['lora_A', 'lora_B']

    ```
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise ImportError("ULD's assistant needs peft: pip install 'hf-plugin[uld]'.") from error

    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
        raise ValueError(f"`lora_rank` must be a positive integer, got {lora_rank!r}.")
    assistant = PluginModel.from_base_layers(target, num_layers,
                                             **binding_kwargs(target, tokenizer, base_model_id=base_model_id))
    assistant.requires_grad_(False)
    layers = _adapted_layers(assistant)
    gpt2_style = any(isinstance(assistant.get_submodule(name), Conv1D) for name in layers)
    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=layers,
                        fan_in_fan_out=gpt2_style)
    return inject_adapter_in_model(config, assistant).eval()


def merge_adapters(assistant: PluginModel) -> PluginModel:
    """A copy of `assistant` with its LoRA adapters merged into the weights: a plain `PluginModel` that saves, loads
    and runs like any reweighter (and needs no `peft`). An assistant without adapters is copied as it is."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(assistant)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, module.get_base_layer())
    return merged.requires_grad_(False)


def check_disjoint(forget_examples: Sequence[EncodedExample], retain_examples: Sequence[EncodedExample]) -> None:
    """Raises when a pair is in both sets: the assistant would be asked to remember it and to be uniform on it."""
    forget_pairs = {tuple(example.input_ids) for example in forget_examples}
    shared = sum(tuple(example.input_ids) in forget_pairs for example in retain_examples)
    if shared:
        raise ValueError(f"{shared} of the {len(retain_examples)} retain examples are also forget examples: the "
                         "forget and retain sets must not overlap.")


def train_assistant(
    target: PreTrainedModel,
    forget_examples: Sequence[EncodedExample],
    retain_examples: Sequence[EncodedExample],
    args: PluginTrainingArguments,
    num_layers: int,
    beta: float = 5.0,
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    base_model_id: str | None = None,
    resume: bool = False,
    model_card: dict | None = None,
) -> PluginModel:
    """Builds ULD's assistant (`build_assistant`) and trains its adapters with `UnlearningLoss` through the library's
    training loop (`hf_plugin.training.train`: Accelerate, checkpoints, resume); saves the best epoch, adapters merged,
    in `args.output_dir` like a reweighter (safetensors, config with the target's binding, card, tokenizer).

    The assistant must memorise the forget set rather than generalise from it, so the examples it is trained on are
    also the ones it is validated on (the loss, per completion token); `args.patience=0` trains every epoch.

    Args:
        target (`PreTrainedModel`): the model to unlearn from; left untouched.
        forget_examples, retain_examples (`Sequence[EncodedExample]`): tokenised pairs (`hf_plugin.data`).
        args (`PluginTrainingArguments`): hyper-parameters (ULD: `learning_rate=1e-3`, `epochs=10`).
        num_layers, lora_rank, lora_alpha, tokenizer, base_model_id: as for `build_assistant`.
        beta (`float`, *optional*, defaults to 5.0): the weight of the retain term of `UnlearningLoss`.
        resume (`bool`, *optional*, defaults to `False`): continue from the latest checkpoint of this run.
        model_card (`dict`, *optional*): extra model-card sections.

    Returns:
        `PluginModel`: the trained assistant, adapters merged, for `LogitDifferenceLogitsProcessor`.
    """
    if not forget_examples or not retain_examples:
        raise ValueError(f"ULD's assistant needs forget and retain examples; got {len(forget_examples)} forget and "
                         f"{len(retain_examples)} retain examples.")
    check_disjoint(forget_examples, retain_examples)
    loss = UnlearningLoss(range(len(forget_examples)), beta=beta)
    examples = ([replace(example, index=i) for i, example in enumerate(forget_examples)]
                + [replace(example, index=len(forget_examples) + i) for i, example in enumerate(retain_examples)])
    assistant = build_assistant(target, num_layers, lora_rank, lora_alpha, tokenizer, base_model_id)
    training = {"method": "ULD assistant: loss NLL(forget) + beta * KL(uniform || assistant)(retain)", "beta": beta,
                "copied layers": num_layers, "LoRA rank": lora_rank, "LoRA alpha": lora_alpha,
                "forget examples": len(forget_examples), "retain examples": len(retain_examples),
                "use with": "hf_plugin.LogitDifferenceLogitsProcessor(assistant, beta=...)"}
    card = {"kind": "uld_assistant", **(model_card or {}),
            "training": {**training, **(model_card or {}).get("training", {})}}
    return train(assistant, examples, examples, loss, args, tokenizer=tokenizer, resume=resume, model_card=card,
                 export=merge_adapters)
