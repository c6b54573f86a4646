"""`RemoteCausalLM`: `generate()` against a base model behind an API, with transformers' logits processors.

At each step the base's next-token scores are its top-k log-probs, and every token outside the top-k gets
probability zero (-inf): the convention of proxy-tuning's experiment with GPT-3.5. The processors —
`PluginLogitsProcessor` unchanged among them — then see a `(batch, vocab)` score tensor as in `model.generate()`.

Fewer round trips: a request asks the server for a greedy *draft* of `chunk_size` tokens with the top-k at each
position. The draft's distribution at a position is the base's true one as long as the tokens before it are the
ones chosen, so the loop keeps reading the draft while the chosen token equals the drafted one, and asks again after
the first disagreement (whose own token already came from the draft). Greedy output is therefore the same token for
token as with one request per token (`chunk_size=1`); sampling draws every token from exactly the distribution the
per-token loop would use, p(y_t | y_<t) ∝ processors(top-k base log-probs), so the sampled sequences have the same
distribution — the draft only decides how many requests it costs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from .client import RemoteBase


class RemoteCausalLM:
    r"""
    A base model behind an API with a `generate()` like transformers' for greedy decoding and sampling.

    Args:
        remote (`RemoteBase`): the server.
        chunk_size (`int`, *optional*, defaults to 8): tokens drafted per request (1: one request per token).

    Examples:

    ```python
    >>> from hf_plugin import PluginLogitsProcessor
    >>> from hf_plugin.remote import RemoteBase, RemoteCausalLM
    >>> base = RemoteCausalLM(RemoteBase("http://127.0.0.1:8000/v1", "smollm2", tokenizer, top_k=20))  # doctest: +SKIP
    >>> inputs = tokenizer(["Data: name[Aromi]\nSentence:"], return_tensors="pt", padding=True)  # doctest: +SKIP
    >>> out = base.generate(**inputs, logits_processor=[PluginLogitsProcessor(plugin, tokenizer=tokenizer)],
    ...                     max_new_tokens=32)  # doctest: +SKIP

    ```
    """

    def __init__(self, remote: RemoteBase, chunk_size: int = 8):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
        self.remote = remote
        self.chunk_size = chunk_size

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        logits_processor: Sequence | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """Generates up to `max_new_tokens` tokens for each (left-padded) row, as `model.generate()` does.

        Transformers' order is kept: repetition penalty, then `logits_processor`, then temperature and top-p.
        Finished rows (EOS) are filled with `pad_token_id`. Rows needing a request are served concurrently.

        Returns:
            `torch.LongTensor` of shape `(batch_size, prompt_length + generated)`: the prompts and their continuations.
        """
        tokenizer = self.remote.tokenizer
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        capabilities = self.remote.probe()
        if eos is not None and not capabilities.token_ids and self.remote.strings.is_ambiguous(
                self.remote.strings.render(eos)):
            # Its log-prob is dropped as ambiguous, so EOS is never chosen: say so rather than run on silently.
            warnings.warn(f"{self.remote.base_url} renders EOS as {self.remote.strings.render(eos)!r}, a string other "
                          "tokens share: its log-prob cannot be identified, so generation ends only at "
                          "max_new_tokens (or by a logits processor that forces EOS).", stacklevel=2)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
        processors = LogitsProcessorList()
        if repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        processors.extend(logits_processor or [])
        if do_sample:
            if temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        drafts: list[list | None] = [None] * len(rows)
        done = [False] * len(rows)
        sequences = input_ids.clone()
        for _ in range(max_new_tokens):
            needed = [r for r in range(len(rows)) if not done[r] and not drafts[r]]
            for r, steps in zip(needed, self.remote.map(lambda r: self.remote.draft(rows[r], self.chunk_size), needed)):
                drafts[r] = steps
            scores = torch.zeros(len(rows), self.remote.vocab_size)
            for r in range(len(rows)):
                if not done[r]:
                    _, ids, values = drafts[r][0]
                    scores[r] = float("-inf")
                    scores[r, ids] = torch.tensor(values)
            scores = processors(sequences, scores)
            if do_sample:
                chosen = torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=generator)[:, 0]
            else:
                chosen = scores.argmax(dim=-1)
            column = torch.full((len(rows),), pad, dtype=sequences.dtype)
            for r in range(len(rows)):
                if done[r]:
                    continue
                token = int(chosen[r])
                drafted = drafts[r].pop(0)[0]
                if drafted != token:
                    drafts[r] = None  # the rest of the draft follows another prefix
                rows[r].append(token)
                column[r] = token
                done[r] = token == eos
            sequences = torch.cat([sequences, column[:, None]], dim=1)
            if all(done):
                break
        return sequences
