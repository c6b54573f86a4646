"""`hf-plugin generate`: complete prompts with the base model and a reweighter (or the base alone, or a related
method, see `related`), one JSON line per prompt."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data import Example, chat_prompt
from ..logits_process import PluginLogitsProcessor
from ..modeling_plugin import PluginModel
from .arguments import (add_base_arguments, add_column_arguments, add_former_name, check_positive, column_options,
                        is_chat, unescape)
from .common import load_base, load_base_tokenizer, read_pairs, read_reweighter_config
from .related import DecodingOptions, add_related_arguments, related_processor


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate with base + reweighter",
        description="Generates a completion for each prompt and writes one JSON object per prompt, "
                    '{"prompt": ..., "completion": ...} (with --data also "row", the first data row of that prompt, '
                    'and "references", the --completion-column texts of all rows with that prompt), to --output or '
                    "stdout, so a completion spanning lines still matches its prompt. Give the prompts as in training: "
                    "--data with --template or --prompt-column (each distinct prompt once), or --prompt, --prompts-file "
                    "(a text file with one prompt per line, or JSON lines with a \"prompt\" field for prompts "
                    "spanning lines), or one prompt per line on stdin.")
    add_base_arguments(parser)
    reweighter = parser.add_argument("--reweighter", help="directory or Hub id of a reweighter")
    add_former_name(parser, "--plugin", reweighter)
    no_reweighter = parser.add_argument("--no-reweighter", action="store_true", help="use the base model alone")
    add_former_name(parser, "--no-plugin", no_reweighter)
    parser.add_argument("--prompt", action="append",
                        help=r'a prompt (repeatable); \n and \t are unescaped as in --template')
    parser.add_argument("--prompts-file",
                        help='a text file with one prompt per line, or .jsonl with {"prompt": ...} per line')
    parser.add_argument("--data", help="build the prompts from this CSV/TSV/JSON(L)/Parquet file, as `train` does")
    add_column_arguments(parser, generation=True)
    parser.add_argument("--alpha", type=float, default=None,
                        help="strength of the reweighter (default: its own) or of --proxy-expert's term (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--stop", action="append",
                        help=r'cut each completion at the first occurrence of this string (repeatable; e.g. "\n")')
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--output", help="write the JSON lines to this file instead of stdout")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="use the reweighter even if its tokenizer differs")
    add_related_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Generates from the base model, with the reweighter unless --no-reweighter; one JSON line per prompt.

    Everything that can be checked without the base model (arguments, the reweighter's config, the prompts and
    their length in tokens) is checked before it is loaded.
    """
    decoding = DecodingOptions.from_args(args)
    decoding.check()
    check_positive(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, num_beams=args.num_beams)
    if sum(source is not None for source in (args.prompt, args.prompts_file, args.data)) > 1:
        raise SystemExit("error: give prompts one way: --prompt, --prompts-file or --data")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise SystemExit(f"error: --output: folder {Path(args.output).parent} does not exist")
    if args.output and any(source and Path(source).resolve() == Path(args.output).resolve()
                           for source in (args.data, args.prompts_file)):
        raise SystemExit(f"error: --output {args.output} is the input file; it would be overwritten")
    config = read_reweighter_config(args.reweighter) if args.reweighter is not None else None
    examples, references = generation_inputs(prompts=args.prompt, prompts_file=args.prompts_file, data=args.data,
                                             columns=column_options(args))
    tokenizer = load_base_tokenizer(args.base, args.base_revision)
    chat = is_chat(args)
    texts = [chat_prompt(tokenizer, example) if chat else example.prompt for example in examples]
    # A related method's small models are loaded, and its processor built (checking its options and the models'
    # vocabularies), before the base model.
    related = related_processor(decoding, tokenizer, force=args.force)
    limits = [("the reweighter's", config)] if config is not None else []
    for role, auxiliary in zip(decoding.roles(), related.auxiliaries if related else []):
        if isinstance(auxiliary.runner.model, PluginModel):
            limits.append((f"the {role}'s", auxiliary.runner.model.config))
    if limits:
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=not chat)["input_ids"]]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        for owner, limit_config in limits:
            if lengths[longest] + args.max_new_tokens > limit_config.max_position_embeddings:
                raise SystemExit(
                    f"error: prompt {longest + 1} ({where(examples[longest], args.data)}) has {lengths[longest]} "
                    f"tokens; with --max-new-tokens {args.max_new_tokens} that passes {owner} "
                    f"{limit_config.max_position_embeddings} positions")
    stops = [unescape(stop) for stop in args.stop or []]
    base, _ = load_base(args.base, args.base_revision)
    processors = [related] if related is not None else []
    if args.reweighter is not None:
        reweighter = PluginModel.from_pretrained(args.reweighter).eval()
        processors.append(PluginLogitsProcessor(reweighter, alpha=args.alpha, tokenizer=tokenizer, strict=not args.force))
    torch.manual_seed(args.seed)
    output = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for start in range(0, len(texts), args.batch_size):
            inputs = tokenizer(texts[start : start + args.batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=not chat)
            generated = base.generate(
                **inputs, logits_processor=processors, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                num_beams=args.num_beams, repetition_penalty=args.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
            )
            completions = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for index, completion in enumerate(completions, start=start):
                record = {"prompt": examples[index].prompt, "completion": cut(completion, stops)}
                if args.data is not None:
                    record["row"] = examples[index].row
                if references is not None:
                    record["references"] = references[index]
                output.write(json.dumps(record, ensure_ascii=False) + "\n")
            output.flush()
    finally:
        if output is not sys.stdout:
            output.close()
    if args.output:
        print(f"Wrote {len(texts)} completions to {args.output}")


def generation_inputs(*, prompts: Sequence[str] | None, prompts_file: str | None, data: str | None,
                      columns: dict) -> tuple[list[Example], list[list[str]] | None]:
    """The prompts to complete and, with --data and a --completion-column, each prompt's references.

    With --data the prompts are built exactly as in training (same reader, columns and template), once per
    distinct prompt: rows that share a prompt (several references for one input) are generated once.
    """
    if data is not None or Path(prompts_file or "").suffix.lower() in (".json", ".jsonl"):
        rows, _ = read_pairs(data or prompts_file, columns)
        groups: dict[str, list[Example]] = {}
        for example in rows:
            groups.setdefault(repr(example.messages) if example.messages is not None else example.prompt, []).append(example)
        examples = [group[0] for group in groups.values()]
        if columns["completion_column"] is None:
            return examples, None
        return examples, [[example.completion for example in group] for group in groups.values()]
    if prompts_file is not None:
        try:
            lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as error:
            raise SystemExit(f"error: --prompts-file {prompts_file} not found") from error
        except (OSError, UnicodeDecodeError) as error:
            raise SystemExit(f"error: cannot read --prompts-file {prompts_file}: {error}") from error
    else:
        lines = [unescape(prompt) for prompt in prompts] if prompts else sys.stdin.read().splitlines()
    examples = [Example(line, "", row) for row, line in enumerate(lines) if line.strip()]
    if not examples:
        raise SystemExit("error: no prompts (use --prompt, --prompts-file, --data, or one prompt per line on stdin)")
    return examples, None


def where(example: Example, data: str | None) -> str:
    """Where a prompt came from, for an error: its row of --data, or its first characters."""
    return f"row {example.row} of {data}" if data is not None else repr(example.prompt[:40])


def cut(completion: str, stops: Sequence[str]) -> str:
    """The completion up to its first stop string, without surrounding whitespace.

    Leading whitespace goes first, so that a completion opening with a newline is not cut to nothing by `\\n`.
    """
    completion = completion.lstrip()
    ends = [completion.find(stop) for stop in stops if stop and stop in completion]
    return completion[: min(ends, default=len(completion))].strip()
