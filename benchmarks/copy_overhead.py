"""What the copy modes and the compact head cost at decode time, and in parameters and bytes on disk.

SmolLM2-135M-Instruct (offline GGUF) generates greedily for a batch of E2E prompts with the paper's 1-layer
reweighter in each configuration (random weights: speed does not depend on training), the configurations
interleaved in every repeat so that a busy machine slows them alike; the median over repeats is reported, and its
ratio to the plain reweighter's.

Usage:
    python benchmarks/copy_overhead.py --data-dir ../shared/data/e2e_nlg
Results: benchmarks/results/copy_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e_nlg import TEMPLATE, group_by_mr, read_pairs  # noqa: E402


RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/e2e_nlg")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from hf_plugin import PluginConfig, PluginLogitsProcessor, PluginModel, binding_kwargs
    from hf_plugin.completions import task_vocabulary
    from hf_plugin.data import Example, encode_examples
    from hf_plugin.loading import load_base_model, offline_smollm2

    base, tokenizer = load_base_model(offline_smollm2())
    pairs = read_pairs(Path(args.data_dir) / "devel-fixed.no-ol.csv")
    head_ids = task_vocabulary(encode_examples(tokenizer, [Example(TEMPLATE.format(mr=m), r, i)
                                                           for i, (m, r) in enumerate(pairs)], 160), 2048)
    mrs = list(group_by_mr(read_pairs(Path(args.data_dir) / "test-fixed.csv")))[: args.batch_size]
    inputs = tokenizer([TEMPLATE.format(mr=mr) for mr in mrs], return_tensors="pt", padding=True)
    binding = binding_kwargs(base, tokenizer)
    copy = dict(copy_mode="shared", copy_word_starts=True, copy_ignore_ids=tokenizer.all_special_ids)
    configurations = {
        "plain reweighter": {},
        "copy shared + word starts": copy,
        "copy shared + word starts + pointer": dict(copy, copy_pointer=4),
        "copy shared + spelled words + pointer": dict(copy, copy_word_pieces=3, copy_pointer=4),
        "copy shared + spelled words + pointer, every occurrence": dict(copy, copy_word_pieces=3, copy_pointer=4,
                                                                        copy_pointer_occurrences="every"),
        "copy shared + spelled words + pointer, every occurrence, coverage": dict(
            copy, copy_word_pieces=3, copy_pointer=4, copy_pointer_occurrences="every", copy_coverage=True),
        "copy shared + spelled words + pointer, every occurrence, coverage, continuation": dict(
            copy, copy_word_pieces=3, copy_pointer=4, copy_pointer_occurrences="every", copy_coverage=True,
            copy_continuation=True),
        "copy shared + spelled words + pointer, every occurrence, coverage, continuation, word forms": dict(
            copy, copy_word_pieces=3, copy_pointer=4, copy_pointer_occurrences="every", copy_coverage=True,
            copy_continuation=True, copy_word_forms=True),
        "compact head": dict(head_ids=head_ids),
        "compact head + copy shared + word starts": dict(copy, head_ids=head_ids),
    }
    models = {}
    for name, options in configurations.items():
        torch.manual_seed(0)
        model = PluginModel(PluginConfig(vocab_size=binding["base_vocab_size"], max_position_embeddings=512,
                                         **binding, **options)).eval()
        if options.get("copy_word_starts"):
            model.set_copy_aliases(tokenizer)
        models[name] = model

    def run(model):
        processors = [] if model is None else [PluginLogitsProcessor(model, tokenizer=tokenizer)]
        started = time.perf_counter()
        with torch.no_grad():
            base.generate(**inputs, logits_processor=processors, max_new_tokens=args.new_tokens,
                          min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - started

    run(None)  # warm-up
    timings = {name: [] for name in ["base alone", *models]}
    for _ in range(args.repeats):
        timings["base alone"].append(run(None))
        for name, model in models.items():
            timings[name].append(run(model))

    rows = {}
    for name, seconds in timings.items():
        row = {"median_seconds": statistics.median(seconds), "seconds": seconds}
        if name in models:
            model = models[name]
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                row["bytes_on_disk"] = (Path(folder) / "model.safetensors").stat().st_size
            row["parameters"] = model.num_parameters()
            row["head_parameters"] = sum(p.numel() for p in model.get_output_embeddings().parameters())
        rows[name] = row
    plain = rows["plain reweighter"]["median_seconds"]
    result = {
        "command": " ".join(["python benchmarks/copy_overhead.py"] + sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__,
        "batch_size": args.batch_size, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "task_vocabulary": len(head_ids), "rows": rows,
    }
    lines = ["# Decode cost of the copy modes and the compact head", "",
             f"`{result['command']}` at commit {result['commit']} ({result['machine']}, torch {result['torch']}): "
             f"SmolLM2-135M-Instruct, greedy, {args.batch_size} E2E prompts, {args.new_tokens} new tokens, median of "
             f"{args.repeats} interleaved repeats; compact head over a task vocabulary of {len(head_ids)} tokens.", "",
             "| configuration | median s | vs plain reweighter | parameters | output layer | MB on disk |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in rows.items():
        extra = (f"{row['parameters']:,} | {row['head_parameters']:,} | {row['bytes_on_disk'] / 1e6:.1f}"
                 if "parameters" in row else " | | ")
        lines.append(f"| {name} | {row['median_seconds']:.2f} | {row['median_seconds'] / plain:.2f}x | {extra} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "copy_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "copy_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
