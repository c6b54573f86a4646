"""Generation for the server: `generate()` calls in a bounded pool of worker threads.

Each call gets its own `PluginLogitsProcessor` (a processor holds its reweighter's KV cache, so it is never shared
between calls). A sampled prompt runs alone in its call; greedy prompts waiting for the same model may share one
left-padded call, each row ending on its own, and every prompt gets the answer it would get in-process. Tokens reach
each request's handler as they are drawn, through a streamer; a row's text is cut at its first stop sequence and
held back while it may still become one. An echoed prompt is scored in one teacher-forced forward of the base (and
the reweighter), before any generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from ..logits_process import PluginLogitsProcessor
from ..modeling_plugin import PluginModel, score_with_reweighters
from .protocol import APIError, ServerLimits


# Prompt tokens decoded ahead of the completion, so that its first token's text (a leading space, say) comes out
# as it reads after the prompt.
_CONTEXT_TOKENS = 4


@dataclass
class ServedModel:
    """One model id the server answers to: the base alone (`reweighter=None`) or the base with one reweighter.

    Args:
        id (`str`): the model id clients send.
        reweighter (`PluginModel`, *optional*): the reweighter, already checked against the base.
        max_positions (`int`, *optional*): longest prompt + completion the base and the reweighter can take.
    """

    id: str
    reweighter: PluginModel | None = None
    max_positions: int | None = None


@dataclass
class GenerationJob:
    """A validated prompt of a request, in token ids: what one `generate()` call needs.

    `echo_text` (the prompt as the client sent it, or the ids decoded) is returned before the completion when the
    client asked for `echo`; `max_new_tokens` may then be 0. `logit_bias` is added to the scores the token is drawn
    from, after the log-probs are read. `token_ids` names tokens `token_id:N` rather than by their text.
    """

    model: ServedModel
    prompt_ids: list[int]
    max_new_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no log-probs
    alpha: float | None = None
    echo_text: str | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    token_ids: bool = False
    index: int = 0  # the index of the job's first choice in the response (prompt number times n)


@dataclass
class TokenLogprob:
    """A token and its log-probability with the top alternatives, under the distribution it was drawn from (a
    generated token) or the model's distribution at its position (an echoed prompt token; `None` for the first)."""

    token_id: int
    token: str
    logprob: float | None
    top: list[tuple[str, float]] | None


@dataclass
class ChoiceDelta:
    """What one choice gained in one step: new text, the log-probs of its tokens, and its finish reason once over."""

    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    completion_tokens: int
    cancelled: bool


class _ChoiceText:
    """One row's completion as text: decoded incrementally, cut at the first stop sequence, EOS ends it."""

    def __init__(self, tokenizer, context_ids: list[int], stops: list[str], eos_ids: set[int]):
        self.tokenizer, self.stops, self.eos_ids = tokenizer, stops, eos_ids
        self.ids = list(context_ids)
        self.prefix, self.read = 0, len(self.ids)
        self.text = ""
        self.sent = 0
        self.pending: list[list] = []  # [TokenLogprob, end of its text in self.text or None while undecodable]
        self.finish_reason: str | None = None
        self.count = 0

    def add(self, token_id: int, logprob: TokenLogprob | None) -> tuple[str, list[TokenLogprob]] | None:
        if self.finish_reason is not None:
            return None  # generate() pads rows that are over
        self.count += 1
        if token_id in self.eos_ids:
            return self.finish("stop")
        self.ids.append(token_id)
        if logprob is not None:
            self.pending.append([logprob, None])
        self._decode(final=False)
        start = max(0, self.sent - max(map(len, self.stops), default=0))
        cuts = [at for at in (self.text.find(stop, start) for stop in self.stops) if at >= 0]
        if cuts:
            self.finish_reason = "stop"
            self.text = self.text[: min(cuts)]
            return self._flush(len(self.text))
        held = max((k for stop in self.stops for k in range(1, len(stop)) if self.text.endswith(stop[:k])), default=0)
        return self._flush(max(self.sent, len(self.text) - held))

    def finish(self, reason: str) -> tuple[str, list[TokenLogprob]] | None:
        if self.finish_reason is not None:
            return None
        self.finish_reason = reason
        self._decode(final=True)
        return self._flush(len(self.text))

    def _decode(self, final: bool) -> None:
        # Decode a window that starts a few tokens back: tokenizers that drop a leading space or merge bytes
        # across tokens then give the new text exactly; an unfinished character waits for its next bytes.
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        if final or self.read == len(self.ids):
            for entry in self.pending:
                entry[1] = len(self.text) if entry[1] is None else entry[1]

    def _flush(self, upto: int) -> tuple[str, list[TokenLogprob]]:
        delta = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        ready = [entry for entry in self.pending if entry[1] is not None and entry[1] <= upto]
        self.pending = [] if self.finish_reason else [entry for entry in self.pending if entry not in ready]
        return delta, [entry[0] for entry in ready]


