"""The base-logit cache: the base model's top-k log-probs at every completion position, written in one pass.

The cache stores, for every completion position, the base model's top-k token ids and log-probs, the log-prob of the
true next token and, optionally, the log-probs of the task vocabulary (the tokens the training completions use), so
later epochs never run the base model — and a model behind an API, which only returns top-k log-probs, can be used
the same way. `CachedBaseLogits` reads it as a `hf_plugin.base_logits.LossSource`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .combine import align_vocab, combine_topk_nll
from .compatibility import base_model_identity, binding_kwargs
from .completions import DEFAULT_TASK_VOCAB_SIZE, completion_positions, examples_fingerprint, task_vocabulary
from .data import EncodedExample, collate


@runtime_checkable
class ShardSource(Protocol):
    """A base model that `write_base_cache` cannot run itself (e.g. one behind an API,
    `hf_plugin.remote.RemoteCacheSource`): it computes each shard's tensors, top-k only (no task vocabulary).

    Attributes:
        vocab_size (`int`): the base's vocabulary size.
    """

    vocab_size: int

    def shard_tensors(self, examples: Sequence[EncodedExample], k: int, bar) -> dict[str, torch.Tensor]:
        """The tensors of one shard, as `write_base_cache` stores them (`topk_ids`, `topk_logprobs`,
        `label_logprobs`, `offsets`); `bar` is the progress bar, advanced by the positions done."""


INDEX_FILE = "index.json"

# Index fields that tie a cache to its data, its layout and its base model: a directory whose cache differs in
# any of them holds another cache, and its shards must not be reused.
IDENTITY_FIELDS = (
    "examples_fingerprint", "num_examples", "k", "examples_per_shard", "shards", "vocab_size",
    "base_model_name_or_path", "base_model_revision", "base_model_file", "tokenizer_fingerprint",
    "task_vocab_size", "task_vocab_fingerprint", "remote_base", "unknown_labels",
)
MANIFEST_FILE = "manifest.json"
SHARD_PATTERN = "shard-*.safetensors"
# Log-probs are stored in float16: allow its rounding above 0 in the plausibility checks.
LOGPROB_TOLERANCE = 1e-2


def _write_json(path: Path, content: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=2))
    os.replace(temporary, path)


def _differences(found: dict, expected: dict) -> list[str]:
    """The identity fields of `expected` that `found` (a manifest or index) does not share."""
    return [f"{key} {found.get(key)!r} != {expected[key]!r}" for key in IDENTITY_FIELDS
            if key != "shards" and key in expected and found.get(key) != expected[key]]


def _stale_cache_error(directory: Path, differences: list[str]) -> ValueError:
    return ValueError(
        f"{directory} holds a base-logit cache of other data or another base ({'; '.join(differences)}); "
        "write the cache to a fresh directory, or overwrite it (overwrite=True, `--overwrite-cache`)."
    )


def check_top_k(k: int, vocab_size: int) -> None:
    """Raises unless `1 <= k <= vocab_size` (a cache of top-0 log-probs, or of more tokens than exist, is useless)."""
    if not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(f"k (--top-k) must be between 1 and the vocabulary size {vocab_size}, got {k!r}.")


@torch.no_grad()
def write_base_cache(
    model: PreTrainedModel | ShardSource,
    examples: Sequence[EncodedExample],
    directory: str | Path,
    k: int = 64,
    batch_size: int = 8,
    examples_per_shard: int = 512,
    pad_token_id: int = 0,
    metadata: dict | None = None,
    accelerator=None,
    overwrite: bool = False,
    progress: bool = True,
    task_vocab: Sequence[int] | None = None,
) -> Path:
    """Runs the base model once over `examples` and writes its top-k log-probs at every completion position.

    With `task_vocab` (see `task_vocabulary`), the base log-probs of those tokens are stored at every position too.

    A manifest naming the data (`examples_fingerprint`), `k`, the shard layout and the base model is written
    before any shard, and each shard records the fingerprint and its number in its safetensors metadata. Shards
    of `examples_per_shard` consecutive examples are written atomically (a temporary name, then a rename), so an
    interrupted run is resumed by calling this again with the same arguments: finished shards are kept (a run that
    fails before its first shard removes the manifest again, leaving no cache behind). A directory holding a cache
    of other data, another `k` or another base raises, unless `overwrite=True`, which deletes that cache first.

    With several processes, call it on every process: process `i` of `n` writes every `n`-th shard, the main
    process waits for all of them and writes the index (`index.json`, the manifest marked complete), and every
    process returns once the index exists.

    Args:
        model (`PreTrainedModel` or `ShardSource`): the frozen base model, or an object computing a shard's tensors
            itself (a base behind an API, see `hf_plugin.remote.RemoteCacheSource`; no task vocabulary then).
        examples (`Sequence[EncodedExample]`): the tokenised data, in the order training will index it.
        directory (`str` or `Path`): where the cache goes.
        k (`int`, *optional*, defaults to 64): how many top tokens to keep per position (1 to the vocabulary size).
        batch_size (`int`, *optional*, defaults to 8): base-model batch size.
        examples_per_shard (`int`, *optional*, defaults to 512): examples per file.
        pad_token_id (`int`, *optional*, defaults to 0): id used to pad batches.
        metadata (`dict`, *optional*): recorded in the index and compared on resume (e.g. `base_model_name_or_path`,
            `base_model_revision`, `base_model_file`, `tokenizer_fingerprint`); never a local path.
        accelerator (`accelerate.Accelerator` or `accelerate.PartialState`, *optional*): the processes sharing the
            work; defaults to `PartialState()` (one process unless launched distributed).
        overwrite (`bool`, *optional*, defaults to `False`): delete a cache of other data found in `directory`.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar (positions per second) on the main
            process.
        task_vocab (`Sequence[int]`, *optional*): token ids whose base log-probs are also stored at every position
            (2 bytes each per position); the same list for every split of a task (the training split's).

    Returns:
        `Path`: the cache directory.
    """
    directory = Path(directory)
    # A base seen only through its top-k log-probs (`hf_plugin.remote`) computes its own shards.
    remote = isinstance(model, ShardSource)
    vocab_size = model.vocab_size if remote else model.get_output_embeddings().weight.shape[0]
    check_top_k(k, vocab_size)
    state = accelerator if accelerator is not None else PartialState()
    shards = [list(range(start, min(start + examples_per_shard, len(examples))))
              for start in range(0, len(examples), examples_per_shard)]
    names = [f"shard-{number:05d}.safetensors" for number in range(len(shards))]
    fingerprint = examples_fingerprint(examples)
    task_ids = _check_task_vocab(task_vocab, vocab_size)
    if remote and task_ids is not None:
        raise ValueError("A base seen only through top-k log-probs has no task-vocabulary log-probs: task_vocab=None.")
    manifest = {
        "k": k, "vocab_size": vocab_size, "num_examples": len(examples), "examples_per_shard": examples_per_shard,
        "shards": names, "examples_fingerprint": fingerprint, **_task_vocab_fields(task_ids), **(metadata or {}),
    }
    _claim_directory(directory, manifest, overwrite, state)
    mine = [number for number in range(state.process_index, len(shards), state.num_processes)
            if not _shard_is_written(directory / names[number], fingerprint, number)]
    positions = sum(_completion_counts([examples[i] for n in mine for i in shards[n]]))
    try:
        with tqdm(total=positions, unit="pos", unit_scale=True, desc=f"Base-logit cache {directory.name}",
                  disable=not (progress and state.is_main_process)) as bar:
            for number in mine:
                chunk = [examples[i] for i in shards[number]]
                tensors = (model.shard_tensors(chunk, k, bar) if remote else
                           _shard_tensors(model.eval(), chunk, k, batch_size, pad_token_id, bar, task_ids))
                temporary = (directory / names[number]).with_suffix(".tmp")
                save_file(tensors, str(temporary), metadata={"examples_fingerprint": fingerprint, "shard": str(number)})
                os.replace(temporary, directory / names[number])
    except BaseException:
        # A pass that failed before any shard (a server down or refusing the key, a wrong model name) leaves no
        # manifest: one naming a cache that holds nothing would make the corrected rerun refuse it as another cache,
        # and training call it unfinished. Once a shard is written the manifest stays: resuming checks against it.
        if state.is_main_process and not any(directory.glob(SHARD_PATTERN)):
            (directory / MANIFEST_FILE).unlink(missing_ok=True)
        raise
    state.wait_for_everyone()  # the index needs every process's shards
    if state.is_main_process:
        _write_json(directory / INDEX_FILE, manifest)
    state.wait_for_everyone()
    return directory


def _check_task_vocab(task_vocab: Sequence[int] | None, vocab_size: int) -> torch.Tensor | None:
    if task_vocab is None:
        return None
    ids = torch.as_tensor(list(task_vocab), dtype=torch.long)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError("task_vocab must be a non-empty list of token ids (or None for no task vocabulary).")
    if bool(((ids < 0) | (ids >= vocab_size)).any()) or len(ids.unique()) != len(ids):
        raise ValueError(f"task_vocab must hold distinct token ids between 0 and {vocab_size - 1}.")
    return ids


def _task_vocab_fields(task_ids: torch.Tensor | None) -> dict:
    """Manifest fields of the task vocabulary: its size and a fingerprint (identity), and the ids themselves."""
    if task_ids is None:
        return {"task_vocab_size": 0, "task_vocab_fingerprint": None}
    ids = task_ids.tolist()
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    return {"task_vocab_size": len(ids), "task_vocab_fingerprint": "sha256:" + digest, "task_vocab": ids}


def _claim_directory(directory: Path, manifest: dict, overwrite: bool, state) -> None:
    """Refuses (or, with `overwrite`, clears) a directory holding a cache of other data, then writes the manifest."""
    found = directory / MANIFEST_FILE
    holds = any(directory.glob(SHARD_PATTERN)) or (directory / INDEX_FILE).exists()
    # A manifest alone (a pass killed before its first shard) holds nothing to protect: it is claimed anew.
    differences = _differences(json.loads(found.read_text()), manifest) if found.exists() and holds else (
        ["shards or an index without a manifest"] if holds else [])
    if differences and not overwrite:
        raise _stale_cache_error(directory, differences)
    if state.is_main_process and (differences or not holds):
        directory.mkdir(parents=True, exist_ok=True)
        for path in [*directory.glob(SHARD_PATTERN), directory / INDEX_FILE]:
            path.unlink(missing_ok=True)
        _write_json(found, manifest)
    state.wait_for_everyone()  # no shard before the manifest that names its data


def _shard_is_written(path: Path, fingerprint: str, number: int) -> bool:
    if not path.exists():
        return False
    with safe_open(str(path), framework="pt") as handle:
        found = handle.metadata() or {}
    if found.get("examples_fingerprint") != fingerprint or found.get("shard") != str(number):
        raise ValueError(f"{path} was written for other data ({found or 'no fingerprint'}); delete it or the cache.")
    return True


def _completion_counts(examples: Sequence[EncodedExample]) -> list[int]:
    """Completion positions of each example, as `completion_positions` counts them in a batch."""
    return [sum(label != -100 for label in example.labels[1:]) for example in examples]


def _shard_tensors(model, examples, k, batch_size, pad_token_id, bar, task_ids=None) -> dict[str, torch.Tensor]:
    ids, values, label_values, task_values, counts = [], [], [], [], []
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
        if task_ids is not None:
            task_values.append(log_probs[:, task_ids].to(torch.float16))
        counts.append(positions.sum(dim=1))
        bar.update(len(targets))
    counts = torch.cat(counts)
    tensors = {
        "topk_ids": torch.cat(ids), "topk_logprobs": torch.cat(values), "label_logprobs": torch.cat(label_values),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
    }
    if task_ids is not None:
        tensors["task_logprobs"] = torch.cat(task_values)
    return tensors


def _check_shard(path: Path, tensors: dict[str, torch.Tensor], expected_counts: list[int], vocab_size: int,
                 task_vocab_size: int = 0) -> None:
    """Cheap plausibility checks of one shard, naming it: log-probs of a distribution, offsets of this data."""
    top, label = tensors["topk_logprobs"].float(), tensors["label_logprobs"].float()
    task = tensors.get("task_logprobs", torch.zeros(len(top), 0)).float()
    counts = tensors["offsets"].diff().tolist()
    problems = {
        "task-vocabulary log-probs missing or of the wrong shape": tuple(task.shape) != (len(top), task_vocab_size),
        "non-finite or positive task-vocabulary log-probs": bool(
            task.numel() and (not torch.isfinite(task).all() or (task > LOGPROB_TOLERANCE).any())),
        "task-vocabulary mass above 1": bool(task.numel() and (task.logsumexp(-1) > LOGPROB_TOLERANCE).any()),
        "non-finite log-probs": not (torch.isfinite(top).all() and torch.isfinite(label).all()),
        "positive log-probs": bool((top > LOGPROB_TOLERANCE).any() or (label > LOGPROB_TOLERANCE).any()),
        "top-k log-probs not sorted in descending order": bool((top.diff(dim=-1) > LOGPROB_TOLERANCE).any()),
        "top-k mass above 1": bool((top.logsumexp(-1) > LOGPROB_TOLERANCE).any()),
        "token ids outside the vocabulary": bool(((tensors["topk_ids"] < 0) | (tensors["topk_ids"] >= vocab_size)).any()),
        "offsets that do not match the data's completion positions": (
            counts != expected_counts or int(tensors["offsets"][0]) != 0 or int(tensors["offsets"][-1]) != len(top)),
    }
    found = [problem for problem, present in problems.items() if present]
    if found:
        raise ValueError(f"Corrupt base-logit cache shard {path}: {', '.join(found)}; write the cache again "
                         "(a fresh directory, or overwrite=True / `--overwrite-cache`).")


@dataclass
class BaseCachePlan:
    """What `plan_base_caches` found under a cache folder: the splits whose cache is still to be written (by the
    base model) and what `open_base_caches` needs to write and read them.

    Attributes:
        cache_dir (`Path`): the folder of the caches, one subfolder per split.
        splits (`dict[str, Sequence[EncodedExample]]`): the tokenised data of each split.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer that encoded the splits.
        to_write (`list[str]`): the splits whose cache is missing, unfinished or (with `overwrite`) stale; the base
            model is needed only when it is not empty.
        k (`int`): top tokens kept per position in the caches to write.
        task_ids (`list[int]`, *optional*): the task vocabulary every split stores, or `None` for top-k only.
        overwrite (`bool`): whether stale caches are replaced.
        base_model_id (`str`, *optional*): the base model's Hub id when it is loaded from a local folder or file.
    """

    cache_dir: Path
    splits: dict[str, Sequence[EncodedExample]]
    tokenizer: PreTrainedTokenizerBase
    to_write: list[str]
    k: int
    task_ids: list[int] | None
    overwrite: bool = False
    base_model_id: str | None = None


def plan_base_caches(
    tokenizer: PreTrainedTokenizerBase,
    splits: dict[str, Sequence[EncodedExample]],
    cache_dir: str | Path,
    k: int = 64,
    base_model_id: str | None = None,
    overwrite: bool = False,
    base_name_or_path: str | None = None,
    task_vocab_size: int = DEFAULT_TASK_VOCAB_SIZE,
) -> BaseCachePlan:
    """Checks the caches of several splits under `cache_dir` against the data, without the base model, and says
    which are still to be written. The first step of `cached_base_sources`; `open_base_caches` is the second.

    Args: as `cached_base_sources`.

    Returns:
        `BaseCachePlan`: what `open_base_caches` writes (with the base model, when `to_write` is not empty) and reads.

    Raises:
        `ValueError`: a bad `k` or `task_vocab_size`, a cache of other data or another base (unless `overwrite`), or
            an unfinished cache written through a server.
    """
    check_top_k(k, len(tokenizer))
    if not isinstance(task_vocab_size, int) or task_vocab_size < 0:
        raise ValueError(f"task_vocab_size (--task-vocab-size) must be 0 (off) or positive, got {task_vocab_size!r}.")
    task_ids = task_vocabulary(splits.get("train", next(iter(splits.values()))), task_vocab_size) if task_vocab_size else None
    task_fields = _task_vocab_fields(_check_task_vocab(task_ids, len(tokenizer)))
    directories = {name: Path(cache_dir) / name for name in splits}
    to_write, unstarted, through_server = [], [], None
    for name, examples in splits.items():
        # A complete cache is read with its own k; an unfinished one is resumed only with the same k.
        complete = (directories[name] / INDEX_FILE).exists()
        found = directories[name] / (INDEX_FILE if complete else MANIFEST_FILE)
        expected = {"examples_fingerprint": examples_fingerprint(examples), "num_examples": len(examples),
                    "task_vocab_size": task_fields["task_vocab_size"],
                    "task_vocab_fingerprint": task_fields["task_vocab_fingerprint"], **({} if complete else {"k": k})}
        if base_name_or_path is not None:
            identity = base_model_identity(base_name_or_path, base_model_id)
            expected.update(zip(("base_model_name_or_path", "base_model_file"), identity))
        written = json.loads(found.read_text()) if found.exists() else {}
        if not found.exists():
            unstarted.append(name)
        if written.get("remote_base"):  # written through a server: bound by name and tokenizer, not by the base given
            through_server = written["remote_base"]
            if not complete:  # the in-process base must not finish it
                raise ValueError(f"{directories[name]} holds an unfinished cache written through a server (model "
                                 f"{written['remote_base']!r}): finish it with hf-plugin cache --base-url.")
            for key in ("base_model_name_or_path", "base_model_file"):
                expected.pop(key, None)
        differences = _differences(written, expected) if found.exists() else []
        if differences and not overwrite:  # said before the base model is loaded
            if written.get("remote_base") and written.get("task_vocab_size") == 0:
                differences.append("a cache written through a server has no task vocabulary: use task_vocab_size=0 "
                                   "(`--task-vocab-size 0`)")
            raise _stale_cache_error(directories[name], differences)
        if differences or not complete:
            to_write.append(name)
    if through_server is not None and unstarted:  # a server's pass stopped before these splits (no manifest left)
        raise ValueError(f"{Path(cache_dir)} holds an unfinished cache written through a server (model "
                         f"{through_server!r}; no {', '.join(unstarted)} split yet): finish it with hf-plugin cache "
                         "--base-url.")
    return BaseCachePlan(Path(cache_dir), dict(splits), tokenizer, to_write, k, task_ids, overwrite, base_model_id)


def open_base_caches(
    plan: BaseCachePlan,
    base: PreTrainedModel | None = None,
    batch_size: int = 8,
    revision: str | None = None,
    accelerator=None,
) -> tuple[dict[str, CachedBaseLogits], dict]:
    """Writes the caches `plan` found missing with the base model, then reads every split's. The second step of
    `cached_base_sources`.

    Args:
        plan (`BaseCachePlan`): what `plan_base_caches` found.
        base (`PreTrainedModel`, *optional*): the frozen base model; needed only when `plan.to_write` is not empty.
        batch_size, revision, accelerator: as `cached_base_sources`.

    Returns: as `cached_base_sources`.
    """
    tokenizer = plan.tokenizer
    directories = {name: plan.cache_dir / name for name in plan.splits}
    if plan.to_write:
        if base is None:
            raise ValueError(f"The base-logit caches of {', '.join(plan.to_write)} in {plan.cache_dir} are still to "
                             "be written: pass the base model.")
        if accelerator is not None:
            base.to(accelerator.device)
        binding = binding_kwargs(base, tokenizer, revision=revision, base_model_id=plan.base_model_id)
        metadata = {key: binding[key] for key in ("base_model_name_or_path", "base_model_revision", "base_model_file",
                                                  "tokenizer_fingerprint")}
        for name in plan.to_write:
            write_base_cache(base, plan.splits[name], directories[name], k=plan.k, batch_size=batch_size,
                             pad_token_id=tokenizer.pad_token_id, metadata=metadata, accelerator=accelerator,
                             overwrite=plan.overwrite, task_vocab=plan.task_ids)
    sources = {name: CachedBaseLogits(directories[name], examples) for name, examples in plan.splits.items()}
    index = next(iter(sources.values())).index
    binding = binding_kwargs(tokenizer=tokenizer)
    if index.get("tokenizer_fingerprint", binding["tokenizer_fingerprint"]) != binding["tokenizer_fingerprint"]:
        raise ValueError(f"The cache in {plan.cache_dir} was written with tokenizer {index['tokenizer_fingerprint']}, "
                         f"not the tokenizer given ({binding['tokenizer_fingerprint']}).")
    binding.update(base_vocab_size=index["vocab_size"], base_model_name_or_path=index.get("base_model_name_or_path"),
                   base_model_revision=index.get("base_model_revision"), base_model_file=index.get("base_model_file"))
    return sources, binding


def cached_base_sources(
    load_base: Callable[[], PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    splits: dict[str, Sequence[EncodedExample]],
    cache_dir: str | Path,
    k: int = 64,
    batch_size: int = 8,
    revision: str | None = None,
    base_model_id: str | None = None,
    accelerator=None,
    overwrite: bool = False,
    base_name_or_path: str | None = None,
    task_vocab_size: int = DEFAULT_TASK_VOCAB_SIZE,
) -> tuple[dict[str, CachedBaseLogits], dict]:
    """Base-logit caches of several splits, written first where missing, and the binding of a new reweighter.

    `cache_dir/<split>` holds each split's cache. Every split stores the base log-probs of the same task vocabulary:
    the tokens of the `train` split's completions (of the first split when there is no `train`). The base model is
    loaded (by calling `load_base`) only when a cache must be written; otherwise the binding is read from the
    caches, which record the base they came from. The two steps, `plan_base_caches` (checks, no base model) and
    `open_base_caches` (writes with the base model, reads), can also be called apart, e.g. to load the base model
    only once the plan says it is needed.

    Args:
        load_base (`Callable[[], PreTrainedModel]`): returns the frozen base model; called at most once.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer that encoded the splits.
        splits (`dict[str, Sequence[EncodedExample]]`): the tokenised data of each split, e.g. `train`, `validation`.
        cache_dir (`str` or `Path`): the folder of the caches.
        k (`int`, *optional*, defaults to 64): top tokens kept per position, 1 to `len(tokenizer)`.
        batch_size (`int`, *optional*, defaults to 8): base-model batch size while writing.
        revision (`str`, *optional*): the base model's revision on the Hub, recorded.
        base_model_id (`str`, *optional*): the base model's Hub id when it is loaded from a local folder or file.
        accelerator (`accelerate.Accelerator`, *optional*): the processes sharing the cache pass (see
            `write_base_cache`); the base model is moved to its device.
        overwrite (`bool`, *optional*, defaults to `False`): replace caches of other data found in `cache_dir`.
        base_name_or_path (`str`, *optional*): what `load_base` loads (a Hub id, folder or `.gguf` file); caches
            written from another base model are then refused instead of silently binding to that other base.
        task_vocab_size (`int`, *optional*, defaults to 2048): the most task-vocabulary tokens whose log-probs are
            cached at every position (see `task_vocabulary`); 0 caches the top-k only. A cache written with another
            task vocabulary is refused like one of other data.

    Returns:
        `tuple[dict[str, CachedBaseLogits], dict]`: the cache of each split, and `PluginConfig` keyword arguments
        binding a reweighter to the base model and tokenizer (see `hf_plugin.binding_kwargs`).
    """
    plan = plan_base_caches(tokenizer, splits, cache_dir, k=k, base_model_id=base_model_id, overwrite=overwrite,
                            base_name_or_path=base_name_or_path, task_vocab_size=task_vocab_size)
    return open_base_caches(plan, load_base() if plan.to_write else None, batch_size=batch_size, revision=revision,
                            accelerator=accelerator)


class CachedBaseLogits:
    """Reads a cache written by `write_base_cache`; never loads the base model.

    Every shard is checked against the data (its fingerprint and completion positions) and for plausibility
    (finite, sorted log-probs of at most probability 1), so a stale or corrupt cache raises instead of training on
    wrong log-probs.

    Args:
        directory (`str` or `Path`): the cache.
        examples (`Sequence[EncodedExample]`): the same tokenised data the cache was built from (checked).
        task_vocab_size (`int`, *optional*): use only the most frequent `task_vocab_size` tokens of the cached task
            vocabulary (0: none, the top-k bound alone); defaults to all of them.
    """

    def __init__(self, directory: str | Path, examples: Sequence[EncodedExample], task_vocab_size: int | None = None):
        directory = Path(directory)
        index_path = directory / INDEX_FILE
        if not index_path.exists():
            raise FileNotFoundError(f"{directory} holds no complete base-logit cache (no {INDEX_FILE}); write it first.")
        self.index = json.loads(index_path.read_text())
        fingerprint = examples_fingerprint(examples)
        if self.index["examples_fingerprint"] != fingerprint:
            raise ValueError(
                f"The cache in {directory} was built from other data or another tokenization "
                f"({self.index['examples_fingerprint']} vs {fingerprint}); write it again for this data, in a fresh "
                "directory or with overwrite=True (`--overwrite-cache`)."
            )
        self.vocab_size = self.index["vocab_size"]
        counts = _completion_counts(examples)
        per_shard = self.index["examples_per_shard"]
        shards = []
        for number, name in enumerate(self.index["shards"]):
            path = directory / name
            if not _shard_is_written(path, fingerprint, number):
                raise FileNotFoundError(f"The base-logit cache shard {path} is missing; write the cache again.")
            shards.append(load_file(str(path)))
            _check_shard(path, shards[-1], counts[number * per_shard : (number + 1) * per_shard], self.vocab_size,
                         self.index.get("task_vocab_size", 0))
        self.topk_ids = torch.cat([s["topk_ids"] for s in shards])
        self.topk_logprobs = torch.cat([s["topk_logprobs"] for s in shards])
        self.label_logprobs = torch.cat([s["label_logprobs"] for s in shards])
        stored = self.index.get("task_vocab_size", 0)
        if task_vocab_size is not None and not 0 <= task_vocab_size <= stored:
            raise ValueError(f"{directory} caches {stored} task-vocabulary tokens; task_vocab_size must be 0 to {stored}, "
                             f"got {task_vocab_size}.")
        used = stored if task_vocab_size is None else task_vocab_size
        # The ids are stored most frequent first, so a prefix is the smaller task vocabulary.
        self.task_ids = torch.tensor(self.index.get("task_vocab", [])[:used], dtype=torch.long) if used else None
        self.task_logprobs = torch.cat([s["task_logprobs"][:, :used] for s in shards]) if used else None
        self.offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
        # An example's `index` is its pair's position before pairs too long were skipped, not its position here.
        self._position = {example.index: position for position, example in enumerate(examples)}

    def rows(self, indices: Sequence[int]) -> torch.LongTensor:
        """The cache rows (completion positions, in order) of the examples with these `EncodedExample.index`es."""
        try:
            positions = [self._position[i] for i in indices]
        except KeyError as error:
            raise ValueError(f"Example {error.args[0]} is not among the examples the cache was checked against.") from None
        return torch.cat([torch.arange(self.offsets[p], self.offsets[p + 1]) for p in positions])

    def nll(self, reweighter_logits: torch.Tensor, batch: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
        """Per-position NLL of the completion tokens under the top-k combination (arguments as `LossSource.nll`)."""
        rows = self.rows(batch["index"].tolist())
        positions = completion_positions(batch["labels"])
        if int(positions.sum()) != len(rows):
            raise ValueError("The batch does not match the cache's completion positions: the batch is not from the "
                             "examples the cache was checked against.")
        device = reweighter_logits.device
        reweighter = align_vocab(reweighter_logits, self.vocab_size)
        task = {} if self.task_ids is None else {
            "extra_ids": self.task_ids.to(device), "extra_logprobs": self.task_logprobs[rows].to(device)}
        return combine_topk_nll(
            reweighter, self.topk_ids[rows].to(device), self.topk_logprobs[rows].to(device),
            batch["labels"][:, 1:][positions].to(device), self.label_logprobs[rows].to(device), alpha, **task,
        )
