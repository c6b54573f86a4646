"""Argument groups that several commands share, each beside the reader that turns it into keyword arguments.

`add_*_arguments(parser)` registers a group's flags; `*_options(args)` reads the same group back from the parsed
`Namespace` as the keyword arguments of the helpers and library functions it feeds, so that a flag and the
parameter it becomes stand in one place. The checks here run before anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing

from ..completions import DEFAULT_TASK_VOCAB_SIZE
from ..copying import COPY_MODES, COPY_SOURCES, POINTER_OCCURRENCES, word_start_aliases
from ..loading import offline_smollm2


def option(name: str) -> str:
    """The flag of a `Namespace` attribute: `max_length` -> `--max-length`."""
    return "--" + name.replace("_", "-")


def unescape(template: str | None) -> str | None:
    """Lets a shell user write `--template "Data: {mr}\\nSentence:"` for a two-line prompt."""
    return None if template is None else template.replace("\\n", "\n").replace("\\t", "\t")


def check_positive(**values: int) -> None:
    """Refuses the first value below 1, naming its flag: `check_positive(batch_size=0)` -> `--batch-size`."""
    for name, value in values.items():
        if value < 1:
            raise SystemExit(f"error: {option(name)} must be at least 1, got {value}")


class _FormerName(argparse.Action):
    """A flag's name before it was renamed: hidden from --help, it acts as `current` (the flag under its new name)
    and says the new name on stderr."""

    def __init__(self, option_strings, dest, current: argparse.Action, **kwargs):
        super().__init__(option_strings, current.dest, nargs=current.nargs, const=current.const,
                         default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.current = current

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated, use {self.current.option_strings[0]}", file=sys.stderr)
        self.current(parser, namespace, values, option_string)


def add_former_name(parser: argparse.ArgumentParser, name: str, current: argparse.Action) -> None:
    """Keeps `name` (e.g. `--plugin`) working as a deprecated alias of the flag `current` (e.g. `--reweighter`)."""
    parser.add_argument(name, action=_FormerName, current=current)


# -- flags made from a dataclass's fields ------------------------------------------------------------------------------

_ENTRY = re.compile(r"(\w+) \(([^)]*)\): (.*)")


def documented_fields(cls: type) -> dict[str, tuple[str, str]]:
    """The `Args:` entries of a dataclass's docstring (the transformers style), by field name, as (kind, description):
    `epochs (`int`, *optional*, defaults to 4): passes over the training data.` gives
    `{"epochs": ("`int`, *optional*, defaults to 4", "passes over the training data.")}`; an entry's further lines
    are joined to its description."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    entries, indent, name = {}, None, None
    for line in lines[lines.index("Args:") + 1:] if "Args:" in lines else ():
        depth = len(line) - len(line.lstrip())
        if not line.strip() or depth == 0:  # the end of the section
            break
        match = _ENTRY.fullmatch(line.strip()) if indent in (None, depth) else None
        if match:
            indent, name = depth, match[1]
            entries[name] = (match[2], match[3])
        elif name is None:
            raise ValueError(f"{cls.__name__}'s `Args:` section does not start with `name (type): description`")
        else:
            entries[name] = (entries[name][0], f"{entries[name][1]} {line.strip()}")
    return entries


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, names: typing.Iterable[str],
                            **overrides: dict) -> None:
    """A flag per field of the dataclass `cls` in `names` (`batch_size` -> `--batch-size`), with the field's default,
    type and `metadata["choices"]`, and its docstring entry as help: one place for each. A bool field that defaults
    to `False` is a switch. `overrides[name]` holds further `add_argument` keywords (e.g. another default)."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints, documented = typing.get_type_hints(cls), documented_fields(cls)
    for name in names:
        field, kind = fields[name], hints[name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `str | None`: a str that may stay unset
            kind, = (arg for arg in typing.get_args(kind) if arg is not type(None))
        if kind not in (int, float, str, bool) or field.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{name} is not a plain option with a default")
        if name not in documented:
            raise TypeError(f"{cls.__name__}'s docstring does not document {name}")
        shown = "" if field.default is None or kind is bool else " (default: %(default)s)"
        keywords = {"default": field.default, "help": documented[name][1].replace("%", "%%") + shown}
        if kind is bool:
            keywords["action"] = "store_true" if field.default is False else argparse.BooleanOptionalAction
        else:
            keywords["type"] = kind
            if "choices" in field.metadata:
                keywords["choices"] = field.metadata["choices"]
        parser.add_argument(option(name), **{**keywords, **overrides.get(name, {})})


def dataclass_options(args: argparse.Namespace, names: typing.Iterable[str]) -> dict:
    """The flags of `add_dataclass_arguments` read back as the dataclass's keyword arguments."""
    return {name: getattr(args, name) for name in names}