class _Recorder(LogitsProcessor):
    """Keeps the log-softmax of the final scores of each step: the distribution the next token is drawn from."""

    def __init__(self):
        self.steps: deque[torch.Tensor] = deque()

    def __call__(self, input_ids, scores):
        self.steps.append(torch.log_softmax(scores.float(), dim=-1))
        return scores


class _Cancel(StoppingCriteria):
    """Ends each row once its request is cancelled (its client left) or its choice is over; generate() stops when
    every row has ended.

    Stop sequences end a choice here, from its decoded text, rather than through generate()'s `stop_strings`:
    `StopStringCriteria` cannot index the vocabulary of tokenizers whose decoding is not plain concatenation
    (word-level ones), and the text has to be cut at the stop sequence anyway.
    """

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        ended = [row.ended() for row in self.rows]
        return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)


class _Row:
    """One row of a `generate()` call: one choice of one request (or, greedy with `n` > 1, its `n` equal choices)."""

    def __init__(self, tokenizer, job: GenerationJob, index: int, copies: int, emit, cancelled: threading.Event,
                 eos_ids: set[int]):
        self.text = _ChoiceText(tokenizer, job.prompt_ids[-_CONTEXT_TOKENS:], job.stops, eos_ids)
        self.job, self.index, self.copies, self.emit, self.cancelled = job, index, copies, emit, cancelled

    def ended(self) -> bool:
        return self.text.finish_reason is not None or self.cancelled.is_set()

    def add(self, token: int, logprob: TokenLogprob | None) -> list[ChoiceDelta]:
        if self.ended():
            return []  # generate() pads rows that are over
        deltas = self._deltas(self.text.add(token, logprob))
        if self.text.count >= self.job.max_new_tokens:  # this request's own limit, in a batch with longer ones
            deltas += self._deltas(self.text.finish("length"))
        return deltas

    def finish(self) -> list[ChoiceDelta]:
        return self._deltas(self.text.finish("length"))

    def _deltas(self, piece) -> list[ChoiceDelta]:
        reason = self.text.finish_reason
        if piece is None or (not piece[0] and not piece[1] and reason is None):
            return []
        return [ChoiceDelta(self.index + j, piece[0], piece[1], reason) for j in range(self.copies)]


class _Choices(BaseStreamer):
    """Receives each step's tokens from `generate()` and hands each request its rows' `ChoiceDelta`s."""

    def __init__(self, tokenizer, rows: list[_Row], recorder: _Recorder | None):
        self.tokenizer, self.rows, self.recorder = tokenizer, rows, recorder
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        tokens = value.view(-1).tolist()
        steps = self.recorder.steps.popleft() if self.recorder is not None else None
        self._emit([row.add(token, self._logprob(row, steps, r, token)) for r, (row, token) in
                    enumerate(zip(self.rows, tokens))])

    def end(self) -> None:
        self._emit([row.finish() for row in self.rows])

    def _logprob(self, row: _Row, steps, r: int, token: int) -> TokenLogprob | None:
        if steps is None or row.job.top_logprobs is None or row.ended():
            return None
        return token_logprob(self.tokenizer, steps[r], token, row.job.top_logprobs, row.job.token_ids)

    def _emit(self, deltas_by_row: list[list[ChoiceDelta]]) -> None:
        by_request = {}
        for row, deltas in zip(self.rows, deltas_by_row):
            if deltas:
                by_request.setdefault(id(row.emit), (row.emit, []))[1].extend(deltas)
        for emit, deltas in by_request.values():
            emit(deltas)

    def completion_tokens(self, job: GenerationJob) -> int:
        return sum(row.text.count * row.copies for row in self.rows if row.job is job)


