"""`hf-plugin generate`'s ways of decoding: a reweighter, the base model alone, or a related method (proxy-tuning/
DExperts, ULD, Dynamic Logit Fusion) steering the base with small causal LMs.

`DecodingOptions` holds the flags that choose the method; it checks them, and `related_processor` loads the small
models and builds the method's logits processor, before the base model is loaded.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from transformers.utils import logging

from ..compatibility import tokenizer_fingerprint
from ..configuration_plugin import PluginConfig
from ..loading import load_frozen_model, load_tokenizer
from ..modeling_plugin import PluginModel
from .arguments import option


logger = logging.get_logger(__name__)


# generate's ways of decoding: (option, what it gives) — exactly one is chosen.
DECODING_METHODS = (("reweighter", "--reweighter DIR"), ("no_reweighter", "--no-reweighter (the base model alone)"),
                    ("proxy_expert", "--proxy-expert DIR (proxy-tuning/DExperts)"),
                    ("uld_assistant", "--uld-assistant DIR (ULD)"),
                    ("fusion_expert", "--fusion-expert DIR (Dynamic Logit Fusion)"))
# Options that belong to one method: (option, the method's option).
METHOD_OPTIONS = (("anti_expert", "proxy_expert"), ("plausibility_top_p", "proxy_expert"),
                  ("uld_beta", "uld_assistant"), ("relative_top", "uld_assistant"),
                  ("small_base", "fusion_expert"), ("alpha_grid", "fusion_expert"))


def add_related_arguments(parser: argparse.ArgumentParser) -> None:
    related = parser.add_argument_group(
        "related methods", "instead of a reweighter, steer the base with small causal LMs on its tokenizer "
        "(folders, Hub ids, .gguf files, or models saved by hf-plugin); see the README's 'Related methods'")
    related.add_argument("--proxy-expert", metavar="MODEL",
                         help="proxy-tuning: base + alpha * (expert - anti-expert), log-probs (--alpha defaults to 1)")
    related.add_argument("--anti-expert", metavar="MODEL",
                         help="with --proxy-expert: the untuned model it was tuned from")
    related.add_argument("--plausibility-top-p", type=float, metavar="P",
                         help="with --proxy-expert: DExperts, only the base's top-P nucleus is kept (their P: 0.9)")
    related.add_argument("--uld-assistant", metavar="MODEL",
                         help="ULD: base - beta * assistant over the base's plausible tokens (e.g. from "
                              "hf-plugin unlearn)")
    related.add_argument("--uld-beta", type=float, help="with --uld-assistant: the assistant's weight (default 0.75)")
    related.add_argument("--relative-top", type=float,
                         help="with --uld-assistant: the plausibility threshold r (default 1e-2)")
    related.add_argument("--fusion-expert", action="append", metavar="MODEL",
                         help="Dynamic Logit Fusion: an expert fine-tuned from --small-base (repeatable)")
    related.add_argument("--small-base", metavar="MODEL",
                         help="with --fusion-expert: the small model they were tuned from")
    related.add_argument("--alpha-grid", metavar="A,B,...",
                         help="with --fusion-expert: the strengths searched at each step (default 0,0.1,...,2)")


@dataclass(frozen=True)
class DecodingOptions:
    """The flags that choose generate's way of decoding, and each method's own options."""

    reweighter: str | None = None
    no_reweighter: bool = False
    proxy_expert: str | None = None
    anti_expert: str | None = None
    plausibility_top_p: float | None = None
    uld_assistant: str | None = None
    uld_beta: float | None = None
    relative_top: float | None = None
    fusion_expert: list[str] | None = None
    small_base: str | None = None
    alpha_grid: str | None = None
    alpha: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DecodingOptions:
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})

    def check(self) -> None:
        """One decoding method, its required small models, and no option of another method."""
        chosen = [name for name, _ in DECODING_METHODS if getattr(self, name)]
        if len(chosen) != 1:
            raise SystemExit("error: pass exactly one of " + ", ".join(text for _, text in DECODING_METHODS)
                             + (f"; got {', '.join(map(option, chosen))}" if chosen else ""))
        for name, method in METHOD_OPTIONS:
            if getattr(self, name) is not None and not getattr(self, method):
                raise SystemExit(f"error: {option(name)} belongs to {option(method)}")
        for needed, method in (("anti_expert", "proxy_expert"), ("small_base", "fusion_expert")):
            if getattr(self, method) and getattr(self, needed) is None:
                raise SystemExit(f"error: {option(method)} needs {option(needed)}")
        if self.alpha is not None and not (self.reweighter or self.proxy_expert):
            raise SystemExit("error: --alpha is the strength of --reweighter or --proxy-expert (Dynamic Logit Fusion "
                             "searches --alpha-grid; ULD takes --uld-beta)")

    def roles(self) -> list[str]:
        """The options naming the small models of the chosen related method, in its processor's order."""
        if self.proxy_expert:
            return ["--proxy-expert", "--anti-expert"]
        if self.uld_assistant:
            return ["--uld-assistant"]
        if self.fusion_expert:
            return ["--small-base"] + ["--fusion-expert"] * len(self.fusion_expert)
        return []