# -- the base model --------------------------------------------------------------------------------------------------


def _default_base() -> str | None:
    path = offline_smollm2()
    return str(path) if path is not None else None


def add_base_arguments(parser: argparse.ArgumentParser) -> None:
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


# -- data columns and training data ----------------------------------------------------------------------------------


def add_column_arguments(parser: argparse.ArgumentParser, generation: bool = False) -> None:
    """Which columns make the prompt and completion; for `generate`, the completions are only references."""
    parser.add_argument("--prompt-column", default="prompt")
    if generation:
        parser.add_argument("--completion-column",
                            help="with --data: write this column's texts as each prompt's references")
    else:
        parser.add_argument("--completion-column", default="completion")
    parser.add_argument("--template", help='build the prompt from columns, e.g. "Data: {mr}\\nSentence:"')
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the base tokenizer's chat template")
    parser.add_argument("--messages-column",
                        help="chat-formatted rows: a column of message lists ending with the answer")
    if not generation:
        parser.add_argument("--max-length", type=int, default=256, help="longest prompt + completion in tokens")


def column_options(args: argparse.Namespace) -> dict:
    """The column group as `hf_plugin.data.read_examples` keyword arguments (the template unescaped)."""
    return {"prompt_column": args.prompt_column, "completion_column": args.completion_column,
            "template": unescape(args.template), "messages_column": args.messages_column}


def is_chat(args: argparse.Namespace) -> bool:
    """Whether prompts go through the chat template: --chat, or chat-formatted rows (--messages-column)."""
    return args.chat or args.messages_column is not None


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="training data: CSV/TSV/JSON(L)/Parquet file or a datasets name")
    parser.add_argument("--validation-data",
                        help="validation data (default: hold out --validation-fraction of the prompts)")
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="share of distinct prompts held out")
    add_column_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)


def data_options(args: argparse.Namespace) -> dict:
    """The data group as `common.read_splits` keyword arguments."""
    return {"data": args.data, "validation_data": args.validation_data,
            "validation_fraction": args.validation_fraction, "seed": args.seed, "columns": column_options(args),
            "max_length": args.max_length, "chat": is_chat(args)}


# -- the base-logit cache (train and cache) --------------------------------------------------------------------------


def add_cache_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--cache", required=required,
                        help="folder of the top-k base-logit cache (written if missing)")
    parser.add_argument("--top-k", type=int, default=64, help="base log-probs kept per position in the cache")
    parser.add_argument("--overwrite-cache", action="store_true",
                        help="replace a cache of other data (or another --top-k or base) found in --cache")
    parser.add_argument("--task-vocab-size", type=int, default=DEFAULT_TASK_VOCAB_SIZE,
                        help="also cache the base log-probs of the N most frequent tokens of the training completions "
                             "(0: top-k only)")
    parser.add_argument("--cache-batch-size", type=int, default=8)
    parser.add_argument("--demonstrations", type=int, default=0, metavar="K",
                        help="train on K-shot prompts: K demonstrations drawn at random from the training part before "
                             "each prompt (both splits), rendered as at use time (see "
                             "hf_plugin.data.demonstration_prompt)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if an accelerator is available")


def cache_options(args: argparse.Namespace) -> dict:
    """The cache and base groups as `common.cached_sources` keyword arguments."""
    return {"cache_dir": args.cache, "top_k": args.top_k, "batch_size": args.cache_batch_size,
            "overwrite": args.overwrite_cache, "task_vocab_size": args.task_vocab_size, "base": args.base,
            "base_revision": args.base_revision, "base_id": args.base_id}


# -- a base model behind an API (cache and check-server) -------------------------------------------------------------


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url",
                        help="a base model behind an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 "
                             "(API key from $HF_PLUGIN_REMOTE_API_KEY or $OPENAI_API_KEY); --base then names "
                             "a local copy of its tokenizer")
    parser.add_argument("--model", help="with --base-url: the model name the server serves")
    parser.add_argument("--concurrency", type=int, default=4, help="with --base-url: requests in flight at once")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="with --base-url: seconds per request before a retry")
    parser.add_argument("--max-retries", type=int, default=3,
                        help="with --base-url: retries on 429/5xx, with back-off")
    parser.add_argument("--max-requests", type=int, default=None,
                        help="with --base-url: send at most this many requests, stopping before a shard that would "
                             "pass it (finished shards are kept; retries of a failed request are not counted)")


