"""`RemoteBase`: a base model behind an OpenAI-compatible HTTP API, read only through its top-k log-probs.

Two kinds of request, both on `/v1/completions`:

- teacher forcing (`prompt_logprobs`): `echo=true, logprobs=k` returns the top-k log-probs at every position of a
  whole example in one request (vLLM, llama-cpp-python; OpenAI's hosted models and llama.cpp's `llama-server`
  cannot);
- drafting (`draft`): a greedy continuation of `n` tokens with the top-k log-probs at each generated position, the
  one thing every server with log-probs offers.

`probe()` finds out, before any real work, what the server does: whether it echoes prompt log-probs, whether the
echoed list at position i is the distribution *of* token i (OpenAI's semantics) or the one *after* it (measured on
llama-cpp-python 0.3.36 for models without a BOS token), whether it names tokens by id or by string, whether it
accepts prompts as token ids, and that its tokenizer is the local one. Every answer is checked and mapped to local
ids; nothing ambiguous is guessed (see `TokenStrings`).
"""

from __future__ import annotations

import math
import os
import time
from urllib.parse import urlsplit
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from threading import Lock

import torch
from transformers import PreTrainedTokenizerBase

from .tokens import ID_PREFIX, TokenStrings, served_string


API_KEY_ENV = "HF_PLUGIN_REMOTE_API_KEY"
# Extra entries asked of servers that key by string, so that dropping an ambiguous one still leaves k.
STRING_MARGIN = 4
# A served log-prob above 0 by more than float rounding is no log-prob: the server is broken or not what it says.
POSITIVE_TOLERANCE = 1e-3
# Completions `probe` sends: the echo, a generated token (to find the echo's shift), the echo of ids.
PROBE_REQUESTS = 3
# A text tiny models continue with confidence: counting shows which echoed list predicts which token.
PROBE_TEXT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20"


class RemoteBaseError(RuntimeError):
    """The server cannot be used as asked: unreachable, refused, or lacking a capability; the message says which."""


@dataclass
class ServerCapabilities:
    """What `RemoteBase.probe` found.

    Attributes:
        prompt_logprobs (`bool`): top-k log-probs at every prompt position in one request (`echo` with `logprobs`).
        echo_shift (`int`): 0 when the echoed list at position i is the distribution of token i; 1 when it is the
            distribution of token i + 1 (llama-cpp-python without a BOS token).
        token_ids (`bool`): log-probs are keyed `token_id:N` rather than by token string.
        prompt_ids (`bool`): a prompt may be sent as token ids (else it is sent as text).
        special_as_text (`bool`): special tokens are shown as their text rather than as "".
        models (`list[str]`): the model names the server lists.
    """

    prompt_logprobs: bool
    echo_shift: int
    token_ids: bool
    prompt_ids: bool
    special_as_text: bool
    models: list[str] = field(default_factory=list)


@dataclass
class RequestStats:
    """Running totals of a `RemoteBase`: requests sent, prompt tokens sent, seconds spent waiting."""

    requests: int = 0
    tokens_sent: int = 0
    seconds: float = 0.0
    retokenized: int = 0
    dropped_ambiguous: int = 0
    bounded_labels: int = 0


