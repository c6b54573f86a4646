"""Writing the training cache through a server: the same files `write_base_cache` writes for an in-process base."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState

from ..base_cache import write_base_cache
from ..compatibility import tokenizer_fingerprint
from ..data import EncodedExample
from .client import RemoteBase


# Smaller shards than in-process (512): a run stopped by a timeout or --max-requests loses less.
REMOTE_EXAMPLES_PER_SHARD = 64


class RemoteCacheSource:
    """The `hf_plugin.base_cache.ShardSource` that lets `write_base_cache` write a cache from a `RemoteBase`: one
    teacher-forcing request per example, up to the base's `concurrency` at once. The cache holds the top-k only (no
    task vocabulary)."""

    def __init__(self, remote: RemoteBase):
        self.remote = remote
        self.vocab_size = remote.vocab_size

    def shard_tensors(self, examples: Sequence[EncodedExample], k: int, bar) -> dict[str, torch.Tensor]:
        for example in examples:  # before any request
            targets = [t for t in range(1, len(example.labels)) if example.labels[t] != -100]
            if not targets or len(targets) != targets[-1] - targets[0] + 1:
                raise ValueError(f"Example {example.index} has no completion, or learned tokens between prompt tokens; "
                                 "a remote cache needs one completion after its prompt.")
        # A shard is all or nothing: one cut short by max_requests would waste the requests it made.
        self.remote.check_budget(len(examples))
        self.remote.probe()  # once, before the concurrent requests

        def one(example: EncodedExample):
            start = next(t for t in range(1, len(example.labels)) if example.labels[t] != -100)
            rows = self.remote.prompt_logprobs(example.input_ids, k=k, start=start)
            bar.update(len(rows.label_logprobs))
            return rows

        results = self.remote.map(one, list(examples))
        counts = torch.tensor([len(rows.label_logprobs) for rows in results])
        return {
            "topk_ids": torch.cat([rows.topk_ids for rows in results]).to(torch.int32),
            "topk_logprobs": torch.cat([rows.topk_logprobs for rows in results]).to(torch.float16),
            "label_logprobs": torch.cat([rows.label_logprobs for rows in results]).float(),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
        }


def write_remote_caches(
    remote: RemoteBase,
    splits: dict[str, Sequence[EncodedExample]],
    cache_dir: str | Path,
    k: int | None = None,
    base_model_id: str | None = None,
    overwrite: bool = False,
    examples_per_shard: int = REMOTE_EXAMPLES_PER_SHARD,
    progress: bool = True,
) -> dict:
    """Writes `cache_dir/<split>` for every split through the server, resuming finished shards.

    The caches are the files an in-process pass writes (read them with `CachedBaseLogits`, or `hf-plugin train
    --cache DIR --task-vocab-size 0`). Their manifest records `remote_base` (the served model's name), the policy for
    unidentifiable labels, and `task_vocab_size` 0: a training run that expects a task vocabulary refuses them.

    Args:
        remote (`RemoteBase`): the server (probed before the first shard left to write).
        splits (`dict[str, Sequence[EncodedExample]]`): the tokenised data of each split.
        cache_dir (`str` or `Path`): the folder of the caches.
        k (`int`, *optional*): top log-probs per position; defaults to `remote.top_k`.
        base_model_id (`str`, *optional*): the Hub id of the served model, recorded as the base a reweighter trained
            on the cache is bound to; defaults to the served name.
        overwrite (`bool`, *optional*, defaults to `False`): replace caches of other data or another k.
        examples_per_shard (`int`, *optional*, defaults to 64): examples per shard (the unit of resuming).
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Returns:
        `dict`: the report: requests, prompt tokens sent, seconds, labels replaced by a bound, ambiguous entries
        dropped.
    """
    before = dict(vars(remote.stats))
    start = time.perf_counter()
    k = k or remote.top_k  # the server is probed before the first shard it writes: none for finished caches
    metadata = {
        "base_model_name_or_path": base_model_id or remote.model, "base_model_revision": None,
        "base_model_file": None, "tokenizer_fingerprint": tokenizer_fingerprint(remote.tokenizer),
        "remote_base": remote.model, "unknown_labels": remote.unknown_labels,
    }
    for name, examples in splits.items():
        write_base_cache(RemoteCacheSource(remote), examples, Path(cache_dir) / name, k=k,
                         examples_per_shard=examples_per_shard, metadata=metadata, accelerator=PartialState(),
                         overwrite=overwrite, progress=progress)
    report = {key: value - before[key] for key, value in vars(remote.stats).items()}
    report["wall_seconds"] = time.perf_counter() - start
    return report
