"""`hf-plugin train`: train a reweighter against a frozen base model, live or from a base-logit cache."""

from __future__ import annotations

import argparse
import sys

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from ..base_logits import LiveBaseModel
from ..compatibility import binding_kwargs
from ..completions import task_vocabulary
from ..configuration_plugin import PluginConfig
from ..initialization import first_layers, uniform_start_
from ..modeling_plugin import PluginModel
from ..run_folder import check_resume, latest_checkpoint
from ..training import PluginTrainingArguments, train
from .arguments import (add_architecture_arguments, add_base_arguments, add_cache_arguments, add_data_arguments,
                        add_dataclass_arguments, architecture_options, cache_options, check_copy_arguments,
                        check_positive, check_word_starts, copy_arguments, copy_options, data_options,
                        dataclass_options, option)
from .common import cached_sources, check_output_folders, load_base, load_base_tokenizer, read_splits

# The fields of PluginTrainingArguments that are flags of their own name; the others have CLI-only behaviour
# (--output-dir, --checkpoint-dir, --overwrite, and --seed and --alpha, shared with the data and the reweighter's
# config).
TRAINING_FIELDS = ("epochs", "batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
                   "warmup_ratio", "max_grad_norm", "patience", "save_steps", "eval_batch_size", "mixed_precision",
                   "log_with", "keep_checkpoints", "keep_checkpoints_after_run")
_FORMER_KEEP_SWITCH = object()  # the value of a bare --keep-checkpoints (argparse would convert a str)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a reweighter against a frozen base model")
    add_base_arguments(parser)
    add_data_arguments(parser)
    add_cache_arguments(parser)
    parser.set_defaults(run=run)
    add_training_arguments(parser)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True,
                        help="where the reweighter goes: only what save_pretrained writes there is ever pushed")
    parser.add_argument("--checkpoint-dir",
                        help="where checkpoints go while training (default: <output-dir>.checkpoints, beside it)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --checkpoint-dir (same arguments and data only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again even if --output-dir holds a reweighter or --checkpoint-dir checkpoints")
    # The plain options of PluginTrainingArguments, under their field names (`--keep-checkpoints N`), defaults and
    # docstring entries; a bare --keep-checkpoints is the former switch of --keep-checkpoints-after-run.
    add_dataclass_arguments(parser, PluginTrainingArguments, TRAINING_FIELDS,
                            keep_checkpoints={"nargs": "?", "const": _FORMER_KEEP_SWITCH, "metavar": "N"})
    add_architecture_arguments(parser)
    parser.add_argument("--init-from",
                        help="start from this pretrained causal LM (same tokenizer) instead of random weights")
    parser.add_argument("--init-from-base-layers", type=int, metavar="K",
                        help="start from a copy of the base model's embeddings, first K layers, final norm and head")
    parser.add_argument("--uniform-start", action="store_true",
                        help="zero the reweighter's final norm: its distribution starts uniform, the product equal to "
                             "the base")
    parser.add_argument("--compact-head", action="store_true",
                        help="an output layer with one row per task-vocabulary token (--task-vocab-size) and one logit "
                             "shared by all other tokens (see hf_plugin.compact_head)")
    parser.add_argument("--copy-ignore-uncopied", type=float, metavar="RATE",
                        help="with --copy-mode: ids in at least 10%% of the training prompts whose completions repeat "
                             "them at most this often (the template, a data format's keys) stay with the reweighter "
                             "(e.g. 0.05; 1 with --copy-ignore-min-fraction 0.5: every id of half the prompts, see "
                             "hf_plugin.copying)")
    parser.add_argument("--copy-ignore-min-fraction", type=float, metavar="FRACTION",
                        help="with --copy-ignore-uncopied: judge the ids in at least this fraction of the training "
                             "prompts (default 0.1)")
    parser.add_argument("--dataset-id", help="Hub id of the training data, for the model card")


def training_options(args: argparse.Namespace) -> dict:
    """The flags of TRAINING_FIELDS as `PluginTrainingArguments` keyword arguments; a bare --keep-checkpoints (the
    switch it was before it took a count) still keeps the checkpoint folder after the run, with a warning."""
    options = dataclass_options(args, TRAINING_FIELDS)
    if options["keep_checkpoints"] is _FORMER_KEEP_SWITCH:
        print("warning: --keep-checkpoints without a count is deprecated, use --keep-checkpoints-after-run "
              "(--keep-checkpoints N keeps the N newest checkpoints while training)", file=sys.stderr)
        del options["keep_checkpoints"]  # the field's default
        options["keep_checkpoints_after_run"] = True
    return options


def check_initialization(*, compact_head: bool, init_from: str | None, init_from_base_layers: int | None,
                         task_vocab_size: int, given: set[str]) -> None:
    """--compact-head, --init-from and --init-from-base-layers go together only where they can; `given` names the
    architecture flags given on the command line (which --init-from-base-layers would ignore)."""
    if compact_head and (init_from or init_from_base_layers):
        raise SystemExit("error: --compact-head builds the default reweighter's output layer; drop --init-from and "
                         "--init-from-base-layers")
    if compact_head and task_vocab_size < 1:
        raise SystemExit("error: --compact-head covers the task vocabulary: --task-vocab-size must be at least 1")
    if init_from_base_layers is not None:
        check_positive(init_from_base_layers=init_from_base_layers)
        flags = [option(name) for name in sorted(given)]
        if init_from or flags:
            raise SystemExit(f"error: --init-from-base-layers copies the base model's architecture and weights; drop "
                             f"{', '.join(flags) or '--init-from'}")