def remote_options(args: argparse.Namespace) -> dict:
    """The remote group (and --top-k, --unknown-labels) as `common.remote_base` keyword arguments."""
    return {"base_url": args.base_url, "model": args.model, "top_k": args.top_k, "concurrency": args.concurrency,
            "timeout": args.timeout, "max_retries": args.max_retries, "max_requests": args.max_requests,
            "unknown_labels": args.unknown_labels}


# -- the reweighter's architecture (init and train) ------------------------------------------------------------------


class Given(argparse.Action):
    """Stores the value and records in `namespace.given` that the option was given (its default cannot tell)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


def add_architecture_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden-size", type=int, default=256, action=Given)
    parser.add_argument("--num-layers", type=int, default=1, action=Given)
    parser.add_argument("--num-heads", type=int, default=1, action=Given)
    parser.add_argument("--intermediate-size", type=int, default=1024, action=Given)
    parser.add_argument("--alpha", type=float, default=1.0, help="strength recorded in the reweighter's config")
    parser.add_argument("--copy-mode", choices=COPY_MODES, default=None,
                        help="how the reweighter treats ids already in its context (default: as any other id); "
                             "'shared' leaves the choice among them to the base, so names unseen in training are not "
                             "deleted (see hf_plugin.copying)")
    parser.add_argument("--copy-source", choices=COPY_SOURCES, default=None,
                        help="with --copy-mode: the ids of the prompt (default) or of everything so far, generated "
                             "tokens included")
    parser.add_argument("--copy-word-starts", action="store_true",
                        help="with --copy-mode: a context token also brings its word-start form ('G' in "
                             "'name[Giraffe]' brings 'ĠG', as in ' Giraffe')")
    parser.add_argument("--copy-word-pieces", type=int, choices=(1, 2, 3), default=1,
                        help="with --copy-word-starts: also a marked word whose unmarked spelling takes up to this "
                             "many pieces in a row ('D', 'irt' in 'name[Dirt]' bring 'ĠDirt')")
    parser.add_argument("--copy-pointer", type=int, default=0, metavar="TOKENS",
                        help="with --copy-mode: a pointer that scores each context id by the TOKENS tokens before "
                             "it (its slot in 'name[Giraffe]'), so the reweighter can say which value comes next "
                             "(1 to 16; see hf_plugin.copying)")
    parser.add_argument("--copy-pointer-occurrences", choices=POINTER_OCCURRENCES, default="last",
                        help="with --copy-pointer: read an id's slot at its last occurrence in the prompt, or at every "
                             "one, keeping the best (a piece a name shares with the template, ':' in 'Dirt: Showdown', "
                             "can then be pointed at inside the name)")
    parser.add_argument("--copy-coverage", action="store_true",
                        help="with --copy-mode on the prompt: the prompt ids the output has already written get one "
                             "more learned value, so the reweighter can hold back a value it has written")
    parser.add_argument("--copy-continuation", action="store_true",
                        help="with --copy-mode on the prompt: the prompt ids that follow the token the output wrote "
                             "last get one more learned value, so a value begun is finished")
    parser.add_argument("--copy-word-forms", action="store_true",
                        help="with --copy-word-starts: the ids brought in as a piece's word start, and those brought "
                             "as a word spelled in 2 or 3 pieces, get a learned value each, so the reweighter can "
                             "prefer the whole word ('ĠCoc' of 'C', 'oc') to its first piece ('ĠC')")


def architecture_options(args: argparse.Namespace) -> dict:
    """--hidden-size, --num-layers, --num-heads and --intermediate-size as `PluginConfig` keyword arguments."""
    return {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers,
            "num_attention_heads": args.num_heads, "intermediate_size": args.intermediate_size}


def copy_arguments(args: argparse.Namespace) -> dict:
    """The copy flags as `check_copy_arguments` and `copy_options` keyword arguments."""
    return {"copy_mode": args.copy_mode, "copy_source": args.copy_source, "copy_word_starts": args.copy_word_starts,
            "copy_word_pieces": args.copy_word_pieces, "copy_pointer": args.copy_pointer,
            "copy_pointer_occurrences": args.copy_pointer_occurrences, "copy_coverage": args.copy_coverage,
            "copy_continuation": args.copy_continuation, "copy_word_forms": args.copy_word_forms}


def check_copy_arguments(*, copy_mode: str | None, copy_source: str | None, copy_word_starts: bool,
                         copy_word_pieces: int, copy_pointer: int = 0, copy_pointer_occurrences: str = "last",
                         copy_coverage: bool = False, copy_continuation: bool = False, copy_word_forms: bool = False,
                         ignore_uncopied: float | None = None,
                         ignore_min_fraction: float | None = None) -> None:
    """The copy flags hang together: each needs --copy-mode, --copy-word-pieces and --copy-word-forms need
    --copy-word-starts, and train's --copy-ignore-uncopied (a rate) and --copy-ignore-min-fraction are in range."""
    for given, name in ((copy_word_starts, "--copy-word-starts"), (copy_source, "--copy-source"),
                        (copy_word_pieces != 1, "--copy-word-pieces"), (copy_pointer != 0, "--copy-pointer"),
                        (copy_coverage, "--copy-coverage"), (copy_continuation, "--copy-continuation"),
                        (ignore_uncopied is not None, "--copy-ignore-uncopied")):
        if given and copy_mode is None:
            raise SystemExit(f"error: {name} needs --copy-mode")
    for given, name in ((copy_word_pieces != 1, "--copy-word-pieces"), (copy_word_forms, "--copy-word-forms")):
        if given and not copy_word_starts:
            raise SystemExit(f"error: {name} needs --copy-word-starts")
    if not 0 <= copy_pointer <= 16:
        raise SystemExit(f"error: --copy-pointer must be 0 (none) to 16 tokens, got {copy_pointer}")
    if copy_pointer and copy_source == "context":
        raise SystemExit("error: --copy-pointer reads the prompt: it cannot be used with --copy-source context")
    if copy_pointer_occurrences != "last" and not copy_pointer:
        raise SystemExit("error: --copy-pointer-occurrences needs --copy-pointer")
    for given, name in ((copy_coverage, "--copy-coverage"), (copy_continuation, "--copy-continuation")):
        if given and copy_source == "context":
            raise SystemExit(f"error: {name} tells the prompt's ids from the output's: it cannot be used with "
                             "--copy-source context")
    if ignore_uncopied is not None and not 0 <= ignore_uncopied <= 1:
        raise SystemExit(f"error: --copy-ignore-uncopied must be a rate in [0, 1], got {ignore_uncopied}")
    if ignore_min_fraction is not None and (ignore_uncopied is None or not 0 < ignore_min_fraction <= 1):
        raise SystemExit(f"error: --copy-ignore-min-fraction needs --copy-ignore-uncopied and a fraction in (0, 1], "
                         f"got {ignore_min_fraction}")


