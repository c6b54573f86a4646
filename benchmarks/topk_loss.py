"""Speed of the cached training loss, `combine_topk_nll`, at E2E's shapes: top-64 alone vs top-64 + task vocabulary.

One batch of 16 E2E examples has about 470 completion positions; SmolLM2's vocabulary has 49,152 tokens and the
E2E training completions use 1,151 of them (the task vocabulary). Times forward + backward through the loss alone
(the reweighter's own forward and backward are the same for every variant), interleaving the variants and
reporting medians, so the ratios hold on a busy machine. `--against REV` also times `combine_topk_nll` as it was
at git revision REV (e.g. b65fe6e, which built dense base log-probs over the vocabulary).

Usage:
    python benchmarks/topk_loss.py --against b65fe6e
Results: benchmarks/results/topk_loss.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


RESULTS = Path(__file__).parent / "results"


def combine_at(revision: str):
    """`combine_topk_nll` from hf_plugin/combine.py at a git revision (the module imports nothing of ours)."""
    source = subprocess.run(["git", "show", f"{revision}:hf_plugin/combine.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parent).stdout
    path = Path(tempfile.mkdtemp()) / f"combine_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.combine_topk_nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=470)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--task-vocab", type=int, default=1151)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--against", help="also time combine_topk_nll at this git revision")
    args = parser.parse_args()

    from hf_plugin.combine import combine_topk_nll

    torch.manual_seed(0)
    base = torch.randn(args.positions, args.vocab) * 3
    log_probs = base.log_softmax(-1)
    logits = torch.randn(args.positions, args.vocab, requires_grad=True)
    labels = torch.randint(0, args.vocab, (args.positions,))
    top_values, top_ids = log_probs.topk(args.k, dim=-1)
    label_logprobs = log_probs.gather(1, labels[:, None]).squeeze(1)
    task = torch.randperm(args.vocab)[: args.task_vocab]
    task_logprobs = log_probs[:, task].half()
    variants = {"top-k": (combine_topk_nll, {}),
                "top-k + task vocabulary": (combine_topk_nll, {"extra_ids": task, "extra_logprobs": task_logprobs})}
    if args.against:
        variants[f"top-k + task vocabulary at {args.against}"] = (
            combine_at(args.against), {"extra_ids": task, "extra_logprobs": task_logprobs})
    seconds = {name: [] for name in variants}
    values = {}
    for _ in range(args.repeats):
        for name, (function, extra) in variants.items():
            logits.grad = None
            started = time.perf_counter()
            loss = function(logits, top_ids, top_values.half(), labels, label_logprobs, **extra)
            loss.sum().backward()
            seconds[name].append(time.perf_counter() - started)
            values[name] = loss.detach()
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    reference = "top-k + task vocabulary"
    result = {
        "command": " ".join(["python benchmarks/topk_loss.py"] + sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "torch_threads": torch.get_num_threads(), "shapes": vars(args),
        "median_seconds_forward_backward": medians, "seconds": seconds,
        "ratio_to_top_k": {name: m / medians["top-k"] for name, m in medians.items()},
        "largest_difference_to_current": {name: float((v - values[reference]).abs().max()) for name, v in values.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "topk_loss.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, m in medians.items():
        print(f"{name}: {m * 1000:.0f} ms ({result['ratio_to_top_k'][name]:.2f}x top-k alone)")


if __name__ == "__main__":
    main()
