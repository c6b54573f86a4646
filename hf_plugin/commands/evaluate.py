"""`hf-plugin evaluate`: text metrics of predictions against references, or the NLL of data under base +
reweighter against the base alone."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..base_logits import LiveBaseModel
from ..metrics import METRIC_NAMES, corpus_metrics, format_table, read_predictions, read_references
from ..modeling_plugin import PluginModel
from ..training import completion_nll
from .arguments import add_base_arguments, add_column_arguments, add_former_name, column_options, is_chat
from .common import encode, load_base, load_base_tokenizer, read_pairs, read_reweighter_config


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="BLEU/ROUGE-L/NIST/METEOR (exact+stem)/CIDEr-D of predictions (or the E2E challenge's own "
                         "metrics), or NLL under base + reweighter vs base alone")
    parser.add_argument("--predictions", help="generated texts: one per line, or a JSON list")
    parser.add_argument("--references", help="references: one per line with a blank line between inputs, a JSON list "
                                             "of lists, or JSON lines of lists")
    parser.add_argument("--e2e-challenge", action="store_true",
                        help="score as the E2E NLG challenge does (METEOR 1.5 etc.; needs hf-plugin[e2e] and Java)")
    add_base_arguments(parser)
    reweighter = parser.add_argument("--reweighter", help="directory or Hub id of a reweighter (NLL mode)")
    add_former_name(parser, "--plugin", reweighter)
    parser.add_argument("--data", help="CSV/TSV/JSON(L)/Parquet file or a datasets name (NLL mode)")
    add_column_arguments(parser)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--force", action="store_true", help="use the reweighter even if its tokenizer differs")
    parser.add_argument("--output", help="also write the results as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Text metrics of predictions against references, or the NLL of a data file under base + reweighter."""
    text_mode = args.predictions is not None or args.references is not None
    nll_mode = args.reweighter is not None or args.data is not None
    if text_mode == nll_mode or (text_mode and None in (args.predictions, args.references)) or (
            nll_mode and None in (args.reweighter, args.data)):
        raise SystemExit("error: give either --predictions and --references (text metrics) "
                         "or --reweighter and --data (NLL under base + reweighter)")
    if text_mode:
        results = evaluate_text(args.predictions, args.references, e2e_challenge=args.e2e_challenge)
    else:
        results = evaluate_nll(args.reweighter, args.data, columns=column_options(args), max_length=args.max_length,
                               chat=is_chat(args), base=args.base, base_revision=args.base_revision,
                               alpha=args.alpha, force=args.force)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


def evaluate_text(predictions_file: str, references_file: str, *, e2e_challenge: bool = False) -> dict:
    """Prints and returns the corpus metrics (or the E2E challenge's) of the predictions against the references."""
    try:
        predictions, references = read_predictions(predictions_file), read_references(references_file)
        if e2e_challenge:
            from ..e2e_metrics import E2E_METRIC_NAMES, e2e_challenge_scores

            scores, names = e2e_challenge_scores(predictions, references), E2E_METRIC_NAMES
        else:
            scores, names = corpus_metrics(predictions, references), METRIC_NAMES
    except (FileNotFoundError, ValueError, TypeError, ImportError, RuntimeError) as error:
        raise SystemExit(f"error: {error}") from error
    print(format_table({Path(predictions_file).name: scores}, names))
    return {"predictions": predictions_file, "references": references_file, "inputs": len(predictions),
            "scores": scores}


def evaluate_nll(reweighter_path: str, data: str, *, columns: dict, max_length: int, chat: bool, base: str | None,
                 base_revision: str | None, alpha: float | None, force: bool) -> dict:
    """Prints and returns the completions' NLL/token and perplexity under base + reweighter and the base alone."""
    read_reweighter_config(reweighter_path)  # a missing reweighter or a bad data file fail before the base model is loaded
    tokenizer = load_base_tokenizer(base, base_revision)
    pairs, report = read_pairs(data, columns)
    examples = encode(tokenizer, pairs, report, "evaluation", max_length=max_length, chat=chat)
    model, _ = load_base(base, base_revision)
    plugin = PluginModel.from_pretrained(reweighter_path).eval()
    plugin.check_compatible(model, tokenizer=tokenizer, strict=not force)
    alpha = plugin.config.alpha if alpha is None else alpha
    results = {}
    for name, strength in (("base + reweighter", alpha), ("base alone", 0.0)):
        total, count = completion_nll(plugin, examples, LiveBaseModel(model), strength, tokenizer.pad_token_id)
        results[name] = {"NLL/token": total / count, "perplexity": math.exp(total / count), "tokens": count}
    for name, row in results.items():
        print(f"{name:>18}: NLL/token {row['NLL/token']:.4f}, perplexity {row['perplexity']:.2f} ({row['tokens']} tokens)")
    return results
