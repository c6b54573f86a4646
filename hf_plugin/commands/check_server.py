"""`hf-plugin check-server`: compare a server's top-k log-probs with the in-process --base."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .arguments import add_base_arguments, add_remote_arguments, remote_options, unescape
from .common import load_base, load_base_tokenizer, remote_base


CHECK_TEXTS = ("The capital of France is Paris, and the capital of Italy is Rome.",
               "Data: name[Aromi], food[Chinese], area[city centre]\nSentence: Aromi serves Chinese food.")


def register(subparsers) -> None:
    parser = subparsers.add_parser("check-server", help="compare a server's top-k log-probs with the in-process --base")
    add_base_arguments(parser)
    add_remote_arguments(parser)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--text", action="append", help="a probe text (repeatable; default: two built-in texts)")
    parser.add_argument("--output", help="also write the comparison as JSON")
    parser.set_defaults(run=run, unknown_labels="bound")  # true tokens' log-probs are not compared


def run(args: argparse.Namespace) -> None:
    """Compares the server's top-k log-probs with the in-process --base on a few texts."""
    from ..remote import RemoteBaseError
    from ..remote.check import compare_with_local, fetch_served

    tokenizer = load_base_tokenizer(args.base, args.base_revision, top_k=args.top_k)
    remote = remote_base(tokenizer, **remote_options(args))
    texts = [unescape(text) for text in args.text] if args.text else CHECK_TEXTS
    try:  # the server first: a failing one is reported before the base model is loaded
        served = fetch_served(remote, texts)
    except RemoteBaseError as error:
        raise SystemExit(f"error: {error}") from error
    base, _ = load_base(args.base, args.base_revision)
    result = compare_with_local(remote, base, texts, served=served)
    lined_up = result["aligned_offset"] == 0
    print(f"{result['positions']} positions: largest |log-prob difference| {result['max_abs_diff']:.4f} nat, median "
          f"{result['median_abs_diff']:.4f}; top-1 token the same at {100 * result['top1_agreement']:.0f}%")
    print(f"The server's echo is {'shifted by one (corrected by the client)' if result['echo_shift'] else 'aligned'}; "
          f"positions {'line up' if lined_up else 'do NOT line up (offset %+d)' % result['aligned_offset']}.")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if not lined_up:
        raise SystemExit(1)