def run(args: argparse.Namespace) -> None:
    """Trains a reweighter and saves the best epoch's weights in --output-dir."""
    copying = copy_arguments(args)
    check_copy_arguments(**copying, ignore_uncopied=args.copy_ignore_uncopied,
                         ignore_min_fraction=args.copy_ignore_min_fraction)
    check_initialization(compact_head=args.compact_head, init_from=args.init_from,
                         init_from_base_layers=args.init_from_base_layers, task_vocab_size=args.task_vocab_size,
                         given=getattr(args, "given", set()))
    # Arguments and output folders first, before the data, a cache pass or the base model (`main` turns their
    # ValueError into a one-line error).
    training_args = PluginTrainingArguments(
        output_dir=args.output_dir, checkpoint_dir=args.checkpoint_dir, overwrite_output_dir=args.overwrite,
        seed=args.seed, **training_options(args),
    )
    check_output_folders(training_args, resume=args.resume)
    if args.resume and latest_checkpoint(training_args.checkpoint_dir) is None:
        raise SystemExit(f"error: --resume given but {training_args.checkpoint_dir} holds no checkpoint")
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=args.log_with, cpu=args.cpu,
                              project_dir=args.output_dir)
    tokenizer = load_base_tokenizer(args.base, args.base_revision, top_k=args.top_k)
    check_word_starts(tokenizer, args.copy_word_starts)
    train_examples, validation_examples = read_splits(tokenizer, demonstrations=args.demonstrations,
                                                      **data_options(args))
    if args.resume:  # the arguments and data the checkpoint belongs to, before the base model is loaded
        check_resume(training_args, train_examples, validation_examples, num_processes=accelerator.num_processes)
    base = base_layers = None
    if args.init_from_base_layers:  # before a cache pass, so that a layer count the base lacks fails first
        base, _ = load_base(args.base, args.base_revision)
        base_layers = first_layers(base, args.init_from_base_layers)
    splits = {"train": train_examples, "validation": validation_examples}
    if args.cache is None:  # the live base model (loaded above for its layers, or now)
        base = base if base is not None else load_base(args.base, args.base_revision)[0]
        base.to(accelerator.device)
        binding = binding_kwargs(base, tokenizer, revision=args.base_revision, base_model_id=args.base_id)
        train_source = validation_source = LiveBaseModel(base)
    else:  # top-k caches under --cache, written first if missing (only then is the base model loaded)
        sources, binding = cached_sources(tokenizer, splits, accelerator=accelerator, **cache_options(args))
        train_source, validation_source = sources["train"], sources["validation"]
    torch.manual_seed(args.seed)
    options = {"alpha": args.alpha, **binding, **copy_options(tokenizer, **copying)}
    if args.compact_head:
        options["head_ids"] = task_vocabulary(train_examples, args.task_vocab_size)
    if args.init_from:
        plugin = PluginModel.from_causal_lm(AutoModelForCausalLM.from_pretrained(args.init_from), **options)
    elif base_layers is not None:
        plugin = PluginModel.from_causal_lm(base_layers, **options)
    else:
        plugin = PluginModel(PluginConfig(
            vocab_size=binding["base_vocab_size"], **architecture_options(args),
            # RoPE has no position parameters: room for few-shot prompts longer than the training pairs (positions
            # past `trained_max_length` warn, see PluginConfig).
            max_position_embeddings=max(args.max_length, 2048), **options,
        ))
    if args.copy_word_starts:
        plugin.set_copy_aliases(tokenizer)
    if args.copy_ignore_uncopied is not None:
        fraction = {} if args.copy_ignore_min_fraction is None else {"min_fraction": args.copy_ignore_min_fraction}
        added = plugin.ignore_uncopied_ids([(e.prompt_ids, e.completion_ids) for e in train_examples],
                                           max_copy_rate=args.copy_ignore_uncopied, **fraction)
        print(f"Copy mode: {len(added)} ids the training prompts hold but their completions do not repeat are left to "
              f"the reweighter: {tokenizer.convert_ids_to_tokens(added)[:20]}")
    if args.uniform_start:
        uniform_start_(plugin)
    card = {"datasets": [args.dataset_id]} if args.dataset_id else None
    try:  # train() checks the reweighter's architecture against the checkpoint's before any step
        train(plugin, train_examples, validation_examples, train_source, training_args,
              validation_source=validation_source, tokenizer=tokenizer, resume=args.resume, model_card=card,
              accelerator=accelerator)
    except FloatingPointError as error:
        raise SystemExit(f"error: {error}") from error
    if accelerator.is_main_process:
        print(f"Saved the reweighter to {args.output_dir}")
