"""Where base-model log-probabilities come from during training: a live model, or a cache written in one pass.

Both give the same thing to the training loop: the NLL of the completion tokens under the combination, from
the reweighter's logits. The cache stores, for every completion position, the base model's top-k token ids and
log-probs and the log-prob of the true next token, so later epochs never run the base model — and a model
behind an API, which only returns top-k log-probs, can be used the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from .combine import align_vocab, combine_logits, combine_topk_nll
from .data import EncodedExample, collate


INDEX_FILE = "index.json"


def completion_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean `(batch, length - 1)` mask of the positions whose next token is a learned (completion) token."""
    return labels[:, 1:] != -100


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """`completion_positions` as a `(batch, length)` mask, for `PluginModel.completion_logits`."""
    return torch.nn.functional.pad(completion_positions(labels), (0, 1), value=False)


def examples_fingerprint(examples: Sequence[EncodedExample]) -> str:
    """A hash of the token ids and labels of the examples, to tie a cache to the exact data it was built from."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return "sha256:" + digest.hexdigest()[:16]


class LiveBaseModel:
    """Runs a frozen in-process base model on every batch (the paper's setup).

    Args:
        model (`PreTrainedModel`): the base model, any dtype or device; it is put in eval mode with gradients off.
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model.eval().requires_grad_(False)

    def nll(self, reweighter_logits: torch.Tensor, batch: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
        """Per-position NLL of the completion tokens under the full combination.

        Args:
            reweighter_logits (`torch.Tensor` of shape `(N, vocab_size)`): the reweighter's logits at the
                `loss_positions(batch["labels"])`, in row-major order (`PluginModel.completion_logits`).
            batch (`dict`): a `hf_plugin.data.collate` batch.
            alpha (`float`): strength of the reweighter.
        """
        with torch.no_grad():
            base_logits = self.model(
                input_ids=batch["input_ids"].to(self.model.device),
                attention_mask=batch["attention_mask"].to(self.model.device),
            ).logits
        positions = completion_positions(batch["labels"])
        base = base_logits[:, :-1][positions.to(base_logits.device)].to(reweighter_logits.device)
        reweighter = align_vocab(reweighter_logits, base.shape[-1])
        targets = batch["labels"][:, 1:][positions].to(reweighter_logits.device)
        return -combine_logits(base, reweighter, alpha).gather(-1, targets[:, None]).squeeze(-1)


@torch.no_grad()
def write_base_cache(
    model: PreTrainedModel,
    examples: Sequence[EncodedExample],
    directory: str | Path,
    k: int = 64,
    batch_size: int = 8,
    examples_per_shard: int = 512,
    pad_token_id: int = 0,
    rank: int = 0,
    world_size: int = 1,
    metadata: dict | None = None,
) -> Path:
    """Runs the base model once over `examples` and writes its top-k log-probs at every completion position.

    Shards of `examples_per_shard` consecutive examples are written atomically (a temporary name, then a rename),
    so an interrupted run is resumed by calling this again: finished shards are skipped. With several processes,
    process `rank` of `world_size` writes every `world_size`-th shard; rank 0 writes the index once all shards
    exist (call it on every process, then synchronise, then read).

    Args:
        model (`PreTrainedModel`): the frozen base model.
        examples (`Sequence[EncodedExample]`): the tokenised data, in the order training will index it.
        directory (`str` or `Path`): where the cache goes.
        k (`int`, *optional*, defaults to 64): how many top tokens to keep per position.
        batch_size (`int`, *optional*, defaults to 8): base-model batch size.
        examples_per_shard (`int`, *optional*, defaults to 512): examples per file.
        pad_token_id (`int`, *optional*, defaults to 0): id used to pad batches.
        rank, world_size (`int`, *optional*): this process and the number of processes.
        metadata (`dict`, *optional*): recorded in the index (e.g. base model name, tokenizer fingerprint).

    Returns:
        `Path`: the cache directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    shards = [list(range(start, min(start + examples_per_shard, len(examples))))
              for start in range(0, len(examples), examples_per_shard)]
    names = [f"shard-{number:05d}.safetensors" for number in range(len(shards))]
    for number in range(rank, len(shards), world_size):
        path = directory / names[number]
        if path.exists():
            continue
        tensors = _shard_tensors(model, [examples[i] for i in shards[number]], k, batch_size, pad_token_id)
        temporary = path.with_suffix(".tmp")
        save_file(tensors, str(temporary))
        os.replace(temporary, path)
    if rank == 0 and all((directory / name).exists() for name in names):
        index = {
            "k": k, "vocab_size": model.get_output_embeddings().weight.shape[0], "num_examples": len(examples),
            "examples_per_shard": examples_per_shard, "shards": names,
            "examples_fingerprint": examples_fingerprint(examples), **(metadata or {}),
        }
        temporary = directory / (INDEX_FILE + ".tmp")
        temporary.write_text(json.dumps(index, indent=2))
        os.replace(temporary, directory / INDEX_FILE)
    return directory


def _shard_tensors(model, examples, k, batch_size, pad_token_id) -> dict[str, torch.Tensor]:
    ids, values, label_values, counts = [], [], [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(model.device),
                       attention_mask=batch["attention_mask"].to(model.device)).logits
        positions = completion_positions(batch["labels"])
        log_probs = torch.log_softmax(logits[:, :-1][positions.to(logits.device)].float(), dim=-1).cpu()
        targets = batch["labels"][:, 1:][positions]
        top_values, top_ids = log_probs.topk(k, dim=-1)
        ids.append(top_ids.to(torch.int32))
        values.append(top_values.to(torch.float16))
        label_values.append(log_probs.gather(-1, targets[:, None]).squeeze(-1))
        counts.append(positions.sum(dim=1))
    counts = torch.cat(counts)
    return {
        "topk_ids": torch.cat(ids), "topk_logprobs": torch.cat(values), "label_logprobs": torch.cat(label_values),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
    }


class CachedBaseLogits:
    """Reads a cache written by `write_base_cache`; never loads the base model.

    Args:
        directory (`str` or `Path`): the cache.
        examples (`Sequence[EncodedExample]`): the same tokenised data the cache was built from (checked).
    """

    def __init__(self, directory: str | Path, examples: Sequence[EncodedExample]):
        directory = Path(directory)
        index_path = directory / INDEX_FILE
        if not index_path.exists():
            raise FileNotFoundError(f"{directory} holds no complete base-logit cache (no {INDEX_FILE}); write it first.")
        self.index = json.loads(index_path.read_text())
        if self.index["examples_fingerprint"] != examples_fingerprint(examples):
            raise ValueError(
                f"The cache in {directory} was built from other data or another tokenization "
                f"({self.index['examples_fingerprint']} vs {examples_fingerprint(examples)}); rebuild it."
            )
        shards = [load_file(str(directory / name)) for name in self.index["shards"]]
        self.topk_ids = torch.cat([s["topk_ids"] for s in shards])
        self.topk_logprobs = torch.cat([s["topk_logprobs"] for s in shards])
        self.label_logprobs = torch.cat([s["label_logprobs"] for s in shards])
        counts = torch.cat([s["offsets"].diff() for s in shards])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()
        self.vocab_size = self.index["vocab_size"]

    def nll(self, reweighter_logits: torch.Tensor, batch: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
        """Per-position NLL of the completion tokens under the top-k combination (arguments as `LiveBaseModel.nll`)."""
        rows = [torch.arange(self.offsets[i], self.offsets[i + 1]) for i in batch["index"].tolist()]
        rows = torch.cat(rows)
        positions = completion_positions(batch["labels"])
        if int(positions.sum()) != len(rows):
            raise ValueError("The batch does not match the cache's completion positions; rebuild the cache.")
        device = reweighter_logits.device
        reweighter = align_vocab(reweighter_logits, self.vocab_size)
        return combine_topk_nll(
            reweighter, self.topk_ids[rows].to(device), self.topk_logprobs[rows].to(device),
            batch["labels"][:, 1:][positions].to(device), self.label_logprobs[rows].to(device), alpha,
        )