def load_causal_lm(path: str, option: str, tokenizer, force: bool = False):
    """A related method's small model: a model saved like a reweighter (e.g. by `hf-plugin unlearn`) or any causal
    LM (folder, Hub id or .gguf file), frozen. A plain causal LM records no tokenizer fingerprint, so the tokenizer
    saved beside it must be the base's `tokenizer` (ids of the same width can still mean other tokens)."""
    from transformers import AutoConfig

    try:
        config = None if path.endswith(".gguf") else AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        if not Path(path).exists():
            raise SystemExit(f"error: {option} {path}: no such directory, nor a model on the Hub") from error
        raise SystemExit(f"error: {option} {path}: {str(error).strip().splitlines()[0]}") from error
    # Safetensors only, as for reweighters: a pickle checkpoint (pytorch_model.bin) is read with torch.load, which can
    # run code from the file, and small models are often someone else's download. Checked before anything is loaded.
    if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
        raise SystemExit(f"error: {option} {path} holds no *.safetensors weights (pickle checkpoints such as "
                         "pytorch_model.bin are never loaded: unpickling can run code); convert it where you trust it "
                         "(from_pretrained, then save_pretrained writes model.safetensors) and pass the folder again")
    if isinstance(config, PluginConfig):  # its recorded fingerprint is checked by the processor
        return PluginModel.from_pretrained(path).requires_grad_(False).eval()
    try:
        own = load_tokenizer(path)
    except (OSError, ValueError, TypeError) as error:
        if not force:
            raise SystemExit(f"error: {option} {path} has no tokenizer beside it, so its vocabulary cannot be checked "
                             "against the base's: save its tokenizer there, or pass --force") from error
        own = None
    if own is not None and tokenizer_fingerprint(own) != tokenizer_fingerprint(tokenizer):
        message = (f"{option} {path} uses another tokenizer than the base: {tokenizer_fingerprint(own)} ({len(own)} "
                   f"tokens) against the base's {tokenizer_fingerprint(tokenizer)} ({len(tokenizer)} tokens)")
        if not force:
            raise SystemExit(f"error: {message}; pass --force to use it anyway")
        logger.warning(f"{message}; continuing because of --force.")
    try:
        return load_frozen_model(path, safetensors_only=True)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {option} {path}: {str(error).strip().splitlines()[0]}") from error


def parse_alpha_grid(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError as error:
        raise SystemExit(f"error: --alpha-grid must be numbers separated by commas, got {text!r}") from error


def related_processor(options: DecodingOptions, tokenizer, force: bool = False):
    """The logits processor of the related method `options` name (None for --reweighter/--no-reweighter)."""
    from ..methods import DynamicLogitFusionLogitsProcessor, LogitDifferenceLogitsProcessor, ProxyTuningLogitsProcessor

    common = dict(tokenizer=tokenizer, strict=not force)

    def load(path, option):
        return load_causal_lm(path, option, tokenizer, force)

    if options.proxy_expert:
        return ProxyTuningLogitsProcessor(
            load(options.proxy_expert, "--proxy-expert"), load(options.anti_expert, "--anti-expert"),
            alpha=1.0 if options.alpha is None else options.alpha, plausibility_top_p=options.plausibility_top_p,
            **common)
    if options.uld_assistant:
        return LogitDifferenceLogitsProcessor(
            load(options.uld_assistant, "--uld-assistant"),
            beta=0.75 if options.uld_beta is None else options.uld_beta,
            relative_top=1e-2 if options.relative_top is None else options.relative_top, **common)
    if options.fusion_expert:
        grid = {} if options.alpha_grid is None else {"alpha_grid": parse_alpha_grid(options.alpha_grid)}
        experts = [load(path, "--fusion-expert") for path in options.fusion_expert]
        return DynamicLogitFusionLogitsProcessor(experts, load(options.small_base, "--small-base"), **grid, **common)
    return None