def check_word_starts(tokenizer, copy_word_starts: bool) -> None:
    """--copy-word-starts needs a tokenizer with word-start forms; without them the table would stay empty."""
    if copy_word_starts and not bool((word_start_aliases(tokenizer) >= 0).any()):
        raise SystemExit("error: --copy-word-starts: the base's tokenizer has no word-start forms ('Ġ' or '▁' "
                         "tokens) to bring in; leave it out")


def copy_options(tokenizer, *, copy_mode: str | None, copy_source: str | None, copy_word_starts: bool,
                 copy_word_pieces: int, copy_pointer: int = 0, copy_pointer_occurrences: str = "last",
                 copy_coverage: bool = False, copy_continuation: bool = False, copy_word_forms: bool = False) -> dict:
    """The `PluginConfig` arguments of the copy flags (--copy-mode, --copy-source, --copy-word-starts,
    --copy-word-pieces, --copy-pointer, --copy-pointer-occurrences, --copy-coverage, --copy-continuation,
    --copy-word-forms)."""
    if copy_mode is None:
        return {}
    # Special tokens (BOS, EOS, chat markers) are structure, not content to copy.
    return {"copy_mode": copy_mode, "copy_ignore_ids": sorted(set(tokenizer.all_special_ids)),
            "copy_source": copy_source, "copy_word_starts": copy_word_starts, "copy_word_pieces": copy_word_pieces,
            "copy_pointer": copy_pointer, "copy_pointer_occurrences": copy_pointer_occurrences,
            "copy_coverage": copy_coverage, "copy_continuation": copy_continuation, "copy_word_forms": copy_word_forms}
