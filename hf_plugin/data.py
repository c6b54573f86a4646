"""Task data: prompt/completion pairs from CSV, JSONL or `datasets`, tokenised with the loss on completions only."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging


logger = logging.get_logger(__name__)

_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


@dataclass
class Example:
    """One training pair; `row` is its 0-based row number in the source, for error messages.

    For chat data, `messages` holds the conversation before the answer (rendered with the tokenizer's chat
    template when encoding) and `prompt` is its last user message.
    """

    prompt: str
    completion: str
    row: int
    messages: list[dict] | None = None


@dataclass
class DataReport:
    """What was read: how many rows were used and which were skipped, by reason."""

    source: str
    used: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, row: int) -> None:
        self.skipped.setdefault(reason, []).append(row)

    def summary(self) -> str:
        parts = [f"{self.source}: {self.used} usable rows"]
        for reason, rows in self.skipped.items():
            shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
            parts.append(f"{len(rows)} skipped ({reason}; rows {shown})")
        return "; ".join(parts)


def read_examples(
    source: str | Path,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    template: str | None = None,
    split: str = "train",
    messages_column: str | None = None,
) -> tuple[list[Example], DataReport]:
    """Reads prompt/completion pairs from a CSV/TSV/JSON(L)/Parquet file or a `datasets` name.

    Rows with an empty prompt or completion are skipped and reported once (with their first row numbers);
    a source without a usable row, or without the columns asked for, is an error. CSV cells are read as they
    are written (`NA`, `null` and `007` stay text); an empty, malformed or non-UTF-8 file is an error naming the
    file and line.

    Args:
        source (`str` or `Path`): a local file or `datasets` folder, or a dataset id on the Hub.
        prompt_column (`str`, *optional*, defaults to `"prompt"`): column holding the prompt.
        completion_column (`str`, *optional*, defaults to `"completion"`): column holding the completion; `None`
            reads prompts alone (for generation), with empty completions.
        template (`str`, *optional*): builds the prompt from the row's columns with `str.format`, e.g.
            `"Data: {mr}\\nSentence:"`; `prompt_column` is then not needed.
        split (`str`, *optional*, defaults to `"train"`): split of a `datasets` source.
        messages_column (`str`, *optional*): chat-formatted rows instead: a column of `{"role", "content"}`
            lists whose last message, the assistant's, is the completion; the rest is the prompt (encode with
            `chat=True`).

    Returns:
        `tuple[list[Example], DataReport]`
    """
    table = _read_table(source, split)
    columns = set(table.column_names)
    if messages_column is not None:
        return _read_conversations(table, source, messages_column)
    needed = ({completion_column} - {None}) | (set() if template else {prompt_column})
    if missing := needed - columns:
        raise ValueError(f"{source} has no column(s) {sorted(missing)}; its columns are {sorted(columns)}.")

    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name] if template else []
    if unknown := [name for name in fields if name not in columns]:
        raise ValueError(f"Template field(s) {unknown} are not columns of {source}: {sorted(columns)}.")
    report = DataReport(str(source))
    examples = []
    for row, record in enumerate(table):
        completion = "" if completion_column is None else _text(record[completion_column])
        if template is not None:
            if any(not _text(record[name]).strip() for name in fields):
                report.skip("empty prompt", row)
                continue
            prompt = template.format(**{name: _text(record[name]) for name in fields})
        else:
            prompt = _text(record[prompt_column])
        if not prompt.strip():
            report.skip("empty prompt", row)
        elif completion_column is not None and not completion.strip():
            report.skip("empty completion", row)
        else:
            examples.append(Example(prompt, completion, row))
    return _finish(examples, report)


def _text(value) -> str:
    """A cell as text: a JSON number as it was written (`42`, `3.5`), null as empty."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# What `datasets` can take as a Hub dataset name: "name" or "owner/name", nothing that looks like a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class _Table(list):
    """Rows read by this module, with the `column_names` of a `datasets.Dataset`."""

    def __init__(self, rows: list[dict], column_names: list[str]):
        super().__init__(rows)
        self.column_names = column_names


