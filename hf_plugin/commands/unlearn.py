"""`hf-plugin unlearn`: train ULD's assistant (the base's first layers + LoRA) for unlearning at decoding time."""

from __future__ import annotations

import argparse

import torch

from ..training import PluginTrainingArguments
from .arguments import (add_base_arguments, add_column_arguments, add_dataclass_arguments, check_positive,
                        column_options, dataclass_options, is_chat)
from .common import check_output_folders, encode, load_base, load_base_tokenizer, read_pairs

# The fields of PluginTrainingArguments that are flags (as in `train`, but 10 epochs by default).
UNLEARNING_FIELDS = ("epochs", "batch_size", "learning_rate", "warmup_ratio", "max_grad_norm")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "unlearn", help="train ULD's assistant (the base's first layers + LoRA) for unlearning at decoding time",
        description="Trains the assistant of ULD (Ji et al. 2024): a copy of the base model's embeddings, first "
                    "--num-layers layers, final norm and head, frozen, with LoRA adapters, taught to remember "
                    "--forget-data and to be uniform on --retain-data (loss NLL(forget) + beta * KL(uniform || "
                    "assistant)(retain)). It is saved, adapters merged, like a reweighter; decode with "
                    "hf_plugin.LogitDifferenceLogitsProcessor. Needs peft (pip install 'hf-plugin[uld]').")
    add_base_arguments(parser)
    parser.add_argument("--forget-data", required=True,
                        help="what to unlearn: CSV/TSV/JSON(L)/Parquet file or datasets name")
    parser.add_argument("--retain-data", required=True, help="what to keep, same columns")
    add_column_arguments(parser)
    parser.add_argument("--num-layers", type=int, required=True,
                        help="base layers copied into the assistant (paper: 8 of 32)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--beta", type=float, default=5.0, help="weight of the retain term (ULD: 5)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--checkpoint-dir", help="default: <output-dir>.checkpoints, beside it")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    add_dataclass_arguments(parser, PluginTrainingArguments, UNLEARNING_FIELDS, epochs={"default": 10})
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Trains ULD's assistant for --base on --forget-data and --retain-data; saves it in --output-dir."""
    from ..unlearning import check_disjoint, train_assistant

    check_positive(num_layers=args.num_layers, lora_rank=args.lora_rank)
    training_args = PluginTrainingArguments(
        output_dir=args.output_dir, checkpoint_dir=args.checkpoint_dir, overwrite_output_dir=args.overwrite,
        patience=0, seed=args.seed, **dataclass_options(args, UNLEARNING_FIELDS),
    )
    check_output_folders(training_args, resume=args.resume)
    tokenizer = load_base_tokenizer(args.base, args.base_revision)
    encoded = {}
    for split, source in (("forget", args.forget_data), ("retain", args.retain_data)):
        pairs, report = read_pairs(source, column_options(args), what=f"{split} data")
        encoded[split] = encode(tokenizer, pairs, report, split, max_length=args.max_length, chat=is_chat(args))
    check_disjoint(encoded["forget"], encoded["retain"])  # before the base model
    target, _ = load_base(args.base, args.base_revision)
    torch.manual_seed(args.seed)
    try:
        train_assistant(target, encoded["forget"], encoded["retain"], training_args, num_layers=args.num_layers,
                        beta=args.beta, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, tokenizer=tokenizer,
                        base_model_id=args.base_id, resume=args.resume)
    except FloatingPointError as error:
        raise SystemExit(f"error: {error}") from error
    print(f"Saved ULD's assistant to {args.output_dir}; decode with "
          f"LogitDifferenceLogitsProcessor(PluginModel.from_pretrained({args.output_dir!r}), beta=...)")
