"""Token identity for servers that name tokens by their text: the map from a server's strings to local ids.

A server that returns log-probs keyed by token *strings* (llama-cpp-python, OpenAI) leaves the token ids to the
client. The map goes through the local tokenizer, which must be the server's (checked by `RemoteBase.probe`): every
id is rendered as such a server renders it — its bytes decoded as UTF-8 with invalid bytes dropped, control tokens
as the server shows them — and a string that several ids render to (a lone byte of a multi-byte character renders
as "") is *ambiguous*: it is reported, never resolved by a guess. Servers that return ids (vLLM's
`return_tokens_as_token_ids`, whose keys read `token_id:N`) need no map.
"""

from __future__ import annotations

from collections import defaultdict

from transformers import PreTrainedTokenizerBase


ID_PREFIX = "token_id:"


def served_string(key):
    """A server's token string as `TokenStrings` renders ids: U+FFFD, which some servers write for a byte that is
    no character alone, dropped (as llama-cpp-python's server drops the byte itself). Other values pass unchanged."""
    return key.replace("\ufffd", "") if isinstance(key, str) else key


class TokenStrings:
    """Renders local ids as a server's strings and maps those strings back to ids.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the local copy of the server's tokenizer.
        special_as_text (`bool`, *optional*, defaults to `False`): whether the server renders special (control)
            tokens as their text (`<|im_end|>`) rather than as "" (llama.cpp's default); `RemoteBase.probe` finds
            out which.

    Examples:

    ```python
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import PreTrainedTokenizerFast
    >>> backend = Tokenizer(models.WordLevel({"[EOS]": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    >>> backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[EOS]", unk_token="[UNK]")
    >>> strings = TokenStrings(tokenizer)
    >>> strings.render(2), strings.lookup("b"), strings.lookup("token_id:1"), sorted(strings.ambiguous)
    ('b', 2, 1, [''])

    ```
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, special_as_text: bool = False):
        self.special_as_text = special_as_text
        special = set(tokenizer.all_special_ids)
        self.strings = []
        for token in range(len(tokenizer)):
            # The tokenizer writes U+FFFD for bytes that are no character alone; servers drop them (errors="ignore").
            text = tokenizer.decode([token]).replace("\ufffd", "")
            self.strings.append(text if special_as_text or token not in special else "")
        ids = defaultdict(list)
        for token, text in enumerate(self.strings):
            ids[text].append(token)
        self._ids = {text: found[0] for text, found in ids.items() if len(found) == 1}
        self.ambiguous = {text: found for text, found in ids.items() if len(found) > 1}

    def render(self, token: int) -> str:
        """The string a server shows for `token`."""
        return self.strings[token]

    def lookup(self, key: str) -> int | None:
        """The id a server's key names: `token_id:N` keys directly, strings through the tokenizer; `None` when the
        string is ambiguous or no token renders to it."""
        if key.startswith(ID_PREFIX) and key[len(ID_PREFIX):].isdigit():
            return int(key[len(ID_PREFIX):])
        return self._ids.get(key)

    def is_ambiguous(self, key: str) -> bool:
        return not key.startswith(ID_PREFIX) and key in self.ambiguous