def token_logprob(tokenizer, logprobs: torch.Tensor, token: int, top: int, token_ids: bool = False) -> TokenLogprob:
    """`token` and its log-prob in `logprobs` (one position's log-softmax), with the `top` best alternatives."""
    render = (lambda i: f"token_id:{i}") if token_ids else (lambda i: tokenizer.decode([i]))
    best = []
    if top:
        values, ids = logprobs.topk(top)
        best = [(render(i), v) for i, v in zip(ids.tolist(), values.tolist()) if v > float("-inf")]
    return TokenLogprob(token, render(token), float(logprobs[token]), best)


@dataclass
class _Submitted:
    """A job waiting for a worker, with where its output goes."""

    job: GenerationJob
    emit: Callable[[list[ChoiceDelta]], None]
    cancelled: threading.Event
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one `generate()` call; `None`: this one runs alone."""
        job = self.job
        if job.temperature > 0 or job.echo_text is not None:  # a seeded sample is drawn alone; an echo scores first
            return None
        return (job.model.id, job.alpha, tuple(sorted(job.logit_bias.items())), job.top_logprobs is not None)

    def resolve(self, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        def settle():
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the server's loop is closed: nobody waits for the answer
            pass


class GenerationEngine:
    """Runs `GenerationJob`s on a base model in at most `limits.max_concurrent` worker threads.

    Greedy jobs may run side by side; sampled jobs take turns (they draw from torch's global random generator, so
    that a `seed` gives the same sample whatever else is running). With `limits.max_batch` above 1, greedy jobs
    waiting for the same model (with the same `alpha`, `logit_bias` and log-prob setting) run together in one
    left-padded `generate()` call, each row ending at its own `max_tokens`, stop sequence or EOS.

    Args:
        base (`PreTrainedModel`): the base model, in eval mode.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        limits (`ServerLimits`): the concurrency, batching and queue bounds.
    """

    def __init__(self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, limits: ServerLimits):
        self.base, self.tokenizer, self.limits = base, tokenizer, limits
        # generate() stops at any of the base's EOS ids (a chat model may have several); each ends a choice.
        eos = base.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids.discard(None)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self._executor = ThreadPoolExecutor(max_workers=limits.max_concurrent, thread_name_prefix="hf-plugin-generate")
        self._lock = threading.Lock()
        self._sampling = threading.Lock()
        self._waiting: deque[_Submitted] = deque()
        self.admitted = 0
        self.running = 0
        self.cancelled = 0
        self.largest_batch = 0

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: GenerationJob, emit: Callable[[list[ChoiceDelta]], None],
               cancelled: threading.Event) -> asyncio.Future:
        """Queues a job; its future gives a `GenerationResult`. Refused with a 503 when the queue is full."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.admitted >= self.limits.max_queued:
                raise APIError(503, f"The server is busy ({self.admitted} requests admitted); try again later.",
                               code="server_busy", type="server_error")
            self.admitted += 1
            submitted = _Submitted(job, emit, cancelled, loop.create_future(), loop)
            self._waiting.append(submitted)
        submitted.future.add_done_callback(lambda _: self._leave())
        self._executor.submit(self._work)  # one turn of a worker per job: it runs this job, or finds it taken
        return submitted.future

    def _leave(self) -> None:
        with self._lock:
            self.admitted -= 1

    def _take(self) -> list[_Submitted]:
        """The oldest waiting job, and the waiting jobs that can share its `generate()` call."""
        with self._lock:
            if not self._waiting:
                return []
            group = [self._waiting.popleft()]
            key = group[0].batch_key()
            if key is not None and self.limits.max_batch > 1:
                for other in list(self._waiting):
                    if len(group) == self.limits.max_batch:
                        break
                    if other.batch_key() == key:
                        self._waiting.remove(other)
                        group.append(other)
            return group

    def _work(self) -> None:
        group = [entry for entry in self._take() if not self._skip_cancelled(entry)]
        if not group:
            return
        with self._lock:
            self.running += len(group)
            self.largest_batch = max(self.largest_batch, len(group))
        try:
            choices = self._generate(group)
        except BaseException as error:  # every request of the call gets the failure; the worker lives on
            for entry in group:
                entry.resolve(error=error)
            return
        finally:
            with self._lock:
                self.running -= len(group)
        for entry in group:
            if entry.cancelled.is_set():
                with self._lock:
                    self.cancelled += 1
            entry.resolve(GenerationResult(choices.completion_tokens(entry.job), entry.cancelled.is_set()))

    @staticmethod
    def _skip_cancelled(entry: _Submitted) -> bool:
        if entry.cancelled.is_set():  # the client left while the job waited
            entry.resolve(GenerationResult(0, True))
            return True
        return False

    def prompt_logprobs(self, job: GenerationJob) -> list[TokenLogprob]:
        """The log-prob of each prompt token under the served model's distribution at its position: the base's, or
        the combination with the reweighter (whose copy source, if any, is the whole prompt), without temperature
        or top_p; the first token has none."""
        reweighter, ids = job.model.reweighter, torch.tensor([job.prompt_ids], device=self.base.device)
        with torch.no_grad():
            logits = self.base(input_ids=ids).logits
            if reweighter is None:
                logprobs = torch.log_softmax(logits.float(), dim=-1)
            else:
                alpha = reweighter.config.alpha if job.alpha is None else job.alpha
                logprobs = score_with_reweighters([reweighter], ids, logits, alphas=[alpha],
                                                  prompt_lengths=torch.tensor([ids.shape[1]])).logits
        first = job.prompt_ids[0]
        render = f"token_id:{first}" if job.token_ids else self.tokenizer.decode([first])
        tokens = [TokenLogprob(first, render, None, None)]
        for position, token in enumerate(job.prompt_ids[1:]):
            tokens.append(token_logprob(self.tokenizer, logprobs[0, position], token, job.top_logprobs or 0,
                                        job.token_ids))
        return tokens

    def _echo(self, job: GenerationJob, emit) -> None:
        logprobs = self.prompt_logprobs(job) if job.top_logprobs is not None else []
        finish = "length" if job.max_new_tokens == 0 else None
        emit([ChoiceDelta(job.index + i, job.echo_text, logprobs, finish) for i in range(job.n)])

    def _generate(self, group: list[_Submitted]) -> _Choices:
        """One `generate()` call: a sampled job's `n` rows, or one row for each greedy job of the group."""
        job = group[0].job
        if job.echo_text is not None:
            self._echo(job, group[0].emit)
        sample = job.temperature > 0
        rows = []
        for entry in group:
            count = entry.job.n if sample else 1
            copies = entry.job.n // count
            rows += [_Row(self.tokenizer, entry.job, entry.job.index + r * copies, copies, entry.emit, entry.cancelled,
                          self.eos_ids) for r in range(count)]
        width = max(len(entry.job.prompt_ids) for entry in group)
        prompts = [[self.pad_token_id] * (width - len(e.job.prompt_ids)) + e.job.prompt_ids for e in group]
        input_ids = torch.tensor(prompts, device=self.base.device)
        attention_mask = torch.tensor([[0] * (width - len(e.job.prompt_ids)) + [1] * len(e.job.prompt_ids)
                                       for e in group], device=self.base.device)
        processors: list[LogitsProcessor] = []
        if job.model.reweighter is not None:
            processors.append(PluginLogitsProcessor(job.model.reweighter, alpha=job.alpha, attention_mask=attention_mask,
                                                    pad_token_id=self.pad_token_id))
        if sample and job.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(job.temperature))
        if sample and job.top_p < 1.0:
            processors.append(TopPLogitsWarper(job.top_p))
        # The recorder comes last, and generate() is told to add no warper of its own after it: it sees exactly the
        # distribution each token is drawn from.
        recorder = _Recorder() if job.top_logprobs is not None else None
        processors += [recorder] if recorder is not None else []
        if job.logit_bias:  # after the recorder: log-probs are the model's, as vLLM reports them
            processors.append(SequenceBiasLogitsProcessor([[[token], bias] for token, bias in job.logit_bias.items()]))
        choices = _Choices(self.tokenizer, rows, recorder)
        if job.max_new_tokens == 0:
            return choices
        with self._sampling if sample else contextlib.nullcontext(), torch.no_grad():
            if sample and job.seed is not None:
                torch.manual_seed(job.seed)
            self.base.generate(
                input_ids, attention_mask=attention_mask, max_new_tokens=max(e.job.max_new_tokens for e in group),
                do_sample=sample, num_return_sequences=len(rows) // len(group), temperature=1.0, top_p=1.0, top_k=0,
                pad_token_id=self.pad_token_id, logits_processor=processors, stopping_criteria=[_Cancel(rows)],
                streamer=choices,
            )
        return choices
