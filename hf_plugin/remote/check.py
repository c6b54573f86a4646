"""Checking a server's numbers against an in-process copy of the same model (`hf-plugin check-server`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from .client import RemoteBase


def fetch_served(remote: RemoteBase, texts: Sequence[str]) -> list[tuple[list[int], int, object]]:
    """The server's teacher-forced top-k rows of each probe text: `(ids, first position, rows)` per text. Asked before
    anything is loaded locally, so a server that fails does so in seconds."""
    capabilities = remote.probe()
    served = []
    for text in texts:
        ids = remote.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 3:
            raise ValueError(f"Probe text {text!r} has fewer than 3 tokens.")
        start = 1 + capabilities.echo_shift  # OpenAI's echo has no log-probs for the first token
        served.append((ids, start, remote.prompt_logprobs(ids, start=start)))
    return served


@torch.no_grad()
def compare_with_local(remote: RemoteBase, model: PreTrainedModel, texts: Sequence[str],
                       served: list | None = None) -> dict:
    """Teacher-forced top-k log-probs from the server (as the client reads them) against the local model's.

    Positions line up when the server's rows are closest to the local distributions of the same positions rather
    than of the neighbouring ones (a server whose echo is shifted and a client that did not correct it would
    match at offset +1 or -1).

    Args:
        remote (`RemoteBase`): the server.
        model (`PreTrainedModel`): an in-process copy of the served model.
        texts (`Sequence[str]`): probe texts, each at least 3 tokens.
        served (`list`, *optional*): `fetch_served(remote, texts)`, when already asked.

    Returns:
        `dict`: `positions`, `echo_shift` (the server's own shift the client corrects), `aligned_offset` (0 when
        positions line up), `max_abs_diff` and `median_abs_diff` (log-probs of tokens in both top-k lists, at
        offset 0), `top1_agreement`.
    """
    served = fetch_served(remote, texts) if served is None else served
    offsets = {offset: [] for offset in (-1, 0, 1)}
    top1 = []
    for ids, start, rows in served:
        logits = model(torch.tensor([ids], device=model.device)).logits[0, start - 1 : -1]
        local = torch.log_softmax(logits.float(), -1).cpu()
        for row in range(len(ids) - start):
            served_ids = rows.topk_ids[row]
            served = rows.topk_logprobs[row]
            keep = served_ids >= 0
            for offset, diffs in offsets.items():
                if 0 <= row + offset < len(local):
                    diffs.append((served[keep] - local[row + offset, served_ids[keep]]).abs())
            top1.append(int(served_ids[0]) == int(local[row].argmax()))
    medians = {offset: float(torch.cat(diffs).median()) for offset, diffs in offsets.items() if diffs}
    at_zero = torch.cat(offsets[0])
    return {
        "positions": len(top1), "echo_shift": remote.probe().echo_shift,
        "aligned_offset": min(medians, key=medians.get), "median_abs_diff_by_offset": medians,
        "max_abs_diff": float(at_zero.max()), "median_abs_diff": float(at_zero.median()),
        "top1_agreement": sum(top1) / len(top1),
    }
