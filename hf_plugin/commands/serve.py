"""`hf-plugin serve`: serve the base model and reweighters behind an OpenAI-compatible API."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from ..modeling_plugin import PluginModel
from .arguments import add_base_arguments, check_positive
from .common import load_base, read_reweighter_config


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve base + reweighters behind an OpenAI-compatible API",
        description="Serves the base model (loaded in this process; remote bases are not supported yet) as model id "
                    "BASE and with each reweighter as BASE+NAME: GET /v1/models, POST /v1/completions and "
                    "/v1/chat/completions (stream=true for server-sent events), and vLLM's /tokenize, /detokenize and "
                    "/tokenizer_info. Completions score prompts (echo with logprobs), as lm-evaluation-harness and "
                    "hf-plugin's remote base need. Clients set the reweighting strength with an extra field, alpha. "
                    "Every reweighter is checked against the base before the server starts; no remote code is ever "
                    "loaded.")
    add_base_arguments(parser)
    parser.add_argument("--reweighter", action="append", metavar="[NAME=]DIR_OR_HUB_ID",
                        help="a reweighter to serve as BASE+NAME (repeatable; NAME defaults to the folder or repo name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key",
                        help="require 'Authorization: Bearer KEY' (default: $HF_PLUGIN_API_KEY, else none)")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens, and the default for chat")
    parser.add_argument("--max-n", type=int, default=8)
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-concurrent", type=int, default=1, help="generations running at the same time")
    parser.add_argument("--max-queued", type=int, default=64,
                        help="requests admitted (running or waiting) before a 503")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="greedy requests for the same model that may share one batched generate() (1: none)")
    parser.add_argument("--max-prompts", type=int, default=32, help="prompts in one completions request")
    parser.add_argument("--max-logprobs", type=int, default=20, help="largest logprobs / top_logprobs")
    parser.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help="name tokens in log-probs token_id:N rather than by their text (as vLLM's flag); "
                             "exact token identity for hf-plugin's remote base")
    parser.add_argument("--force", action="store_true", help="serve a reweighter even if its tokenizer differs")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Serves the base model alone and with each reweighter behind an OpenAI-compatible HTTP API."""
    try:  # the server's packages are an extra: import them only for this command
        from ..serving import ServerLimits, create_app, run_server
    except ImportError as error:
        raise SystemExit(f"error: hf-plugin serve needs the serve extra: pip install 'hf-plugin[serve]' ({error})") from error
    if not 0 < args.port < 65536:
        raise SystemExit(f"error: --port must be between 1 and 65535, got {args.port}")
    api_key = resolve_api_key(args.api_key)
    bounds = {name: getattr(args, name) for name in ("max_prompt_tokens", "max_tokens", "max_n", "max_body_bytes",
                                                     "max_concurrent", "max_queued", "max_batch", "max_prompts",
                                                     "max_logprobs")}
    check_positive(**bounds)
    limits = ServerLimits(**bounds)
    sources = reweighter_sources(args.reweighter or [])
    base, tokenizer = load_base(args.base, args.base_revision)
    reweighters = {name: PluginModel.from_pretrained(source).eval() for name, source in sources.items()}
    app = create_app(base, tokenizer, reweighters, base_name=args.base_id, limits=limits,
                     api_key=api_key, strict=not args.force,
                     return_tokens_as_token_ids=args.return_tokens_as_token_ids)
    print(f"Serving {', '.join(app.state.models)} on http://{args.host}:{args.port}/v1", flush=True)
    run_server(app, host=args.host, port=args.port)


def resolve_api_key(given: str | None) -> str | None:
    """--api-key, else $HF_PLUGIN_API_KEY, else None (no authentication)."""
    # An empty key must not mean "no authentication": that is what unsetting it says.
    api_key, key_source = ((given, "--api-key") if given is not None
                           else (os.environ.get("HF_PLUGIN_API_KEY"), "HF_PLUGIN_API_KEY"))
    if api_key is not None and not api_key.strip():
        raise SystemExit(f"error: {key_source} is set but empty; give a key, or unset it to serve without one")
    return api_key


def reweighter_sources(given: Sequence[str]) -> dict[str, str]:
    """The reweighters to serve by name, from --reweighter [NAME=]DIR_OR_HUB_ID; each one's config is read (a
    missing reweighter fails before the base model is loaded)."""
    sources = {}
    for entry in given:
        name, _, source = entry.rpartition("=")
        name = name or Path(source.rstrip("/")).name
        if name in sources:
            raise SystemExit(f"error: two reweighters named {name!r}; name them with --reweighter NAME=DIR")
        read_reweighter_config(source)
        sources[name] = source
    return sources
