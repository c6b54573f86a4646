"""`hf-plugin demo`: adapt the offline SmolLM2 to a generated house-style task, offline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .arguments import add_base_arguments
from .common import load_base


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="adapt the offline SmolLM2 to a generated house-style task, offline")
    add_base_arguments(parser)
    parser.add_argument("--output-dir", default="hf-plugin-demo")
    parser.add_argument("--train-size", type=int, default=400)
    parser.add_argument("--test-size", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Trains a reweighter on a generated task against the offline SmolLM2 and prints base vs base + reweighter."""
    from ..demo import format_demo_report, run_demo

    base, tokenizer = load_base(args.base, args.base_revision)
    result = run_demo(base, tokenizer, args.output_dir, train_size=args.train_size, test_size=args.test_size,
                      epochs=args.epochs, seed=args.seed)
    (Path(args.output_dir) / "demo_results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_demo_report(result))
