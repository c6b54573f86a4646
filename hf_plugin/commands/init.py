"""`hf-plugin init`: write a new, untrained reweighter bound to a base model and its tokenizer."""

from __future__ import annotations

import argparse

import torch

from ..compatibility import binding_kwargs
from ..configuration_plugin import PluginConfig
from ..modeling_plugin import PluginModel
from .arguments import (add_architecture_arguments, add_base_arguments, architecture_options, check_copy_arguments,
                        check_word_starts, copy_arguments, copy_options)
from .common import load_base


def register(subparsers) -> None:
    parser = subparsers.add_parser("init", help="write a new, untrained reweighter bound to a base model")
    add_base_arguments(parser)
    parser.add_argument("output_dir")
    add_architecture_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Writes a new, untrained reweighter bound to the base model and its tokenizer."""
    copying = copy_arguments(args)
    check_copy_arguments(**copying)
    base, tokenizer = load_base(args.base, args.base_revision)
    check_word_starts(tokenizer, args.copy_word_starts)
    binding = binding_kwargs(base, tokenizer, revision=args.base_revision, base_model_id=args.base_id)
    torch.manual_seed(args.seed)
    config = PluginConfig(vocab_size=binding["base_vocab_size"], alpha=args.alpha, **architecture_options(args),
                          **binding, **copy_options(tokenizer, **copying))
    plugin = PluginModel(config)
    if args.copy_word_starts:
        plugin.set_copy_aliases(tokenizer)
    plugin.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"Saved an untrained reweighter ({plugin.num_parameters():,} parameters) to {args.output_dir}")
