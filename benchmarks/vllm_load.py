"""Load test of reweighters inside vLLM against plain vLLM and `hf-plugin serve`, side by side in one run.

The offline SmolLM2-135M-Instruct (de-quantized from its GGUF into a transformers folder, float32) and one
reweighter (`--reweighter DIR`, e.g. the E2E reweighter of `benchmarks/e2e_nlg.py`; by default a fresh, untrained
default `PluginConfig` bound to SmolLM2). Three phases, one after the other, each with CLIENTS threads sending
REQUESTS streamed, greedy chat completions of at most MAX_TOKENS tokens (the 16 prompts of `serve_load.py`) with the
official `openai` client: vLLM's CPU build plain, the same vLLM server with the reweighter
(`hf_plugin.vllm:ReweighterLogitsProcessor`, requests naming it in `vllm_xargs`), and `hf-plugin serve` with the
reweighter (`--max-batch 16`). Every answer is checked against in-process `generate()` of its prompt alone.

Usage (needs the vLLM venv `.venv-vllm` that `.ci/run` builds, with hf-plugin installed in it):
    python benchmarks/vllm_load.py --reweighter /path/to/e2e-reweighter
    python benchmarks/vllm_load.py --clients 4 --requests 1 --max-tokens 8 --output /tmp/vllm_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import (add_run_arguments, free_port, offline_smollm2_or_exit, prompts, ratio,  # noqa: E402
                        reference_answers, run_facts, run_phase, serve)

from hf_plugin import PluginConfig, PluginModel, binding_kwargs  # noqa: E402
from hf_plugin.loading import load_base_model, save_dequantized  # noqa: E402


SERVED = "HuggingFaceTB/SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reweighter", help="a saved reweighter bound to SmolLM2 (default: untrained, fresh)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server (OMP_NUM_THREADS)")
    parser.add_argument("--vllm-python", default=str(Path(__file__).parents[1] / ".venv-vllm/bin/python"))
    add_run_arguments(parser, "vllm_load.json", time_limit=5400.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit
    smollm2 = offline_smollm2_or_exit()
    if not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM venv at {args.vllm_python} (see .ci/run)")

    torch.set_num_threads(args.threads)
    base, tokenizer = load_base_model(smollm2)
    if args.reweighter:
        reweighter, described = PluginModel.from_pretrained(args.reweighter).eval(), "given (--reweighter)"
    else:
        torch.manual_seed(0)
        reweighter = PluginModel(PluginConfig(vocab_size=len(tokenizer), **binding_kwargs(base, tokenizer))).eval()
        described = "untrained default PluginConfig"
    conversations = prompts()
    began = time.perf_counter()
    expected = {"plain": reference_answers(base, tokenizer, None, conversations, args.max_tokens),
                "reweighted": reference_answers(base, tokenizer, reweighter, conversations, args.max_tokens)}
    reference_s = time.perf_counter() - began
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    phases = {}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        save_dequantized(base, tokenizer, folder / "smollm2")
        reweighter.save_pretrained(folder / "rw", tokenizer=tokenizer)

        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        vllm = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder / "smollm2"),
                "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
                "--enforce-eager", "--dtype", "float32", "--logits-processors",
                "hf_plugin.vllm:ReweighterLogitsProcessor", "--additional-config",
                json.dumps({"hf_plugin": {"reweighters": {"rw": str(folder / "rw")}}})]
        vllm_environment = {**environment, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1", "PYTHONPATH": ""}
        phases.update(serve(vllm, vllm_environment, url, folder / "vllm.log", deadline, lambda: {
            "vllm": run_phase(url, SERVED, conversations, expected["plain"], args, deadline),
            "vllm+reweighter": run_phase(url, SERVED, conversations, expected["reweighted"], args, deadline,
                                         extra_body={"vllm_xargs": {"reweighter": "rw"}}),
        }))

        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        hf_plugin_serve = [sys.executable, "-m", "hf_plugin", "serve", "--base", str(smollm2), "--reweighter",
                           f"rw={folder / 'rw'}", "--port", str(port), "--max-batch", "16",
                           "--max-queued", str(args.clients)]
        phases.update(serve(hf_plugin_serve, environment, url, folder / "serve.log", deadline, lambda: {
            "hf-plugin serve+reweighter": run_phase(url, SERVED + "+rw", conversations, expected["reweighted"], args,
                                                    deadline),
        }))
    vllm_rw, vllm_plain, ours = phases["vllm+reweighter"], phases["vllm"], phases["hf-plugin serve+reweighter"]
    result = {
        "command": "python benchmarks/vllm_load.py " + " ".join(sys.argv[1:]),
        "servers": f"vllm-cpu 0.32.0 (float32, --enforce-eager) and hf-plugin serve --max-batch 16, each with "
                   f"OMP_NUM_THREADS={args.threads}, one after the other",
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "decoding": "greedy (temperature 0), streamed chat completions, 16 distinct prompts",
        "reweighter": f"{described} ({reweighter.num_parameters():,} parameters), alpha {reweighter.config.alpha}",
        "phases": phases,
        "ratios": {
            "vllm_reweighted_over_plain_tokens_per_s": ratio(vllm_rw["tokens_per_s"], vllm_plain["tokens_per_s"]),
            "vllm_reweighted_over_hf_plugin_serve_tokens_per_s": ratio(vllm_rw["tokens_per_s"], ours["tokens_per_s"]),
            "latency_p50_vllm_reweighted_over_plain": ratio(vllm_rw["latency_p50_s"], vllm_plain["latency_p50_s"]),
        },
        "reference_generation_s": round(reference_s, 1),
        **run_facts(args.note),
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
