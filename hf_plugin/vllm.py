r"""Reweighters inside vLLM: `ReweighterLogitsProcessor`, a logits processor for vLLM's V1 engine.

One vLLM server holds the base model; each request may name one of the reweighters the server loaded, and a
strength; a request that names none gets exactly what plain vLLM gives:

    vllm serve BASE --logits-processors hf_plugin.vllm:ReweighterLogitsProcessor \
        --additional-config '{"hf_plugin": {"reweighters": {"e2e": "path/or/hub-id[@revision]"}}}'

    client.completions.create(model=BASE, prompt=..., extra_body={"vllm_xargs": {"reweighter": "e2e", "alpha": 0.5}})

Only vLLM's public processor interface is used (`vllm.v1.sample.logits_processor`). Every step runs one forward
of each reweighter for all the rows that use it, through the library's `CachedModelRunner` (left-padded rows, one
KV cache per reweighter): a step that appends one token to every row of the previous step extends the cache, also
when other rows have finished or moved; a request added, or preempted and recomputed, re-runs that reweighter's
rows from the start.
The combination is `combine_logits`, on the device and dtype of vLLM's logits. This module imports vLLM; nothing
else of the library imports it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .combine import align_vocab, check_alpha, combine_logits
from .compatibility import check_tokenizer, check_vocab_width
from .engine import CachedModelRunner
from .modeling_plugin import PluginModel


CONFIG_KEY = "hf_plugin"


def configured_reweighters(additional_config) -> dict[str, str]:
    """The reweighters a server is asked to load, `{name: "folder or Hub id[@revision]"}`, from vLLM's
    `--additional-config` (`{"hf_plugin": {"reweighters": {...}}}`).

    Raises:
        `ValueError`: the section is missing or not of that shape; the message shows the shape expected.
    """
    expected = '--additional-config \'{"hf_plugin": {"reweighters": {"NAME": "folder or Hub id[@revision]"}}}\''
    section = (additional_config or {}).get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    reweighters = section.get("reweighters") if isinstance(section, dict) else None
    if not isinstance(reweighters, dict) or not reweighters or not all(
            isinstance(name, str) and name and isinstance(source, str) and source
            for name, source in reweighters.items()):
        raise ValueError(f"hf_plugin.vllm.ReweighterLogitsProcessor needs its reweighters named: {expected}.")
    return dict(reweighters)


def _names_on_the_command_line(argv: list[str]) -> set[str] | None:
    """The reweighter names of `--additional-config` in this process's command line, or None when it has none.

    `validate_params` runs in vLLM's API process, which is given no config; its command line is the server's
    (the processes it spawns inherit it)."""
    for position, argument in enumerate(argv):
        if argument == "--additional-config" and position + 1 < len(argv):
            text = argv[position + 1]
        elif argument.startswith("--additional-config="):
            text = argument.partition("=")[2]
        else:
            continue
        try:
            return set(configured_reweighters(json.loads(text)))
        except ValueError:  # malformed JSON or another shape: the engine's start-up reports it
            return None
    return None


@dataclass
class _Row:
    """A request of vLLM's persistent batch that uses a reweighter; `output_ids` is vLLM's own, growing list."""

    reweighter: str
    alpha: float
    prompt_ids: list[int]
    output_ids: list[int]


class ReweighterLogitsProcessor(LogitsProcessor):
    """Applies `p ∝ p_base · r^α` to the rows of requests that name a reweighter (`vllm_xargs.reweighter`, and
    optionally `vllm_xargs.alpha`, else the reweighter's own α); other rows pass untouched.

    Start-up loads every configured reweighter (safetensors only, no remote code) and checks its vocabulary and
    tokenizer against the served model's, refusing to start on a mismatch with a message naming both sides.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        sources = configured_reweighters(vllm_config.additional_config)
        model_config = vllm_config.model_config
        tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer, revision=model_config.tokenizer_revision,
                                                  trust_remote_code=model_config.trust_remote_code)
        width = model_config.get_vocab_size()
        self.reweighters: dict[str, PluginModel] = {}
        for name, source in sources.items():
            path, _, revision = source.partition("@")
            reweighter = PluginModel.from_pretrained(path, revision=revision or None)
            try:
                check_vocab_width(reweighter.config, width)
                check_tokenizer(reweighter.config, tokenizer)
                if reweighter.reads_context:  # its prompt would be lost when vLLM recomputes a request
                    raise ValueError("reweighters with a copy mode are not supported in vLLM yet")
            except ValueError as error:
                raise ValueError(f"reweighter {name!r} ({source}) does not fit the served model "
                                 f"{model_config.model!r}: {error}") from error
            self.reweighters[name] = reweighter.to(device).eval()
        self.runners = {name: CachedModelRunner(reweighter) for name, reweighter in self.reweighters.items()}
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rows: dict[int, _Row] = {}
        # Per reweighter, the width its rows were padded to at the last step and their lengths then (keyed by the
        # identity of vLLM's output list, which follows a request through moves).
        self.last: dict[str, tuple[int, dict[int, int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """An unknown reweighter name or a bad `alpha` is refused here, before the request reaches the engine (an
        HTTP 400)."""
        extra = sampling_params.extra_args or {}
        name, alpha = extra.get("reweighter"), extra.get("alpha")
        if name is None:
            if alpha is not None:
                raise ValueError("vllm_xargs.alpha sets a reweighter's strength; name the reweighter too "
                                 "(vllm_xargs.reweighter).")
            return
        if not isinstance(name, str):
            raise ValueError(f"vllm_xargs.reweighter must be a name, got {name!r}.")
        known = _names_on_the_command_line(sys.argv)
        if known is not None and name not in known:
            raise ValueError(f"Unknown reweighter {name!r}; this server has {', '.join(sorted(known))}.")
        if alpha is not None:
            if isinstance(alpha, bool):
                raise ValueError(f"`vllm_xargs.alpha` must be a non-negative finite number, got {alpha!r}.")
            check_alpha(alpha, "vllm_xargs.alpha")

    def is_argmax_invariant(self) -> bool:
        return False  # a reweighter changes which token is likeliest

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            extra = (params.extra_args if params is not None else None) or {}
            name = extra.get("reweighter")
            if name is None:
                self.rows.pop(index, None)
                continue
            if name not in self.reweighters:  # only when validate_params could not know the names
                raise ValueError(f"Unknown reweighter {name!r}; this server has {', '.join(sorted(self.reweighters))}.")
            alpha = extra.get("alpha")
            alpha = self.reweighters[name].config.alpha if alpha is None else check_alpha(alpha, "vllm_xargs.alpha")
            self.rows[index] = _Row(name, alpha, list(prompt_ids or []), output_ids)
        for first, second, direction in batch_update.moved:
            a, b = self.rows.pop(first, None), self.rows.pop(second, None)
            if a is not None:
                self.rows[second] = a
            if direction == MoveDirectionality.SWAP and b is not None:
                self.rows[first] = b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        groups: dict[str, list[int]] = {}
        for index in sorted(self.rows):
            if index < logits.shape[0]:
                groups.setdefault(self.rows[index].reweighter, []).append(index)
        for name, indices in groups.items():
            rows = [self.rows[index] for index in indices]
            sequences = [row.prompt_ids + list(row.output_ids) for row in rows]
            lengths = {id(row.output_ids): len(sequence) for row, sequence in zip(rows, sequences)}
            width = max(lengths.values())
            last_width, last_lengths = self.last.get(name, (0, {}))
            if all(last_lengths.get(key) == length - 1 for key, length in lengths.items()):
                # Every row continues the last step's: keep their padding, so that the cache extends even when
                # other rows have finished (the runner then drops their cache rows).
                width = max(width, last_width + 1)
            self.last[name] = (width, lengths)
            ids = torch.tensor([[self.pad_token_id] * (width - len(s)) + s for s in sequences])
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
            with torch.no_grad():
                own = self.runners[name].next_token_logits(ids, lambda _: mask)
            own = align_vocab(own.to(logits.device), logits.shape[-1])
            for alpha in {row.alpha for row in rows}:
                picked = [i for i, row in enumerate(rows) if row.alpha == alpha]
                where = torch.tensor([indices[i] for i in picked], device=logits.device)
                logits[where] = combine_logits(logits[where], own[picked], alpha).to(logits.dtype)
        return logits