class RemoteBase:
    r"""
    A base model behind an OpenAI-compatible `/v1/completions` endpoint, seen through its top-k log-probs.

    The local `tokenizer` must be the server's (checked by `probe`, which refuses a mismatch naming both): it maps
    the server's token strings to ids and turns ids into the text a text-only server is sent. Retries with
    exponential back-off on connection errors, 408, 409, 429 and 5xx answers are the `openai` client's
    (`max_retries`); every other failure raises a `RemoteBaseError` saying what went wrong.

    Args:
        base_url (`str`): the API root, e.g. `http://127.0.0.1:8000/v1`.
        model (`str`): the model name the server serves (checked against its `/v1/models`).
        tokenizer (`PreTrainedTokenizerBase`): a local copy of the served model's tokenizer.
        top_k (`int`, *optional*, defaults to 20): log-probs asked for per position.
        api_key (`str`, *optional*): defaults to `$HF_PLUGIN_REMOTE_API_KEY`, then `$OPENAI_API_KEY`, else none.
        concurrency (`int`, *optional*, defaults to 4): requests in flight at once.
        timeout (`float`, *optional*, defaults to 60.0): seconds before one request is abandoned (then retried).
        max_retries (`int`, *optional*, defaults to 3): retries of a failed request, with back-off.
        max_requests (`int`, *optional*): refuse to send more requests than this (a guard against runaway cost).
        unknown_labels (`str`, *optional*, defaults to `"error"`): what teacher forcing does with a true token whose
            log-prob the server's answer does not identify (see `prompt_logprobs`): `"error"` or `"bound"`.
        probe_text (`str`, *optional*): the text `probe` sends (a dozen or more tokens of the model's vocabulary,
            not repeating); defaults to `PROBE_TEXT`, counting from 1 to 20.
        client (`openai.OpenAI`, *optional*): a ready client (tests use one on an in-process transport).

    Attributes:
        base_url (`str`): the URL as messages show it: without user, password, query or fragment, which may hold
            credentials.

    Examples:

    ```python
    >>> from hf_plugin.remote import RemoteBase
    >>> from hf_plugin.loading import load_tokenizer, offline_smollm2
    >>> tokenizer = load_tokenizer(offline_smollm2())  # doctest: +SKIP
    >>> base = RemoteBase("http://127.0.0.1:8000/v1", "smollm2", tokenizer, top_k=20)  # doctest: +SKIP
    >>> base.probe().echo_shift  # doctest: +SKIP
    1

    ```
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: PreTrainedTokenizerBase,
        top_k: int = 20,
        api_key: str | None = None,
        concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 3,
        max_requests: int | None = None,
        unknown_labels: str = "error",
        probe_text: str | None = None,
        client=None,
    ):
        if not isinstance(top_k, int) or not 1 <= top_k <= len(tokenizer):
            raise ValueError(f"top_k must be between 1 and the vocabulary size {len(tokenizer)}, got {top_k!r}.")
        if concurrency < 1 or timeout <= 0 or max_retries < 0 or (max_requests is not None and max_requests < 1):
            raise ValueError("concurrency and max_requests must be at least 1, timeout positive, max_retries >= 0.")
        if unknown_labels not in ("error", "bound"):
            raise ValueError(f"unknown_labels must be 'error' or 'bound', got {unknown_labels!r}.")
        if client is None:
            try:
                from openai import OpenAI
            except ImportError as error:
                raise ImportError("A remote base needs the remote extra: pip install 'hf-plugin[remote]'.") from error
            key = api_key or os.environ.get(API_KEY_ENV) or os.environ.get("OPENAI_API_KEY") or "none"
            client = OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)
        self.client = client
        self.base_url = _displayed(base_url)
        self.model = model
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.concurrency = concurrency
        self.max_requests = max_requests
        self.unknown_labels = unknown_labels
        self.probe_text = probe_text or PROBE_TEXT
        self.vocab_size = len(tokenizer)
        self.stats = RequestStats()
        self.capabilities: ServerCapabilities | None = None
        self.strings = TokenStrings(tokenizer)
        self._lock = Lock()
        self._probing = Lock()

    # -- requests ---------------------------------------------------------------------------------------------

    def _complete(self, prompt, tokens: int, retries: bool = True, **options):
        """One `/v1/completions` request, counted, its failures turned into `RemoteBaseError`s."""
        import openai

        with self._lock:
            if self.max_requests is not None and self.stats.requests >= self.max_requests:
                raise RemoteBaseError(f"Reached max_requests={self.max_requests} (--max-requests); raise it to go on.")
            self.stats.requests += 1
            self.stats.tokens_sent += tokens
        client = self.client if retries else self.client.with_options(max_retries=0)
        start = time.perf_counter()
        try:
            answer = client.completions.create(model=self.model, prompt=prompt, **options)
            if not isinstance(answer, openai.types.Completion):  # what the client returns for a non-JSON body
                raise ValueError(f"got {type(answer).__name__} {str(answer)[:60]!r}")
            return answer
        except openai.AuthenticationError as error:
            raise RemoteBaseError(f"{self.base_url} refused the API key (HTTP 401); set ${API_KEY_ENV}.") from error
        except openai.PermissionDeniedError as error:
            raise RemoteBaseError(f"{self.base_url} denied access to {self.model!r} (HTTP 403).") from error
        except openai.NotFoundError as error:
            raise RemoteBaseError(f"{self.base_url} has no model {self.model!r} or no /completions endpoint "
                                  f"(HTTP 404: {_message(error)}).") from error
        except openai.APITimeoutError as error:
            raise RemoteBaseError(f"{self.base_url} did not answer within the timeout, after retries.") from error
        except openai.APIConnectionError as error:
            raise RemoteBaseError(f"Cannot reach {self.base_url}: {error.__cause__ or error}.") from error
        except openai.APIStatusError as error:
            raise RemoteBaseError(f"{self.base_url} answered HTTP {error.status_code}: {_message(error)}") from error
        except (openai.APIResponseValidationError, ValueError) as error:  # a 200 whose body is not the JSON expected
            raise RemoteBaseError(f"{self.base_url} answered with a body that is not an OpenAI completion ({error}); "
                                  "is it an OpenAI-compatible /v1 endpoint?") from error
        finally:
            with self._lock:
                self.stats.seconds += time.perf_counter() - start

    def check_budget(self, requests: int) -> None:
        """Raises a `RemoteBaseError` if `requests` more requests, and the probe's if not done yet, would pass
        `max_requests` (before sending any)."""
        if self.capabilities is None:
            requests += PROBE_REQUESTS
        with self._lock:
            left = None if self.max_requests is None else self.max_requests - self.stats.requests
        if left is not None and requests > left:
            raise RemoteBaseError(f"The next {requests} requests would pass max_requests={self.max_requests} "
                                  f"(--max-requests; {left} left); raise it to go on.")

    def _prompt(self, ids: Sequence[int]):
        """What to send for `ids`: the ids themselves where the server takes them, else their text."""
        if self.capabilities is not None and self.capabilities.prompt_ids:
            return list(ids)
        text = self.tokenizer.decode(ids)
        if self.tokenizer(text, add_special_tokens=False)["input_ids"] != list(ids):
            with self._lock:
                self.stats.retokenized += 1
        return text

    def map(self, function, items: Sequence) -> list:
        """`function` over `items` with up to `concurrency` requests in flight, results in order."""
        if self.concurrency == 1 or len(items) < 2:
            return [function(item) for item in items]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(function, items))

    # -- capabilities -----------------------------------------------------------------------------------------

    def probe(self) -> ServerCapabilities:
        """Finds out what the server can do and checks that its tokenizer is the local one (once; cached).

        Raises:
            `RemoteBaseError`: the server is unreachable, refuses the key, does not serve `model`, returns no
                log-probs, refuses `top_k`, or tokenizes differently from the local tokenizer (both named).
        """
        with self._probing:  # concurrent first calls (a batch of drafts) probe once
            if self.capabilities is None:
                self._probe()
            return self.capabilities

    def _probe(self) -> None:
        models = self._models()
        if models and self.model not in models:
            raise RemoteBaseError(f"{self.base_url} does not serve a model named {self.model!r}; it serves "
                                  f"{', '.join(sorted(models))}.")
        eos = self.tokenizer.eos_token or ""
        text = self.probe_text + eos
        local = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        response = self._complete(text, len(local), max_tokens=1, temperature=0.0, echo=True, logprobs=self.top_k)
        logprobs = _logprobs(response)
        if logprobs is None or not logprobs.tokens:
            raise RemoteBaseError(f"{self.base_url} returned no log-probs for {self.model!r}; a base model is only "
                                  "usable through its top-k log-probs.")
        tokens = list(logprobs.tokens)
        token_ids = all(token.startswith(ID_PREFIX) for token in tokens)
        echoed = _echoed(tokens, len(local))
        special_as_text = bool(eos) and echoed[-1] == eos
        self.strings = TokenStrings(self.tokenizer, special_as_text=special_as_text)
        seen = [self.strings.lookup(token) if token_ids else token for token in echoed]
        expected = local if token_ids else [self.strings.render(token) for token in local]
        if seen != expected:
            raise RemoteBaseError(
                f"The server's tokenizer for {self.model!r} is not the local one ({_tokenizer_name(self.tokenizer)}): "
                f"{self.probe_text[:20]!r}... tokenizes as {seen[:8]} there and {expected[:8]} here.")
        tops = list(logprobs.top_logprobs or [])[: len(local)]
        prompt_logprobs = sum(top is not None for top in tops) >= len(local) - 2
        shift = self._echo_shift(tops, local, self.tokenizer.decode(local[:-1])) if prompt_logprobs else 0
        if prompt_logprobs:
            widest = max(len(top) for top in tops if top is not None)
            if widest < self.top_k:
                raise RemoteBaseError(f"{self.base_url} returned {widest} log-probs per position, fewer than the "
                                      f"{self.top_k} asked for (top_k above the server's cap?).")
        capabilities = ServerCapabilities(prompt_logprobs, shift, token_ids, False, special_as_text, models)
        capabilities.prompt_ids = self._accepts_ids(local, token_ids)
        self.capabilities = capabilities

    def _models(self) -> list[str]:
        import openai

        try:
            return [model.id for model in self.client.with_options(max_retries=1).models.list()]
        except openai.AuthenticationError as error:
            raise RemoteBaseError(f"{self.base_url} refused the API key (HTTP 401); set ${API_KEY_ENV}.") from error
        except openai.APIConnectionError as error:
            raise RemoteBaseError(f"Cannot reach {self.base_url}: {error.__cause__ or error}.") from error
        except (openai.APIStatusError, openai.APIResponseValidationError, ValueError, AttributeError):
            return []  # some servers list no models; the first completion request will say whether the name exists

    def _echo_shift(self, tops, local: list[int], prefix: str) -> int:
        """0 if echoed list i is the distribution of token i, 1 if it is that of token i + 1: whichever of the two
        candidate lists equals the distribution the server gives for the token after `prefix` (the first
        `len(local) - 1` tokens) when generating, which every server tested reports aligned."""
        generated = self._complete(prefix, len(local) - 1, max_tokens=1, temperature=0.0, logprobs=1)
        logprobs = _logprobs(generated)
        top = (logprobs.top_logprobs or [None])[0] if logprobs is not None else None
        if not top:
            raise RemoteBaseError(f"{self.base_url} returned no log-probs for a generated token.")
        key, value = max(top.items(), key=lambda item: item[1])
        matches = []
        for shift in (0, 1):
            echoed = tops[len(local) - 1 - shift] if len(tops) >= len(local) - shift else None
            if echoed and key in echoed and abs(echoed[key] - value) < 1e-2 and max(echoed, key=echoed.get) == key:
                matches.append(shift)
        if len(matches) != 1:
            raise RemoteBaseError(f"Cannot tell which token {self.base_url}'s echoed log-probs belong to; compare it "
                                  "with a local copy of the model: hf-plugin check-server.")
        return matches[0]

    def _accepts_ids(self, local: list[int], token_ids: bool) -> bool:
        try:
            response = self._complete(local, len(local), retries=False, max_tokens=1, temperature=0.0, echo=True,
                                      logprobs=1)
        except RemoteBaseError:
            return False  # llama-cpp-python answers HTTP 500 to a list of ids
        logprobs = _logprobs(response)
        tokens = logprobs.tokens if logprobs is not None else []
        echoed = _echoed(list(tokens or []), len(local))
        if token_ids:
            return [self.strings.lookup(token) for token in echoed] == local
        return echoed == [self.strings.render(token) for token in local]  # strings shared by several ids included

    # -- log-probs --------------------------------------------------------------------------------------------

    def _parse(self, top: dict | None, k: int, where: str) -> tuple[list[int], list[float], int]:
        """A server's `{key: logprob}` as local ids, best first, at most `k`; and how many keys were ambiguous.

        Raises:
            `RemoteBaseError`: a value is not a log-prob (not a number, NaN, or above 0), or names a token outside
                the local vocabulary; `where` says which position.
        """
        if not top:
            return [], [], 0
        if not isinstance(top, dict):
            raise RemoteBaseError(f"{self.base_url} returned {type(top).__name__} instead of a top-log-probs "
                                  f"object {where}.")
        pairs, ambiguous = [], 0
        for key, value in top.items():
            value = self._logprob(value, key, where)
            token = self.strings.lookup(key)
            if token is not None and token >= self.vocab_size:
                raise RemoteBaseError(f"{self.base_url} returned token {key!r} {where}, outside the local "
                                      f"tokenizer's {self.vocab_size} tokens.")
            if token is None:
                ambiguous += self.strings.is_ambiguous(key)
                continue
            pairs.append((value, token))
        pairs.sort(reverse=True)
        return [token for _, token in pairs[:k]], [value for value, _ in pairs[:k]], ambiguous

    def prompt_logprobs(self, ids: Sequence[int], k: int | None = None, start: int = 1) -> PositionLogprobs:
        """Teacher forcing: the top-k log-probs of the distribution of each token `ids[start:]`, in one request.

        The log-prob of each true token (the label) is read by position where the server's echo is aligned (vLLM),
        else from the top-k by its string. A label found neither way — outside the top-k, or its string shared by
        several tokens (llama.cpp shows every control token, EOS included, as "") — raises, or with
        `unknown_labels="bound"` is replaced by an upper bound on it: the log-prob of the entry ranked just above
        where it could first be, and of all the mass the identified entries leave (counted in `bounded_labels`).

        Args:
            ids (`Sequence[int]`): the whole sequence (prompt and completion).
            k (`int`, *optional*): log-probs per position; defaults to `top_k`.
            start (`int`, *optional*, defaults to 1): the first position wanted (the first token has no context).

        Returns:
            `PositionLogprobs` with one row per token `ids[start:]`.
        """
        capabilities = self.probe()
        if not capabilities.prompt_logprobs:
            raise RemoteBaseError(f"{self.base_url} gives no prompt log-probs (echo with logprobs), which writing a "
                                  "cache by teacher forcing needs; vLLM and llama-cpp-python's server do.")
        k = k or self.top_k
        ids = list(ids)
        asked = k if capabilities.token_ids else k + STRING_MARGIN  # room for dropped ambiguous entries
        response = self._complete(self._prompt(ids), len(ids), max_tokens=1, temperature=0.0, echo=True,
                                  logprobs=asked)
        logprobs = _logprobs(response)
        if logprobs is None:
            raise RemoteBaseError(f"{self.base_url} returned no log-probs for a prompt of {len(ids)} tokens.")
        tokens = _echoed(list(logprobs.tokens or []), len(ids))
        seen = [self.strings.lookup(t) if capabilities.token_ids else t for t in tokens]
        expected = ids if capabilities.token_ids else [self.strings.render(t) for t in ids]
        if seen != expected:
            where = next(i for i in range(len(ids)) if i >= len(seen) or seen[i] != expected[i])
            raise RemoteBaseError(f"{self.base_url} echoed other tokens than the {len(ids)} sent (first at token "
                                  f"{where}: {expected[where]!r} sent, {seen[where:where + 1]} echoed).")
        tops = list(logprobs.top_logprobs or [])
        labels = list(logprobs.token_logprobs or [])
        rows = PositionLogprobs.empty(len(ids) - start, k)
        for row, target in enumerate(range(start, len(ids))):
            entry = target - capabilities.echo_shift
            top = (tops[entry] if 0 <= entry < len(tops) else None) or {}
            if not top and target < 1 + capabilities.echo_shift:  # the caller's: before the first echoed list
                raise RemoteBaseError(f"{self.base_url} echoed no log-probs for the distribution of token {target} "
                                      f"(start must be at least {1 + capabilities.echo_shift} on this server).")
            if not top:  # the server's: the probe's text had a list at this place, this prompt has none
                raise RemoteBaseError(
                    f"{self.base_url} echoed no log-probs for the distribution of token {target} of {len(ids)}, "
                    "though its answer to the probe had them there: its echo of this prompt is shifted from the "
                    "probe's (another backend behind the URL?); compare it with a local copy on one of your prompts: "
                    "hf-plugin check-server --text PROMPT.")
            top_ids, values, ambiguous = self._parse(top, k, f"at token {target} of {len(ids)}")
            if len(top_ids) < k:
                hint = "" if capabilities.token_ids else (
                    "; a server that names tokens by id identifies them all (vLLM or hf-plugin serve with "
                    "--return-tokens-as-token-ids)")
                raise RemoteBaseError(f"{self.base_url} gave {len(top_ids)} identifiable log-probs at token {target} "
                                      f"of {len(ids)}, fewer than k={k} ({ambiguous} ambiguous strings dropped){hint}.")
            rows.dropped_ambiguous += ambiguous
            rows.set(row, top_ids, values)
            label = ids[target]
            if capabilities.echo_shift == 0 and target < len(labels) and labels[target] is not None:
                rows.label_logprobs[row] = self._label_logprob(labels[target], label, top_ids, values, target,
                                                               capabilities.token_ids)
            elif label in top_ids or (not capabilities.token_ids and self.strings.lookup(self.strings.render(label)) == label
                                      and self.strings.render(label) in top):
                key = f"{ID_PREFIX}{label}" if capabilities.token_ids else self.strings.render(label)
                rows.label_logprobs[row] = float(top[key])
            elif self.unknown_labels == "bound":
                rows.label_logprobs[row] = self._label_bound(top, label, capabilities.token_ids, asked)
                rows.bounded_labels += 1
            else:
                text = self.strings.render(label)
                why = (f"its string {text!r} is shared by {len(self.strings.ambiguous[text])} tokens"
                       if self.strings.is_ambiguous(text) else f"it is outside the server's top-{asked}")
                raise RemoteBaseError(
                    f"Cannot identify the server's log-prob of token {label} ({self.tokenizer.convert_ids_to_tokens(label)!r}) "
                    f"at position {target}: {why}, and this server's echo gives true tokens' log-probs only through "
                    "the top-k. Use a server that returns token ids (vLLM), or accept an upper bound for such tokens "
                    "(unknown_labels='bound', `--unknown-labels bound`).")
        with self._lock:
            self.stats.dropped_ambiguous += rows.dropped_ambiguous
            self.stats.bounded_labels += rows.bounded_labels
        return rows

    def _logprob(self, value, key: str, where: str) -> float:
        """A served log-prob as a float at most 0 (float rounding above 0 clipped); raises on anything else."""
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if math.isnan(value) or value > POSITIVE_TOLERANCE:
            raise RemoteBaseError(f"{self.base_url} returned {value} as the log-prob of {key!r} {where}: not a "
                                  "log-prob (NaN or above 0); the server's numbers cannot be used.")
        return min(value, 0.0)

    def _label_logprob(self, served, label: int, top_ids: list[int], values: list[float], target: int,
                       exact: bool) -> float:
        """The echoed log-prob of a true token, checked against the top-k of the same position: the two come from
        one distribution, so a disagreement means the server's lists are not where the probe found them."""
        value = self._logprob(served, f"{ID_PREFIX}{label}", f"for true token {target}")
        listed = dict(zip(top_ids, values)).get(label)
        # Only with ids is a label missing from the top-k known to rank below it (a string may have been dropped).
        if listed is not None and abs(listed - value) > 1e-2:
            why = f"listed there at {listed:.4f}"
        elif listed is None and exact and value > values[-1] + 1e-2:
            why = f"not listed there, yet above its k-th {values[-1]:.4f}"
        else:
            return value
        raise RemoteBaseError(
            f"{self.base_url} gave true token {target} the log-prob {value:.4f}, which its own top-k at that position "
            f"contradicts ({why}): its echoed lists are not aligned as the probe found; compare it with a local "
            "copy: hf-plugin check-server.")

    def _label_bound(self, top: dict, label: int, token_ids: bool, asked: int) -> float:
        """An upper bound on the log-prob of a label the server's answer does not identify: at most the mass the
        identified entries leave, and at most the entry ranked just above the first place it could hold (the first
        entry with its string, or the end of the list when no entry has it)."""
        values = [float(value) for value in top.values()]
        known = sum(math.exp(value) for key, value in zip(top, values) if self.strings.lookup(key) is not None)
        bound = math.log(max(1.0 - known, 1e-12))
        keys = list(top)
        text = f"{ID_PREFIX}{label}" if token_ids else self.strings.render(label)
        ranked = sorted(values, reverse=True)[:asked]  # without the true token's entry llama.cpp appends
        first = min(keys.index(text) if text in keys else len(ranked), len(ranked))
        if first > 0:
            bound = min(bound, ranked[first - 1])
        return min(bound, 0.0)

    def draft(self, ids: Sequence[int], max_tokens: int, k: int | None = None) -> list[tuple[int, list[int], list[float]]]:
        """A greedy continuation of `ids` by the server, with the top-k log-probs at each generated position.

        Returns:
            `list[tuple[int, list[int], list[float]]]`: per generated token, its id and the top-k ids and log-probs
            of the distribution it was drawn from (best first). Stops early at a token the local tokenizer cannot
            identify (an ambiguous string), and before a later position with fewer than k log-probs.
        """
        capabilities = self.probe()
        k = k or self.top_k
        asked = k if capabilities.token_ids else k + STRING_MARGIN
        # A server stops at EOS without reporting its distribution: the draft never picks EOS (the reported
        # log-probs are the raw ones, EOS included), and the caller still may.
        bias = {} if self.tokenizer.eos_token_id is None else {"logit_bias": {str(self.tokenizer.eos_token_id): -100}}
        response = self._complete(self._prompt(ids), len(ids), max_tokens=max_tokens, temperature=0.0, logprobs=asked,
                                  **bias)
        logprobs = _logprobs(response)
        if logprobs is None or not logprobs.top_logprobs:
            raise RemoteBaseError(f"{self.base_url} returned no log-probs for the generated tokens.")
        tokens, tops = list(logprobs.tokens or []), list(logprobs.top_logprobs)
        if len(tokens) != len(tops) or len(tokens) > max_tokens:
            raise RemoteBaseError(f"{self.base_url} returned {len(tokens)} generated tokens with {len(tops)} top-log-"
                                  f"prob lists for max_tokens={max_tokens}: its answer does not line up.")
        steps = []
        for position, (key, top) in enumerate(zip(tokens, tops)):
            if len(top or ()) < k:  # llama.cpp may add the chosen token: more is fine, fewer means a cap
                # ... or, on a server keying by string, tokens sharing one (llama-cpp-python's "") merged into one
                # key. Past the first position the draft is only a bonus: it ends here, and the next request, starting
                # at this position, meets the same check first (as one request per token would).
                if position > 0:
                    break
                raise RemoteBaseError(f"{self.base_url} gave {len(top or ())} log-probs at generated token "
                                      f"{position}, fewer than k={k} (top_k above the server's cap?).")
            top_ids, values, ambiguous = self._parse(top, k, f"at generated token {position}")
            token = self.strings.lookup(key)
            if ambiguous:
                with self._lock:
                    self.stats.dropped_ambiguous += ambiguous
            steps.append((token, top_ids, values))
            if token is None:  # the step's distribution is still good; the drafted token is unknown
                break
        if not steps:
            raise RemoteBaseError(f"{self.base_url} generated nothing for a prompt of {len(ids)} tokens.")
        return steps