def _read_table(source: str | Path, split: str):
    """Rows of a local CSV/TSV/JSON(L)/Parquet file, a local `datasets` folder, or a Hub dataset.

    CSV/TSV and JSON(L) are parsed here rather than by `datasets`, so every CSV cell stays the string it is
    (pandas would read `None`, `NA`, `null` or `nan` as missing and numeric columns as numbers), and a malformed
    file gets one error naming the file and line. A missing path never reaches the Hub unless it is a Hub id.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in _SUFFIXES and path.is_file():
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
        if suffix in (".json", ".jsonl"):
            return _read_json(path)
        return _load_dataset(path, str(path), split="train")
    if path.is_dir():
        return _load_dataset(path, str(path), split=split)
    if path.exists():
        raise ValueError(f"Cannot read {path}: unknown file type {suffix or '(no extension)'!r}; "
                         f"use one of {', '.join(sorted(_SUFFIXES))}.")
    if suffix in _SUFFIXES or not _HUB_ID.fullmatch(str(source)):
        raise FileNotFoundError(f"Data file not found: {path}")
    return _load_dataset(path, str(source), split=split)


def _load_dataset(path: Path, name: str, split: str):
    """`datasets.load_dataset` for a Parquet file, a local dataset folder or a Hub id, with a one-line error."""
    import datasets

    try:
        if path.suffix.lower() == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        return datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as error:  # DatasetNotFoundError and connection errors are OSErrors
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        what = "a data file or folder" if path.exists() else "a local file or folder, nor a dataset on the Hub"
        raise ValueError(f"Cannot read {name} as {what}: {detail}") from error


def _decoded(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark is dropped); other bytes, or an empty file, are an error."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text (byte {data[error.start]:#04x}); save it as UTF-8.") from error
    if not text.strip():
        raise ValueError(f"{path} is empty.")
    return text


def _read_csv(path: Path, delimiter: str) -> _Table:
    reader = csv.reader(io.StringIO(_decoded(path), newline=""), delimiter=delimiter)
    header, rows = next(reader), []
    try:
        for cells in reader:
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                raise ValueError(f"{path}, line {reader.line_num}: {len(cells)} fields, but the header has "
                                 f"{len(header)} ({', '.join(header)}).")
            rows.append(dict(zip(header, cells)))
    except csv.Error as error:
        raise ValueError(f"{path}, line {reader.line_num}: malformed CSV ({error}).") from error
    if not rows:
        raise ValueError(f"{path} has a header ({', '.join(header)}) but no rows.")
    return _Table(rows, header)


def _read_json(path: Path) -> _Table:
    """A JSON list of objects, or JSON lines with one object per line."""
    text = _decoded(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = [(f"item {i}", record) for i, record in enumerate(json.loads(text))]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from error
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from error
    columns = {}
    for where, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{path}, {where}: expected a JSON object with named fields, got {type(record).__name__}.")
        columns.update(dict.fromkeys(record))
    if not records:
        raise ValueError(f"{path} has no rows.")
    # A field missing from a row reads as empty, as in `datasets`.
    return _Table([{name: record.get(name) for name in columns} for _, record in records], list(columns))


def _finish(examples: list[Example], report: DataReport) -> tuple[list[Example], DataReport]:
    """Reports skipped rows once; a source with no usable row is an error."""
    report.used = len(examples)
    if not examples:
        raise ValueError(f"No usable row in {report.source}: {report.summary()}")
    if report.skipped:
        logger.warning(report.summary())
    return examples, report


def _read_conversations(table, source, column: str) -> tuple[list[Example], DataReport]:
    if column not in table.column_names:
        raise ValueError(f"{source} has no column(s) {[column]}; its columns are {sorted(table.column_names)}.")
    report, examples = DataReport(str(source)), []
    for row, record in enumerate(table):
        messages = record[column] or []
        if len(messages) < 2 or messages[-1].get("role") != "assistant" or not (messages[-1].get("content") or "").strip():
            report.skip("no final assistant message", row)
            continue
        users = [m["content"] for m in messages[:-1] if m.get("role") == "user"]
        examples.append(Example(users[-1] if users else "", messages[-1]["content"], row, messages=messages[:-1]))
    return _finish(examples, report)


def split_by_prompt(
    examples: Sequence[Example], validation_fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Holds out a fraction of the *distinct prompts*, so no prompt's references straddle the two parts.

    Args:
        examples (`Sequence[Example]`): the pairs.
        validation_fraction (`float`): share of distinct prompts to hold out, in (0, 1).
        seed (`int`, *optional*, defaults to 0): seed of the shuffle of distinct prompts.

    Returns:
        `tuple[list[Example], list[Example]]`: training and validation pairs, in their original order.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    prompts = sorted({_prompt_key(e) for e in examples})
    random.Random(seed).shuffle(prompts)
    held_out = set(prompts[: max(1, round(validation_fraction * len(prompts)))])
    if len(held_out) == len(prompts):
        raise ValueError(f"Cannot hold out {validation_fraction:.0%} of {len(prompts)} distinct prompts and train on the rest.")
    return ([e for e in examples if _prompt_key(e) not in held_out],
            [e for e in examples if _prompt_key(e) in held_out])


def _prompt_key(example: Example) -> str:
    return repr(example.messages) if example.messages is not None else example.prompt


def demonstration_prompt(
    prompt: str, demonstrations: Sequence[Example], separator: str = " ", shot_separator: str = "\n\n"
) -> str:
    r"""`prompt` preceded by worked demonstrations (a k-shot prompt), each rendered as `encode_examples` joins a pair.

    Each demonstration becomes `demo.prompt + separator + demo.completion + shot_separator` (the completion's
    leading spaces dropped, as in `encode_examples`), so a prompt built here at use time is exactly a training
    prompt of `with_demonstrations`.

    Args:
        prompt (`str`): the input to complete.
        demonstrations (`Sequence[Example]`): the worked pairs, in order.
        separator (`str`, *optional*, defaults to `" "`): between a demonstration's prompt and completion (the
            `separator` of `encode_examples`).
        shot_separator (`str`, *optional*, defaults to `"\n\n"`): after each demonstration.

    Examples:

    ```python
    >>> from hf_plugin.data import Example, demonstration_prompt
    >>> demonstration_prompt("Data: b\nSentence:", [Example("Data: a\nSentence:", "A.", 0)])
    'Data: a\nSentence: A.\n\nData: b\nSentence:'

    ```
    """
    shots = "".join(demo.prompt + separator + demo.completion.lstrip() + shot_separator for demo in demonstrations)
    return shots + prompt


def with_demonstrations(
    examples: Sequence[Example],
    pool: Sequence[Example],
    k: int,
    seed: int = 0,
    separator: str = " ",
    shot_separator: str = "\n\n",
) -> list[Example]:
    r"""The examples with `k` demonstrations from `pool` before each prompt: training under k-shot prompts.

    For each example, `k` distinct prompts of `pool` other than the example's own are drawn at random, each with
    one of its completions, and rendered with `demonstration_prompt`. The draw is seeded per example (by `seed`
    and the example's position), so it does not depend on the other examples.

    Args:
        examples (`Sequence[Example]`): the pairs to train on (plain prompts, not chat).
        pool (`Sequence[Example]`): where demonstrations come from, e.g. the training part itself.
        k (`int`): demonstrations per prompt; 0 returns copies of the examples.
        seed (`int`, *optional*, defaults to 0): seed of the draws.
        separator, shot_separator (`str`, *optional*): as for `demonstration_prompt`.

    Returns:
        `list[Example]`: the examples, in order, with k-shot prompts.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"The number of demonstrations must be a non-negative integer, got {k!r}.")
    if any(e.messages is not None for e in (*examples, *pool)):
        raise ValueError("Demonstrations are rendered into plain prompts; chat-formatted examples are not supported.")
    by_prompt: dict[str, list[Example]] = {}
    for demo in pool:
        by_prompt.setdefault(demo.prompt, []).append(demo)
    prompts = list(by_prompt)
    if k and len(prompts) <= k and any(len(set(prompts) - {e.prompt}) < k for e in examples):
        raise ValueError(f"The pool has {len(prompts)} distinct prompts: too few to draw {k} demonstrations other "
                         "than each example's own.")
    shot = []
    for index, example in enumerate(examples):
        rng = random.Random(f"{seed}-{index}")
        # One more than needed, so that the example's own prompt can be dropped and the draw stays uniform.
        drawn = [p for p in rng.sample(prompts, min(k + 1, len(prompts))) if p != example.prompt][:k] if k else []
        demos = [rng.choice(by_prompt[p]) for p in drawn]
        shot.append(replace(example, prompt=demonstration_prompt(example.prompt, demos, separator, shot_separator)))
    return shot


