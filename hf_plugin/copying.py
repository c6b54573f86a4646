"""Copy-aware reweighting: how a reweighter treats the tokens already present in its context.

A reweighter trained on a few thousand completions pushes down every token it never saw as a target, so in the
product `p_base · r^alpha` a name the base would copy from the prompt loses to a name the reweighter memorised
(benchmarks/README, "misses an unseen name"). A copy mode changes the reweighter's logits for the ids that occur in
its prompt (`copy_source="prompt"`, the default) or in its whole context so far (`"context"`: the prompt and what
was generated), padding and `ignore_ids` excluded, with one scalar per step, `g_t = w · h_t + b`, read from its
last hidden state by a linear head:

- `"gate"`: `z'(v) = z(v) + g_t` for context ids. The head starts at zero, so an untrained gate changes nothing.
- `"shared"`: `z'(v) = g_t` for context ids. The reweighter cannot rank one context token above another (nor
  memorise names it would prefer to new ones); it only says how welcome copying is, and the base chooses what.
- `"floor"`: `z'(v) = max(z(v), g_t)` for context ids: no context token falls below `g_t`.

Where the prompt ends: in training, where the labels begin; in `PluginModel.forward`, `prompt_lengths` (or the
labels); in the logits processor, the sequence of the first call of a `generate()`, kept through beams and
roll-backs (see `hf_plugin.CachedModelRunner`). The `"context"` source needs no boundary, but generated tokens then
join the set: the reweighter can no longer hold back a token once it was written (measured on E2E: more repeated
phrases), nor rank the frequent words it has written.

Word starts. A value glued to a bracket or a colon in the prompt (`name[Giraffe]`: `G`, `ira`, `ffe`) is written
after a space in the output (` Giraffe`: `ĠG`, `ira`, `ffe`), and the space-prefixed first piece is another id. With
`word_start_aliases(tokenizer)` every context token that begins with a letter or digit also brings its word-start
form (`G` → `ĠG`) into the context. A word the vocabulary holds whole only in its marked form (`ĠDirt`, but `D`, `irt`
unmarked) is brought in by its unmarked spelling (`word_start_spellings`, up to 3 pieces). Measured with SmolLM2's
tokenizer on the first reference of each MR that names its subject: the first token of the name is in the copy set
for 71.7% of ViGGO's test games with word starts alone and 95.3% with spellings of up to 3 pieces (E2E's devel
restaurants: 67.1% and 100%).

Uncopied ids. The template and a data format's keys (`Data:`, `name[`, the newline that ends no output) are in the
prompts but the completions do not repeat them: in a copy set, the reweighter could not hold them back.
`PluginModel.ignore_uncopied_ids` adds to `copy_ignore_ids` the ids that training prompts hold and their completions
rarely repeat; they leave the set after aliases and spellings. Measured on E2E with spelled words (benchmarks/README):
the frequency rule (`min_fraction=0.5, max_copy_rate=1, judge_word_starts=True`) gives the best BLEU / ROUGE-L but
also leaves `ĠThe`, the first word of many names, to the reweighter; neither it nor the copy-rate rule keeps unseen
names better than word starts alone (19.8% and 18.6% missed against 10.8%), so both are off unless asked for.

Pointer. A copy set is symmetric: the reweighter says how welcome copying is, not which value goes where (measured
on ViGGO: copying alone opens with the year as readily as with the name). With `copy_pointer = w` each prompt id `v`
also gets `q_t · k_j`, added to `g_t`: `q_t` is read from the last hidden state as `g_t` is, `k_j` from the input
embeddings of the `w` tokens before column `j` (`preceding_embeddings`; zeros before a row's first token), and `j`
is the column of `v`'s last occurrence in the prompt — of the token that brought it, for an alias; of its first
piece, for a spelling; the last, so that under a few-shot prompt the query's value is pointed at, not a
demonstration's. In a `key[value]` format those tokens name the slot (`name`, `[`), so the reweighter can point at
the slot it wants next, a value it never saw included, while the base still chooses among the slot's tokens. Keys are
computed from the ids at every call: a KV cache holds nothing new. The query starts at zero, so an untrained pointer
changes nothing. With `copy_pointer_occurrences="every"` an id is read at each of its occurrences and keeps its best
score (`copy_set_columns`, `pointer_scores_every`): a piece a name shares with the rest of the prompt (`:` of
`Dirt: Showdown`, which recurs in `Sentence:`) can then be pointed at inside the name, where its last occurrence
lies outside it. Measured on E2E (benchmarks/README, `copy_pointer=4` with `"shared"` and word starts): unseen names
missed 10.8% → 3.6% on a random 500 test MRs, BLEU / ROUGE-L 23.1 / 39.6 → 25.4 / 41.3, for 82k parameters.

Coverage. A copy set does not say which of its values were already written, so the copy value that brings a value in
also brings it back (measured on ViGGO: 53 of the 64 outputs of the word-start pointer row that repeat a phrase
repeat a word of the MR, "Showdown: Showdown: ...").
With `copy_coverage=True` the prompt ids the output has written so far get one more value per step, `c_t = w' · h_t
+ b'` from a second head (zero at the start), added to their copy value, so the reweighter can hold back what it has
written apart from what it has not. It reads the context as the copy set does (the prompt's end, then the ids after
it), so it is exact wherever the copy modes are. Measured on E2E (benchmarks/README, with spelled words and the
pointer on every occurrence): outputs repeating a phrase 2.2% → 0.8% on the random 500 and 8.3% → 0% on the first 96,
BLEU / ROUGE-L there 21.4 / 39.2 → 25.3 / 42.1; on ViGGO (word starts, pointer on every occurrence) 11.7% → 2.5%,
20.2 / 38.0 → 22.1 / 39.9.

Continuation. A value copied piece by piece can stop or stray after its first pieces: of the 270 games the ViGGO row
with coverage leaves out, 120 are written in part (`Need for Speed` for `Need for Speed: Payback`, `2` for `Small
World 2`). With `copy_continuation=True` the prompt ids that follow, somewhere in the prompt, the token the output
wrote last get one more value per step from a third head (zero at the start): the ids right after each column that
brings that token into the copy set (its own id or its word-start form; after a spelled word, the id after its last
piece; `copy_set_columns(..., following=True)`, `continuations`). It is an induction head given, not learned: the
reweighter says how far to trust it, and the base still chooses among the followers (in an MR ` for` is followed by
` Speed` and by ` Everyone`). What the prompt holds before the output begins is never continued. Measured
(benchmarks/README, with spelled words or word starts, the pointer on every occurrence and coverage): on E2E all
names missed 11.2% → 3.6% on a random 500 test MRs, BLEU / ROUGE-L 26.6 / 42.9 → 27.2 / 44.0; on ViGGO games missed
60.7% → 38.2%, 22.1 / 39.9 → 27.1 / 42.2; with spelled words, beside a 3-shot prompt, 20.2 / 35.4 and 3.4% of the
games missed (the prompt alone 17.0 / 32.7, 10.6%). Under a few-shot prompt one written token is ambiguous (`:` is
followed by each demonstration's next token): trained with demonstrations, it missed more games (7.4% → 16.4%).

Word forms. A column can bring a piece's word start and a whole word at once: `C` of `name[Cocum]` brings `ĠC`,
and `C`, `oc` bring `ĠCoc`, the word the tokenizer writes (` Cocum` is `ĠCoc`, `um`). The copy set gives both one
value, so the base chooses: for all 16 `Cocum` MRs of E2E's first 96 the continuation row writes `C.` (15 times
"C.C., a coffee shop ..."). With `copy_word_forms=True` each form (a word start; a word spelled in 2, ...,
`copy_word_pieces` pieces) gets one more learned value per step (`word_form_occurrences`), so the reweighter can
learn from the training names, written as the tokenizer writes them, which form to prefer. Measured on E2E
(benchmarks/README, with continuation): `Cocum` kept (1 miss of 16), held-out NLL 1.375 → 1.313, but unseen names
missed 1.2% → 8.4% on a random 500 test MRs and 1.5% → 38.2% on the first 96: a form's value is one per step for
every slot, so the outputs open with another slot's spelled value ("Near Rainbow Vegetarian Café"). Off by default.

This module imports nothing else of ours: the remote-code copy of a saved reweighter carries it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


COPY_MODES = ("gate", "shared", "floor")
COPY_SOURCES = ("prompt", "context")
POINTER_OCCURRENCES = ("last", "every")


def first_occurrences(
    context_ids: torch.LongTensor,
    vocab_size: int,
    context_mask: torch.Tensor | None = None,
    ignore_ids: Sequence[int] | None = None,
) -> torch.LongTensor:
    """For each row and vocabulary id, the position of the id's first real occurrence in the row.

    Args:
        context_ids (`torch.LongTensor` of shape `(batch_size, length)`): the sequences.
        vocab_size (`int`): width of the result.
        context_mask (`torch.Tensor` of shape `(batch_size, length)`, *optional*): 1 for real tokens, 0 for padding.
        ignore_ids (`Sequence[int]`, *optional*): ids never counted (e.g. the tokenizer's special tokens).

    Returns:
        `torch.LongTensor` of shape `(batch_size, vocab_size)`: a position, or `length` where the id never occurs.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.copying import first_occurrences
    >>> first_occurrences(torch.tensor([[0, 3, 1, 3]]), 5, context_mask=torch.tensor([[0, 1, 1, 1]]), ignore_ids=[1])
    tensor([[4, 4, 4, 1, 4]])

    ```
    """
    rows, length = context_ids.shape
    counted = (context_ids >= 0) & (context_ids < vocab_size)
    if context_mask is not None:
        counted &= context_mask.to(context_ids.device).bool()
    if ignore_ids:
        ignored = torch.as_tensor(list(ignore_ids), dtype=context_ids.dtype, device=context_ids.device)
        counted &= ~torch.isin(context_ids, ignored)
    positions = torch.arange(length, device=context_ids.device).expand(rows, length)
    first = torch.full((rows, vocab_size), length, dtype=torch.long, device=context_ids.device)
    return first.scatter_reduce(
        1, context_ids.clamp(0, vocab_size - 1), positions.masked_fill(~counted, length), reduce="amin"
    )


# The word-start markers of byte-level BPE (GPT-2, LLaMA 3, SmolLM) and SentencePiece vocabularies.
_WORD_START_MARKERS = ("Ġ", "▁")


def word_start_aliases(tokenizer) -> torch.LongTensor:
    """For each id of `tokenizer`, the id of the same token with a word-start marker (`ĠG` for `G`), or -1.

    Only tokens beginning with a letter or digit get one; special tokens and tokens already marked get none.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the base's tokenizer.

    Returns:
        `torch.LongTensor` of shape `(len(tokenizer),)`.
    """
    vocab = tokenizer.get_vocab()
    aliases = torch.full((max(len(tokenizer), max(vocab.values()) + 1),), -1, dtype=torch.long)
    markers = [m for m in _WORD_START_MARKERS if any(token.startswith(m) for token in vocab)]
    if not markers:
        return aliases
    special = set(tokenizer.all_special_ids)
    for token, index in vocab.items():
        if index in special or not token[:1].isalnum():
            continue
        marked = vocab.get(markers[0] + token)
        if marked is not None:
            aliases[index] = marked
    return aliases


def word_start_spellings(tokenizer, max_pieces: int) -> torch.LongTensor:
    """For each marked word of `tokenizer` (`ĠDirt`), the ids of the same word unmarked when it takes 2 to `max_pieces`
    pieces (`D`, `irt`), as a value glued to a bracket in a prompt is tokenised; -1 elsewhere.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the base's tokenizer.
        max_pieces (`int`): the most pieces of a spelling (2 or 3; one piece is `word_start_aliases`' case).

    Returns:
        `torch.LongTensor` of shape `(len(tokenizer), max_pieces)`: row `i` spells id `i`, padded with -1.
    """
    vocab = tokenizer.get_vocab()
    spellings = torch.full((max(len(tokenizer), max(vocab.values()) + 1), max_pieces), -1, dtype=torch.long)
    markers = [m for m in _WORD_START_MARKERS if any(token.startswith(m) for token in vocab)]
    if not markers or max_pieces < 2:
        return spellings
    special = set(tokenizer.all_special_ids)
    marked = [(token, index) for token, index in vocab.items()
              if index not in special and token.startswith(markers[0]) and token[len(markers[0]):][:1].isalnum()]
    words = [tokenizer.convert_tokens_to_string([token]).lstrip() for token, _ in marked]
    pieces = tokenizer(words, add_special_tokens=False)["input_ids"]
    for (_, index), ids in zip(marked, pieces):
        # A spelling whose first piece is itself marked (SentencePiece's dummy prefix) never occurs glued to a bracket.
        if 2 <= len(ids) <= max_pieces and not any(tokenizer.convert_ids_to_tokens(ids[0]).startswith(m) for m in markers):
            spellings[index, : len(ids)] = torch.tensor(ids)
    return spellings


def add_spelled_words(
    first: torch.LongTensor, context_ids: torch.LongTensor, counted: torch.Tensor, spellings: torch.LongTensor
) -> torch.LongTensor:
    """`first_occurrences` with each marked word present from the last piece of its unmarked spelling (a new tensor).

    Args:
        first (`torch.LongTensor` of shape `(batch_size, vocab_size)`): from `first_occurrences`.
        context_ids (`torch.LongTensor` of shape `(batch_size, length)`): the sequences.
        counted (`torch.Tensor` of shape `(batch_size, length)`): 1 where a token counts (not padding, in the source).
        spellings (`torch.LongTensor` of shape `(vocab_size, max_pieces)`): from `word_start_spellings`.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.copying import add_spelled_words, first_occurrences
    >>> spellings = torch.full((6, 2), -1)
    >>> spellings[5] = torch.tensor([1, 2])  # id 5 is spelled 1, 2 when unmarked
    >>> context = torch.tensor([[0, 1, 2], [2, 1, 0]])
    >>> add_spelled_words(first_occurrences(context, 6), context, torch.ones(2, 3), spellings)
    tensor([[0, 1, 2, 3, 3, 2],
            [2, 1, 0, 3, 3, 3]])

    ```
    """
    rows, length = context_ids.shape
    for n, hit, words in spelled_word_hits(context_ids, counted, spellings, first.shape[1]):
        ends = torch.arange(n - 1, length, device=first.device).expand(rows, -1)
        first = first.scatter_reduce(1, torch.where(hit, words, 0), torch.where(hit, ends, length), reduce="amin")
    return first


def spelled_word_hits(context_ids: torch.LongTensor, counted: torch.Tensor, spellings: torch.LongTensor,
                      vocab_size: int):
    """For each spelling length `n` the table holds, where a row spells a marked word: yields `(n, hit, words)`, both
    of shape `(batch_size, length - n + 1)`, column `i` for the n-gram that begins at column `i`."""
    length = context_ids.shape[1]
    device = context_ids.device
    spellings = spellings[:vocab_size].to(device)
    pieces = (spellings >= 0).sum(dim=1)
    counted = counted.to(device).bool() & (context_ids >= 0) & (context_ids < vocab_size)
    ids = context_ids.clamp(0, vocab_size - 1)
    for n in range(2, spellings.shape[1] + 1):
        targets = (pieces == n).nonzero().squeeze(1)
        if not len(targets) or length < n:
            continue
        # One integer per n-gram (exact: vocab_size ** 3 fits in int64 for any vocabulary below 2 million).
        scale = vocab_size ** torch.arange(n, device=device)
        keys, order = (spellings[targets, :n] * scale).sum(dim=1).sort()
        targets = targets[order]
        windows = (ids.unfold(1, n, 1) * scale).sum(dim=-1)
        slot = torch.searchsorted(keys, windows).clamp(max=len(keys) - 1)
        hit = counted.unfold(1, n, 1).all(dim=-1) & (keys[slot] == windows)
        yield n, hit, targets[slot]


def add_aliases(first: torch.LongTensor, aliases: torch.LongTensor) -> torch.LongTensor:
    """`first_occurrences` with each id's alias present from where the id is (a new tensor)."""
    aliases = aliases[: first.shape[1]].to(first.device)
    has = (aliases >= 0) & (aliases < first.shape[1])
    sources = has.nonzero().squeeze(1)
    if not len(sources):
        return first
    targets = aliases[sources].expand(first.shape[0], -1)
    return first.scatter_reduce(1, targets, first[:, sources], reduce="amin")


def copy_set_first_occurrences(
    config,
    context_ids: torch.LongTensor,
    vocab_size: int,
    context_mask: torch.Tensor | None = None,
    prompt_lengths: torch.LongTensor | None = None,
    aliases: torch.LongTensor | None = None,
    spellings: torch.LongTensor | None = None,
    last: bool = False,
) -> torch.LongTensor:
    """`first_occurrences` of a reweighter's copy set: the ids of its source, with their word-start forms when it has
    the tables, less its ignored ids.

    Args:
        config (`PluginConfig`): the reweighter's; its `copy_source` and `copy_ignore_ids` are read.
        context_ids, vocab_size, context_mask: as `first_occurrences`.
        prompt_lengths (`torch.LongTensor` of shape `(batch_size,)`, *optional*): how many columns of each row
            (padding included) are its prompt; needed for `copy_source="prompt"`.
        aliases (`torch.LongTensor`, *optional*): from `word_start_aliases` (the reweighter's `copy_aliases`).
        spellings (`torch.LongTensor`, *optional*): from `word_start_spellings` (its `copy_word_spellings`).
        last (`bool`, *optional*, defaults to `False`): the position of each id's last occurrence instead (for a
            spelled word, of its first piece there): where the pointer reads an id's slot.

    Returns:
        `torch.LongTensor` of shape `(batch_size, vocab_size)`: as `first_occurrences`.
    """
    context_mask = _source_mask(config, context_ids, context_mask, prompt_lengths)
    length = context_ids.shape[1]
    if last:  # the first occurrences in the reversed rows, spellings reversed too
        context_ids = context_ids.flip(1)
        context_mask = context_mask.flip(1) if context_mask is not None else None
        spellings = reversed_spellings(spellings) if spellings is not None else None
    first = first_occurrences(context_ids, vocab_size, context_mask)
    if aliases is not None:
        first = add_aliases(first, aliases)
    if spellings is not None:
        counted = torch.ones_like(context_ids) if context_mask is None else context_mask
        first = add_spelled_words(first, context_ids, counted, spellings)
    first = _leave_ignored(config, first, length)
    return torch.where(first < length, length - 1 - first, length) if last else first


def _source_mask(config, context_ids, context_mask, prompt_lengths) -> torch.Tensor | None:
    """`context_mask` less the columns outside the reweighter's copy source."""
    if config.copy_source != "prompt":
        return context_mask
    if prompt_lengths is None:
        raise ValueError("A reweighter with copy_source='prompt' needs `prompt_lengths` (or `labels`): where "
                         "each row's prompt ends.")
    columns = torch.arange(context_ids.shape[1], device=context_ids.device)
    in_prompt = columns[None, :] < torch.as_tensor(prompt_lengths, device=context_ids.device).view(-1, 1)
    return in_prompt if context_mask is None else in_prompt & context_mask.to(in_prompt.device).bool()


def _counted(config, context_ids, vocab_size, context_mask, prompt_lengths) -> torch.Tensor:
    """Where a column counts for the copy set: a valid id in the reweighter's source, not padding."""
    counted = _source_mask(config, context_ids, context_mask, prompt_lengths)
    return (context_ids >= 0) & (context_ids < vocab_size) & (True if counted is None else counted.bool())


def _leave_ignored(config, first: torch.LongTensor, length: int) -> torch.LongTensor:
    """`first` (ids on its last dimension) with the ignored ids never present. They leave the set last, so an alias
    or a spelling cannot bring them back."""
    if not config.copy_ignore_ids:
        return first
    ignored = torch.tensor([i for i in config.copy_ignore_ids if i < first.shape[-1]], device=first.device)
    return first.index_fill(first.dim() - 1, ignored, length)


def copy_set_columns(
    config,
    context_ids: torch.LongTensor,
    vocab_size: int,
    context_mask: torch.Tensor | None = None,
    prompt_lengths: torch.LongTensor | None = None,
    aliases: torch.LongTensor | None = None,
    spellings: torch.LongTensor | None = None,
    following: bool = False,
) -> torch.LongTensor | tuple[torch.LongTensor, torch.LongTensor]:
    """For each column, the ids its token brings into the reweighter's copy set, as `copy_set_first_occurrences`
    counts them: the token's own id, its word-start alias, each marked word whose unmarked spelling begins there;
    -1 for none. Where a pointer with `copy_pointer_occurrences="every"` reads an id's slots.

    Args:
        config, context_ids, vocab_size, context_mask, prompt_lengths, aliases, spellings: as
            `copy_set_first_occurrences`.
        following (`bool`, *optional*, defaults to `False`): also return, for each id brought, the id of the source
            token right after the pieces that brought it (-1 for none): what continues a value copied from there.

    Returns:
        `torch.LongTensor` of shape `(batch_size, length, slots)`, `slots` = 1, + 1 with `aliases`, + one per
        spelling length of `spellings`; with `following`, a pair of them.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin import PluginConfig
    >>> from hf_plugin.copying import copy_set_columns
    >>> config = PluginConfig(vocab_size=6, copy_mode="shared", copy_ignore_ids=[0])
    >>> copy_set_columns(config, torch.tensor([[0, 3, 3, 5]]), 6, prompt_lengths=torch.tensor([3]))[..., 0]
    tensor([[-1,  3,  3, -1]])

    ```
    """
    counted = _counted(config, context_ids, vocab_size, context_mask, prompt_lengths)
    own = torch.where(counted, context_ids, -1)
    slots, pieces = [own], [1]
    if aliases is not None:
        aliases = aliases[:vocab_size].to(own.device)
        alias = torch.where(counted, aliases[own.clamp(min=0)], -1)
        slots.append(torch.where(alias < vocab_size, alias, -1))
        pieces.append(1)
    if spellings is not None:
        for n, hit, words in spelled_word_hits(context_ids, counted, spellings, vocab_size):
            slots.append(torch.nn.functional.pad(torch.where(hit, words, -1), (0, n - 1), value=-1))
            pieces.append(n)
    brought = torch.stack(slots, dim=-1)
    # Ignored ids leave the set last, so an alias or a spelling cannot bring them back.
    if config.copy_ignore_ids:
        ignored = torch.tensor(config.copy_ignore_ids, device=brought.device)
        brought = brought.masked_fill(torch.isin(brought, ignored), -1)
    if not following:
        return brought
    after = torch.nn.functional.pad(own, (0, max(pieces)), value=-1)
    columns = torch.arange(own.shape[1], device=own.device)[:, None] + torch.tensor(pieces, device=own.device)
    return brought, torch.where(brought >= 0, after[:, columns], -1)


def continuations(
    brought: torch.LongTensor, following: torch.LongTensor, last_ids: torch.LongTensor, vocab_size: int
) -> torch.Tensor:
    """Which ids continue, somewhere in the source, the token each position ends with: those right after a column
    that brings it (`copy_set_columns(..., following=True)`); a new tensor.

    Args:
        brought, following (`torch.LongTensor` of shape `(batch_size, length, slots)`): from `copy_set_columns`.
        last_ids (`torch.LongTensor` of shape `(batch_size, steps)`): the token each scored position ends with; -1
            where none is to be continued.
        vocab_size (`int`): width of the result.

    Returns:
        `torch.BoolTensor` of shape `(batch_size, steps, vocab_size)`.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin import PluginConfig
    >>> from hf_plugin.copying import continuations, copy_set_columns
    >>> config = PluginConfig(vocab_size=6, copy_mode="shared")
    >>> brought, following = copy_set_columns(config, torch.tensor([[1, 2, 1, 3]]), 6, prompt_lengths=torch.tensor([4]),
    ...                                       following=True)
    >>> continuations(brought, following, torch.tensor([[1, -1]]), 6).long()  # 1 is followed by 2 and by 3
    tensor([[[0, 0, 1, 1, 0, 0],
             [0, 0, 0, 0, 0, 0]]])

    ```
    """
    match = (brought[:, None] == last_ids[:, :, None, None]) & (last_ids[:, :, None, None] >= 0)
    index = torch.where(match & (following[:, None] >= 0), following[:, None], vocab_size).flatten(2)
    result = torch.zeros(*last_ids.shape, vocab_size + 1, dtype=torch.bool, device=last_ids.device)
    return result.scatter_(2, index.to(last_ids.device), True)[..., :vocab_size]


def word_form_occurrences(
    config,
    context_ids: torch.LongTensor,
    vocab_size: int,
    context_mask: torch.Tensor | None = None,
    prompt_lengths: torch.LongTensor | None = None,
    aliases: torch.LongTensor | None = None,
    spellings: torch.LongTensor | None = None,
) -> torch.LongTensor:
    """Where each id first joins the reweighter's copy set in each word form: as the word-start form of a piece
    (`aliases`), then as a marked word spelled in 2, ..., `max_pieces` pieces (`spellings`); the column of the form's
    last piece, `length` where never. What `copy_word_forms` gives its values by.

    Args: as `copy_set_first_occurrences`.

    Returns:
        `torch.LongTensor` of shape `(batch_size, forms, vocab_size)`, `forms` = 1 + `max_pieces` - 1 with
        `spellings`, 1 without.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin import PluginConfig
    >>> from hf_plugin.copying import word_form_occurrences
    >>> config = PluginConfig(vocab_size=6, copy_mode="shared")
    >>> aliases, spellings = torch.tensor([-1, 4, -1, -1, -1, -1]), torch.full((6, 2), -1)
    >>> spellings[5] = torch.tensor([1, 2])  # id 4 is 1's word start; id 5 is spelled 1, 2
    >>> word_form_occurrences(config, torch.tensor([[0, 1, 2]]), 6, prompt_lengths=torch.tensor([3]),
    ...                       aliases=aliases, spellings=spellings)
    tensor([[[3, 3, 3, 3, 1, 3],
             [3, 3, 3, 3, 3, 2]]])

    ```
    """
    counted = _counted(config, context_ids, vocab_size, context_mask, prompt_lengths)
    rows, length = context_ids.shape
    positions = torch.arange(length, device=context_ids.device).expand(rows, length)

    def first_at(ids: torch.LongTensor, ends: torch.LongTensor) -> torch.LongTensor:
        found = (ids >= 0) & (ids < vocab_size)
        first = torch.full((rows, vocab_size + 1), length, dtype=torch.long, device=context_ids.device)
        return first.scatter_reduce(1, torch.where(found, ids, vocab_size), torch.where(found, ends, length),
                                    reduce="amin")[:, :vocab_size]

    forms = []
    if aliases is not None:
        own = torch.where(counted, context_ids, 0)
        forms.append(first_at(torch.where(counted, aliases[:vocab_size].to(own.device)[own], -1), positions))
    if spellings is not None:
        hits = {n: (hit, words) for n, hit, words in spelled_word_hits(context_ids, counted, spellings, vocab_size)}
        for n in range(2, spellings.shape[1] + 1):
            hit, words = hits.get(n, (None, None))
            forms.append(first_at(torch.where(hit, words, -1), positions[:, n - 1 :]) if hit is not None
                         else torch.full((rows, vocab_size), length, dtype=torch.long, device=context_ids.device))
    return _leave_ignored(config, torch.stack(forms, dim=1), length)


def reversed_spellings(spellings: torch.LongTensor) -> torch.LongTensor:
    """A `word_start_spellings` table with each spelling's pieces in reverse order (a new tensor)."""
    result = spellings.clone()
    pieces = (spellings >= 0).sum(dim=1)
    for n in range(2, spellings.shape[1] + 1):
        rows = pieces == n
        result[rows, :n] = spellings[rows, :n].flip(1)
    return result


def whole_context(
    input_ids: torch.LongTensor, context_ids: torch.LongTensor | None, past_length: int
) -> torch.LongTensor:
    """The whole sequences so far, which a copy mode reads: `context_ids` checked to end with `input_ids` after
    `past_length` cached tokens, or `input_ids` when nothing is cached."""
    if context_ids is None:
        if past_length:
            raise ValueError(
                "A reweighter with a copy_mode run on a KV cache needs `context_ids`: the whole sequences so far."
            )
        return input_ids
    if context_ids.shape != (input_ids.shape[0], past_length + input_ids.shape[1]) or not torch.equal(
        context_ids[:, past_length:].to(input_ids.device), input_ids
    ):
        raise ValueError(
            f"`context_ids` must be the whole sequences so far ({past_length} cached + {input_ids.shape[1]} new tokens "
            f"per row, ending with `input_ids`), got shape {tuple(context_ids.shape)}."
        )
    return context_ids.to(input_ids.device)


def uncopied_ids(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    vocab_size: int,
    min_fraction: float = 0.1,
    max_copy_rate: float = 0.05,
    copy_sets: Callable[..., torch.LongTensor] | None = None,
    device: torch.device | str | None = None,
) -> list[int]:
    """The ids that training prompts hold but their completions do not repeat (`PluginModel.ignore_uncopied_ids`).

    A copy mode takes the prompt's ids out of the reweighter's own ranking. The template and a data format's keys
    (`Data:`, `name[`, the newline that ends no output) are in the prompts but not content to copy: the
    reweighter should keep its say over them. An id is chosen when it is in at least `min_fraction` of the prompts'
    copy sets and, of those pairs, at most `max_copy_rate` have it in their completion. Values that are copied are
    not chosen however frequent; ids too rare to judge, unseen names among them, are not either.
    `max_copy_rate=1` chooses every id in `min_fraction` of the prompts.

    Args:
        pairs (`Sequence[tuple[Sequence[int], Sequence[int]]]`): (prompt ids, completion ids) of the training pairs.
        vocab_size (`int`): the reweighter's vocabulary size.
        min_fraction (`float`, *optional*, defaults to 0.1): in (0, 1]. Low values also judge the pieces of
            names that many training prompts share, which an unseen name may need.
        max_copy_rate (`float`, *optional*, defaults to 0.05): in [0, 1].
        copy_sets (`Callable`, *optional*): `copy_sets(ids, vocab_size, mask, prompt_lengths)`, the first occurrences
            of a batch of right-padded prompts' copy sets (`copy_set_first_occurrences` with a reweighter's config
            and tables), to judge the word-start forms they bring too. By default only the ids written in the
            prompts are judged: a word-start form stays however the training names were written (`ĠT` of `T`,
            `aste` is no less needed for an unseen name because `ĠTaste` is one token).
        device (`torch.device` or `str`, *optional*): where the copy sets are computed.

    Returns:
        `list[int]`: the ids chosen, in increasing order.
    """
    if not 0 < min_fraction <= 1 or not 0 <= max_copy_rate <= 1:
        raise ValueError(f"`min_fraction` must be in (0, 1] and `max_copy_rate` in [0, 1], got {min_fraction!r} "
                         f"and {max_copy_rate!r}.")
    if not pairs:
        raise ValueError("No training pairs to count the copy sets of.")
    present_in = torch.zeros(vocab_size, dtype=torch.long)
    copied_in = torch.zeros(vocab_size, dtype=torch.long)
    for start in range(0, len(pairs), 64):
        prompts = [list(prompt) for prompt, _ in pairs[start : start + 64]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=device)
        first = (copy_sets(ids, vocab_size, mask, mask.sum(dim=1)) if copy_sets is not None
                 else first_occurrences(ids, vocab_size, mask))
        present = (first < width).cpu()
        completed = torch.zeros_like(present)
        for row, (_, completion) in enumerate(pairs[start : start + 64]):
            completed[row, [i for i in completion if 0 <= i < vocab_size]] = True
        present_in += present.sum(dim=0)
        copied_in += (present & completed).sum(dim=0)
    chosen = (present_in >= min_fraction * len(pairs)) & (copied_in <= max_copy_rate * present_in) & (present_in > 0)
    return chosen.nonzero().squeeze(1).tolist()


def apply_copy_mode(mode: str, logits: torch.Tensor, gate: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The reweighter's logits after its copy mode (see the module's docstring); a new tensor.

    Args:
        mode (`str`): one of `COPY_MODES`.
        logits (`torch.Tensor` of shape `(..., vocab_size)`): the reweighter's own logits.
        gate (`torch.Tensor` of shape `(..., 1)`): the copy head's output at the same positions.
        present (`torch.BoolTensor` of shape `(..., vocab_size)`): which ids are in the context at each position.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.copying import apply_copy_mode
    >>> logits, gate = torch.tensor([3.0, -2.0, 0.5]), torch.tensor([1.0])
    >>> present = torch.tensor([False, True, True])
    >>> apply_copy_mode("gate", logits, gate, present), apply_copy_mode("shared", logits, gate, present)
    (tensor([ 3.0000, -1.0000,  1.5000]), tensor([3., 1., 1.]))
    >>> apply_copy_mode("floor", logits, gate, present)
    tensor([3., 1., 1.])

    ```
    """
    gate = gate.to(logits.dtype)
    if mode == "gate":
        return logits + gate * present
    if mode == "shared":
        return torch.where(present, gate, logits)
    if mode == "floor":
        return torch.where(present, torch.maximum(logits, gate), logits)
    raise ValueError(f"Unknown copy mode {mode!r}; expected one of {', '.join(COPY_MODES)}.")


def preceding_embeddings(embedded: torch.Tensor, context_mask: torch.Tensor | None, width: int) -> torch.Tensor:
    """For each column, the embeddings of the `width` columns before it side by side, nearest first; padding and
    columns before a row's start are zeros, so a left-padded row gives what the same row unpadded gives.

    Args:
        embedded (`torch.Tensor` of shape `(batch_size, length, dim)`): the context's input embeddings.
        context_mask (`torch.Tensor` of shape `(batch_size, length)`, *optional*): 1 for real tokens, 0 for padding.
        width (`int`): how many columns before each one.

    Returns:
        `torch.Tensor` of shape `(batch_size, length, width * dim)`.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.copying import preceding_embeddings
    >>> embedded = torch.tensor([[[1.0], [2.0], [3.0]]])
    >>> preceding_embeddings(embedded, torch.tensor([[0, 1, 1]]), 2)[0]
    tensor([[0., 0.],
            [0., 0.],
            [2., 0.]])

    ```
    """
    if context_mask is not None:
        embedded = embedded * context_mask.to(device=embedded.device, dtype=embedded.dtype)[..., None]
    length = embedded.shape[1]
    padded = torch.nn.functional.pad(embedded, (0, 0, width, 0))
    return torch.cat([padded[:, width - offset : width - offset + length] for offset in range(1, width + 1)], dim=-1)


def pointer_scores(query: torch.Tensor, keys: torch.Tensor, columns: torch.LongTensor) -> torch.Tensor:
    """Each id's pointer score `q · k_j` at its column `j`, 0 for ids absent; a new tensor.

    Args:
        query (`torch.Tensor` of shape `(batch_size, steps, key_size)`): one query per scored position.
        keys (`torch.Tensor` of shape `(batch_size, length, key_size)`): one key per context column.
        columns (`torch.LongTensor` of shape `(batch_size, vocab_size)`): each id's column, as
            `copy_set_first_occurrences(..., last=True)` gives them; `length` or more where an id is absent.

    Returns:
        `torch.Tensor` of shape `(batch_size, steps, vocab_size)`.
    """
    scores = torch.nn.functional.pad(query @ keys.transpose(1, 2), (0, 1))  # one more column, where absent ids score 0
    index = columns.clamp(max=keys.shape[1]).to(scores.device)[:, None, :].expand(-1, scores.shape[1], -1)
    return scores.gather(2, index)


def pointer_scores_every(
    query: torch.Tensor, keys: torch.Tensor, brought: torch.LongTensor, vocab_size: int
) -> torch.Tensor:
    """Each id's pointer score: the largest `q · k_j` over the columns `j` that bring it, 0 for ids absent; a new
    tensor.

    Args:
        query, keys: as `pointer_scores`.
        brought (`torch.LongTensor` of shape `(batch_size, length, slots)`): from `copy_set_columns`.
        vocab_size (`int`): width of the result.

    Returns:
        `torch.Tensor` of shape `(batch_size, steps, vocab_size)`.

    Examples:

    ```python
    >>> import torch
    >>> from hf_plugin.copying import pointer_scores_every
    >>> query, keys = torch.tensor([[[1.0]]]), torch.tensor([[[2.0], [-1.0], [5.0]]])
    >>> pointer_scores_every(query, keys, torch.tensor([[[1], [2], [1]]]), 4)  # id 1 at columns 0 and 2, id 2 at 1
    tensor([[[ 0.,  5., -1.,  0.]]])

    ```
    """
    scores = query @ keys.transpose(1, 2)
    rows, steps, length = scores.shape
    slots = brought.shape[-1]
    index = torch.where(brought >= 0, brought, vocab_size).to(scores.device).view(rows, 1, length * slots)
    source = scores[..., None].expand(-1, -1, -1, slots).reshape(rows, steps, length * slots)
    best = scores.new_full((rows, steps, vocab_size + 1), float("-inf")).scatter_reduce(
        2, index.expand(-1, steps, -1), source, reduce="amax")[..., :vocab_size]
    return best.masked_fill(best.isneginf(), 0.0)