@dataclass
class PositionLogprobs:
    """Top-k log-probs at consecutive positions: `topk_ids`/`topk_logprobs` `(n, k)` (id -1 and -inf where the
    server gave fewer than k usable entries) and `label_logprobs` `(n,)` (NaN where unknown)."""

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    label_logprobs: torch.Tensor
    dropped_ambiguous: int = 0
    bounded_labels: int = 0

    @classmethod
    def empty(cls, rows: int, k: int) -> PositionLogprobs:
        return cls(torch.full((rows, k), -1, dtype=torch.long), torch.full((rows, k), -math.inf),
                   torch.full((rows,), math.nan))

    def set(self, row: int, ids: list[int], values: list[float]) -> None:
        self.topk_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.topk_logprobs[row, : len(values)] = torch.tensor(values)


@dataclass
class _ServedLogprobs:
    tokens: list
    token_logprobs: list
    top_logprobs: list


def _logprobs(response) -> _ServedLogprobs | None:
    """The `logprobs` of a response's first choice, or `None` (no choices, or no log-probs).

    Token strings are read as `TokenStrings` renders ids: a server that shows the lone bytes of a multi-byte
    character as U+FFFD (vLLM, `hf-plugin serve`) and one that drops them (llama-cpp-python) then read alike.
    """
    choices = getattr(response, "choices", None) or []
    logprobs = choices[0].logprobs if choices else None
    if logprobs is None:
        return None
    tops = []
    for top in list(logprobs.top_logprobs or []):
        if isinstance(top, dict):
            merged = {}
            for key, value in top.items():
                merged.setdefault(served_string(key), value)  # keys that now read alike: the likeliest kept
            top = merged
        tops.append(top)
    tokens = [served_string(token) for token in logprobs.tokens] if logprobs.tokens is not None else None
    return _ServedLogprobs(tokens, logprobs.token_logprobs, tops if logprobs.top_logprobs is not None else None)


def _displayed(url: str) -> str:
    """`url` without user, password, query or fragment, which may hold credentials."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else host + parts.path


def _echoed(tokens: list[str], prompt_length: int) -> list[str]:
    """The echoed prompt part of a response's tokens (the generated token follows it)."""
    return tokens[:prompt_length]


def _message(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict):
            body = body.get("message", body)
    return str(body or error)[:300]


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return f"{type(tokenizer).__name__} {tokenizer.name_or_path or ''}, {len(tokenizer)} tokens".strip()
