"""`hf-plugin cache`: write the base-logit caches (top-k log-probs) of the training and validation data, with the
base model in this process or through a server (--base-url)."""

from __future__ import annotations

import argparse
from pathlib import Path

from accelerate import Accelerator

from ..base_cache import SHARD_PATTERN
from ..completions import DEFAULT_TASK_VOCAB_SIZE
from .arguments import (add_base_arguments, add_cache_arguments, add_data_arguments, add_remote_arguments,
                        cache_options, data_options, remote_options)
from .common import cached_sources, load_base_tokenizer, read_splits, remote_base


def register(subparsers) -> None:
    parser = subparsers.add_parser("cache", help="write a base-logit cache (top-k log-probs) for training")
    add_base_arguments(parser)
    add_data_arguments(parser)
    add_cache_arguments(parser, required=True)
    parser.set_defaults(run=run)
    add_remote_arguments(parser)
    parser.add_argument("--unknown-labels", choices=["error", "bound"], default="error",
                        help="a true token whose log-prob the server's answer does not identify (llama.cpp shows "
                             "EOS as ''): stop with an error, or store an upper bound on it")


def run(args: argparse.Namespace) -> None:
    """Writes the base-logit caches of the training and validation splits."""
    tokenizer = load_base_tokenizer(args.base, args.base_revision, top_k=args.top_k)
    train_examples, validation_examples = read_splits(tokenizer, demonstrations=args.demonstrations,
                                                      **data_options(args))
    splits = {"train": train_examples, "validation": validation_examples}
    if args.base_url is not None:
        if args.task_vocab_size not in (0, DEFAULT_TASK_VOCAB_SIZE):
            raise SystemExit("error: a server gives top-k log-probs only: --task-vocab-size must be 0 with --base-url")
        remote = remote_base(tokenizer, **remote_options(args))
        return write_through_server(remote, splits, cache_dir=args.cache, k=args.top_k, base_id=args.base_id,
                                    overwrite=args.overwrite_cache)
    cached_sources(tokenizer, splits, accelerator=Accelerator(cpu=args.cpu), **cache_options(args))
    print(f"Base-logit caches of the training and validation data are in {args.cache}")


def write_through_server(remote, splits: dict, *, cache_dir: str, k: int, base_id: str | None,
                         overwrite: bool) -> None:
    """Writes the caches through the server of `remote` (a `RemoteBase`): one teacher-forcing request per example,
    resumable by shard."""
    from ..remote import RemoteBaseError
    from ..remote.cache import write_remote_caches

    print(f"Writing through {remote.base_url} ({remote.model}): at most {sum(map(len, splits.values()))} requests "
          "(one per example not cached yet) plus a few to probe the server", flush=True)
    try:
        report = write_remote_caches(remote, splits, cache_dir, k=k, base_model_id=base_id, overwrite=overwrite)
    except RemoteBaseError as error:
        written = len(list(Path(cache_dir).glob(f"*/{SHARD_PATTERN}")))
        kept = f"{written} finished shard(s) kept: rerun to resume" if written else "no shard was finished"
        raise SystemExit(f"error: {error} ({kept}; {remote.stats.requests} requests sent)") from error
    print(f"Base-logit caches are in {cache_dir}: {report['requests']} requests, {report['tokens_sent']:,} tokens "
          f"sent, {report['wall_seconds']:.1f} s; {report['bounded_labels']} true-token log-probs replaced by an "
          f"upper bound, {report['dropped_ambiguous']} ambiguous entries dropped. Train with --cache {cache_dir} "
          "--task-vocab-size 0.")