def chat_prompt(tokenizer: PreTrainedTokenizerBase, example: Example) -> str:
    """The example's conversation (or its prompt as one user turn) in the tokenizer's chat template, ready for the
    assistant's answer."""
    messages = example.messages or [{"role": "user", "content": example.prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    index: int

    @property
    def prompt_ids(self) -> list[int]:
        """The ids before the first learned position."""
        first = next((i for i, label in enumerate(self.labels) if label != -100), len(self.labels))
        return self.input_ids[:first]

    @property
    def completion_ids(self) -> list[int]:
        """The learned ids (the completion and its EOS)."""
        return [label for label in self.labels if label != -100]


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int,
    separator: str = " ",
    chat: bool = False,
    report: DataReport | None = None,
) -> list[EncodedExample]:
    """Tokenises pairs: prompt tokens get label -100, completion tokens and a final EOS are learned.

    Prompt and completion are tokenised separately, so the boundary between them is exact. Pairs longer than
    `max_length` tokens are skipped and reported.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the base model's tokenizer.
        examples (`Sequence[Example]`): the pairs.
        max_length (`int`): the longest sequence kept (the reweighter's positions bound it).
        separator (`str`, *optional*, defaults to `" "`): put between prompt and completion (ignored with `chat`).
        chat (`bool`, *optional*, defaults to `False`): wrap the prompt in the tokenizer's chat template.
        report (`DataReport`, *optional*): where to record skipped pairs.

    Returns:
        `list[EncodedExample]`: `index` is the pair's position in `examples`.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token; completions must end with one.")
    encoded, too_long = [], {}  # row: length
    for index, example in enumerate(examples):
        if example.messages is not None and not chat:
            raise ValueError("Chat-formatted examples must be encoded with chat=True.")
        prompt = chat_prompt(tokenizer, example) if chat else example.prompt
        prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        completion_text = example.completion if chat else separator + example.completion.lstrip()
        completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(completion_ids) > max_length:
            too_long[example.row] = len(prompt_ids) + len(completion_ids)
            continue
        encoded.append(EncodedExample(prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids, index))
    if too_long:
        if report is not None:
            for row in too_long:
                report.skip(f"longer than {max_length} tokens", row)
        shown = ", ".join(str(r) for r in list(too_long)[:5])
        logger.warning(f"Skipped {len(too_long)} pairs longer than {max_length} tokens (rows {shown}{', ...' if len(too_long) > 5 else ''}).")
    if not encoded:
        source = f" of {report.source}" if report is not None else ""
        raise ValueError(f"No pair{source} fits in max_length={max_length} tokens (the shortest has {min(too_long.values(), default=0)}).")
    return encoded


def collate(batch: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch: `input_ids`, `attention_mask`, `labels` (-100 on padding) and `index`."""
    length = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "index": torch.tensor([e.index for e in batch])}
