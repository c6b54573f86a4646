"""Tiny offline models and tokenizers shared by the tests."""

from __future__ import annotations

import csv

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LogitsProcessor,
                          PreTrainedTokenizerFast)

from hf_plugin import PluginConfig, PluginModel


VOCAB = 96
PAD, BOS, EOS = 0, 1, 2
WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def make_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in-process: `[PAD]`, `[BOS]`, `[EOS]`, `[UNK]` and then `words`."""
    vocab = {"[PAD]": PAD, "[BOS]": BOS, "[EOS]": EOS, "[UNK]": 3}
    vocab.update({word: i + 4 for i, word in enumerate(words)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]",
        padding_side="left",
    )


def make_base(arch: str, vocab_size: int = VOCAB, seed: int = 0, pad_token_id: int = PAD) -> torch.nn.Module:
    """A tiny random base model, LLaMA-style or GPT-2-style."""
    torch.manual_seed(seed)
    special = dict(pad_token_id=pad_token_id, bos_token_id=BOS, eos_token_id=EOS)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **special,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, **special)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    model.generation_config.pad_token_id = pad_token_id
    return model.eval()

class Recorder(LogitsProcessor):
    """Wraps a logits processor and keeps every call's input ids, incoming scores and returned scores."""

    def __init__(self, processor):
        self.processor = processor
        self.calls = []

    def __call__(self, input_ids, scores):
        out = self.processor(input_ids, scores)
        self.calls.append((input_ids.clone(), scores.clone(), out.clone()))
        return out


def prompts(tokenizer, texts):
    """The left-padded ids and attention mask of `texts`."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def full_mask(input_ids, prompt_mask):
    """The mask generate() uses: the prompts' mask (repeated per returned row/beam), then ones."""
    rows, length = input_ids.shape
    mask = prompt_mask.repeat_interleave(rows // prompt_mask.shape[0], dim=0)
    return torch.cat([mask, mask.new_ones(rows, length - mask.shape[1])], dim=1)


def make_plugin(arch: str, vocab_size: int = VOCAB, seed: int = 1, **config_kwargs) -> PluginModel:
    """A tiny random reweighter: the default LLaMA-style one, or one with a GPT-2 backbone."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = PluginConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                              max_position_embeddings=128, **config_kwargs)
        plugin = PluginModel(config)
    elif arch == "gpt2":
        backbone = GPT2LMHeadModel(
            GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=128, bos_token_id=BOS, eos_token_id=EOS)
        )
        plugin = PluginModel.from_causal_lm(backbone, **config_kwargs)
    else:
        raise ValueError(arch)
    # Random tiny models are nearly uniform; sharpen the output so that the reweighter visibly changes decoding.
    with torch.no_grad():
        plugin.get_output_embeddings().weight.mul_(20.0)
    return plugin.eval()


def task_rows(count: int, offset: int = 0, references: int = 1) -> list[tuple[str, str]]:
    """A learnable task over the words `w0`..`w39`: each prompt with `references` rows (one row each for training),
    the completion a fixed function of the prompt, its last word telling the references apart."""
    rows = []
    for i in range(offset, offset + count):
        a, b = i % 17, (i * 7) % 19
        rows += [(f"w{a} w{b}", f"w{a + 20} w{b + 20} w{39 - r}") for r in range(references)]
    return rows


def write_csv(path, rows, header=("mr", "ref")):
    """Writes `rows` under `header` as a CSV file; returns its path."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def task_folder(root, train: int, validation: int):
    """`root` holding a saved tiny LLaMA-style base with its tokenizer (`base/`) and task CSVs of `train` and
    `validation` rows, as a user's folder for the CLI would."""
    make_base("llama").save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    write_csv(root / "train.csv", task_rows(train))
    write_csv(root / "validation.csv", task_rows(validation, offset=100))
    return root
