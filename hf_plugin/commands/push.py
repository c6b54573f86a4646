"""`hf-plugin push`: upload a saved reweighter to the Hub, with its model card."""

from __future__ import annotations

import argparse

from ..hub import push_folder


def register(subparsers) -> None:
    parser = subparsers.add_parser("push", help="upload a saved reweighter to the Hub, with its model card")
    parser.add_argument("directory")
    parser.add_argument("repo_id")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--with-code", action="store_true",
                        help="also upload the modeling code and custom_generate/, for loading and generating with "
                             "trust_remote_code=True without hf-plugin")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Uploads a saved reweighter folder, exactly as save_pretrained wrote it, with its model card."""
    commit = push_folder(args.directory, args.repo_id, revision=args.revision, private=args.private or None,
                         create_pr=args.create_pr, with_code=args.with_code)
    print(f"Pushed {args.directory} to {args.repo_id}: {commit}")
