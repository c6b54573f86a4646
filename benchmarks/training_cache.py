"""Training live vs from the top-k base-logit cache, on E2E NLG with SmolLM2-135M-Instruct as the base.

Each mode runs in its own process so that its peak memory (max RSS) is its own:
  cache       — one pass of the base model writes the cache for the training and validation splits: top-k (k=64)
                and the base log-probs of the task vocabulary (the training completions' tokens, --task-vocab-size);
  live        — trains the paper's reweighter with the base model run on every batch;
  cached      — trains the same reweighter, same seed and hyper-parameters, from the cache's top-k only (base
                never loaded);
  cached-task — the same from the top-k and the task vocabulary;
  score       — evaluates the trained reweighters on the validation split with the full base logits, also split by
                whether the true next token is in the base's top-k.
Reported: seconds per training epoch of each mode, the one-time cache pass, cache bytes per completion token (and
the top-k part of it), peak RSS of each mode, and the validation NLL/token of each reweighter under full logits
(target: cached with the task vocabulary within 1% of live).

Usage:
    python benchmarks/training_cache.py --data-dir ../shared/data/e2e_nlg   # the whole devel split: ~65 min, 2 cores
    python benchmarks/training_cache.py --data-dir ../shared/data/e2e_nlg --limit 1500   # ~35 min
    # only the task-vocabulary run, the others taken from an earlier results file of the same data and seed:
    python benchmarks/training_cache.py --data-dir ../shared/data/e2e_nlg --modes cache,cached-task,score \
        --reuse benchmarks/results/training_cache_full.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


RESULTS = Path(__file__).parent / "results"
TEMPLATE = "Data: {mr}\nSentence:"


def prepare(args):
    from hf_plugin.data import encode_examples, read_examples, split_by_prompt
    from hf_plugin.loading import load_tokenizer, offline_smollm2

    tokenizer = load_tokenizer(offline_smollm2())
    examples, _ = read_examples(Path(args.data_dir) / "devel-fixed.no-ol.csv", completion_column="ref", template=TEMPLATE)
    if args.limit:
        examples = examples[: args.limit]
    train, validation = split_by_prompt(examples, 0.1, seed=0)
    return tokenizer, encode_examples(tokenizer, train, 160), encode_examples(tokenizer, validation, 160)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_mode(args) -> dict:
    from hf_plugin import PluginConfig, PluginModel, binding_kwargs
    from hf_plugin.base_cache import CachedBaseLogits, cached_base_sources
    from hf_plugin.base_logits import LiveBaseModel
    from hf_plugin.loading import load_base_model, offline_smollm2
    from hf_plugin.training import PluginTrainingArguments, train

    tokenizer, train_examples, validation_examples = prepare(args)
    work = Path(args.work_dir)
    splits = {"train": train_examples, "validation": validation_examples}
    if args.mode == "cache":
        base, _ = load_base_model(offline_smollm2())
        started = time.perf_counter()
        sources, _ = cached_base_sources(lambda: base, tokenizer, splits, work / "cache", k=args.top_k, batch_size=16,
                                         task_vocab_size=args.task_vocab_size)
        seconds = time.perf_counter() - started
        files = list((work / "cache").rglob("*.safetensors"))
        tokens = sum(sum(label != -100 for label in e.labels) for e in train_examples + validation_examples)
        task_bytes = sum(0 if s.task_logprobs is None else s.task_logprobs.numel() * 2 for s in sources.values())
        return {"cache_seconds": seconds, "cache_bytes": sum(f.stat().st_size for f in files), "completion_tokens": tokens,
                "cache_bytes_per_token": sum(f.stat().st_size for f in files) / tokens,
                "top_k_bytes_per_token": (sum(f.stat().st_size for f in files) - task_bytes) / tokens,
                "task_vocab_size": len(sources["train"].task_ids) if task_bytes else 0, "peak_rss_mb": peak_rss_mb()}
    if args.mode in ("live", "cached", "cached-task"):
        if args.mode == "live":
            base, _ = load_base_model(offline_smollm2())
            binding = binding_kwargs(base, tokenizer)
            train_source = validation_source = LiveBaseModel(base)
        else:
            sources, binding = cached_base_sources(lambda: load_base_model(offline_smollm2())[0], tokenizer, splits,
                                                   work / "cache", k=args.top_k, batch_size=16,
                                                   task_vocab_size=args.task_vocab_size)
            if args.mode == "cached":  # the same cache read without its task vocabulary: the top-k bound alone
                sources = {name: CachedBaseLogits(work / "cache" / name, examples, task_vocab_size=0)
                           for name, examples in splits.items()}
            train_source, validation_source = sources["train"], sources["validation"]
        torch.manual_seed(args.seed)
        plugin = PluginModel(PluginConfig(vocab_size=binding["base_vocab_size"], max_position_embeddings=256, **binding))
        training_args = PluginTrainingArguments(output_dir=str(work / args.mode), epochs=args.epochs, batch_size=16,
                                                learning_rate=1e-3, patience=args.patience, seed=args.seed,
                                                overwrite_output_dir=True)
        train(plugin, train_examples, validation_examples, train_source, training_args,
              validation_source=validation_source, tokenizer=tokenizer)
        history = json.loads((work / args.mode / "metrics.json").read_text())["history"]
        return {"epoch_seconds": [h["train_seconds"] for h in history], "peak_rss_mb": peak_rss_mb(),
                "validation_nll_own_source": [h["validation_nll"] for h in history]}
    if args.mode == "score":
        return score(args, validation_examples, tokenizer.pad_token_id, Path(args.work_dir))
    raise ValueError(args.mode)


@torch.no_grad()
def score(args, examples, pad_token_id: int, work: Path) -> dict:
    """Validation NLL/token of the trained reweighters under the full base logits, split by whether the true token is in
    the base's top-k (where the cache knows everything but the tail) or outside it (where only its own log-prob
    is known), and the share of the combined probability that falls outside top-k ∪ {true token}."""
    from hf_plugin import PluginModel
    from hf_plugin.completions import completion_positions
    from hf_plugin.combine import combine_logits
    from hf_plugin.data import collate
    from hf_plugin.loading import load_base_model, offline_smollm2

    base, _ = load_base_model(offline_smollm2())
    plugins = {name: PluginModel.from_pretrained(work / name).eval() for name in ("live", "cached", "cached-task")
               if (work / name / "config.json").exists()}
    # Per reweighter: summed NLL over all positions, over those with the true token in the top-k, over the others;
    # summed combined probability outside top-k ∪ {true token}.
    sums = {name: torch.zeros(4, dtype=torch.float64) for name in plugins}
    in_topk_count = total_count = 0
    for start in range(0, len(examples), 16):
        batch = collate(examples[start : start + 16], pad_token_id)
        positions = completion_positions(batch["labels"])
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][positions]
        targets = batch["labels"][:, 1:][positions]
        topk_ids = base_logits.topk(args.top_k, dim=-1).indices
        in_topk = (topk_ids == targets[:, None]).any(dim=-1)
        outside = torch.ones_like(base_logits, dtype=torch.bool).scatter_(1, topk_ids, False).scatter_(1, targets[:, None], False)
        in_topk_count, total_count = in_topk_count + int(in_topk.sum()), total_count + len(targets)
        for name, plugin in plugins.items():
            logits = plugin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][positions]
            combined = combine_logits(base_logits, logits, plugin.config.alpha)
            nll = -combined.gather(-1, targets[:, None]).squeeze(-1).double()
            tail_share = combined.masked_fill(~outside, float("-inf")).logsumexp(-1).exp().double()
            sums[name] += torch.stack([nll.sum(), nll[in_topk].sum(), nll[~in_topk].sum(), tail_share.sum()])
    return {
        "validation_nll_full_logits": {name: (s[0] / total_count).item() for name, s in sums.items()},
        "share_of_positions_with_true_token_in_top_k": in_topk_count / total_count,
        "nll_true_token_in_top_k": {name: (s[1] / in_topk_count).item() for name, s in sums.items()},
        "nll_true_token_outside_top_k": {name: (s[2] / (total_count - in_topk_count)).item() for name, s in sums.items()},
        "combined_mass_outside_top_k_and_true_token": {name: (s[3] / total_count).item() for name, s in sums.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/e2e_nlg")
    parser.add_argument("--work-dir", default="/tmp/hf-plugin-training-cache")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N rows (0: all)")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--task-vocab-size", type=int, default=2048, help="task-vocabulary tokens cached (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reweighter's initial weights and data order")
    parser.add_argument("--patience", type=int, default=0,
                        help="early-stopping patience in epochs (0: run all epochs); the best epoch is what gets scored")
    parser.add_argument("--modes", default="cache,live,cached,cached-task,score",
                        help="modes to run; the others' results are read from --reuse")
    parser.add_argument("--reuse", help="a previous results file to take the modes not run from (same data and seed)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS / "training_cache.json"))
    args = parser.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args)))
        return

    results = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    results.pop("summary", None)
    reused_nll = results.get("score", {}).get("validation_nll_full_logits", {})
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, "--mode", mode, "--data-dir", args.data_dir, "--work-dir", args.work_dir,
                   "--epochs", str(args.epochs), "--limit", str(args.limit), "--top-k", str(args.top_k), "--seed",
                   str(args.seed), "--patience", str(args.patience), "--task-vocab-size", str(args.task_vocab_size)]
        output = subprocess.run(command, capture_output=True, text=True)
        if output.returncode != 0:
            raise SystemExit(f"mode {mode} failed:\n{output.stderr[-3000:]}")
        results[mode] = json.loads(output.stdout.split("RESULT ")[-1])
        print(mode, json.dumps(results[mode]), flush=True)

    def median(values):
        return sorted(values)[len(values) // 2]

    # Runs reused from --reuse keep their full-logit NLL as scored then.
    nll = {**reused_nll, **results["score"]["validation_nll_full_logits"]}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    live_epoch = median(results["live"]["epoch_seconds"])
    results["summary"] = {
        "median_epoch_seconds_live": live_epoch,
        "cache_bytes_per_token": results["cache"]["cache_bytes_per_token"],
        "validation_nll_live": nll["live"],
    }
    for mode in ("cached", "cached-task"):
        if mode in results and mode in nll:
            epoch = median(results[mode]["epoch_seconds"])
            results["summary"].update({
                f"median_epoch_seconds_{mode}": epoch, f"{mode}_speedup_per_epoch": live_epoch / epoch,
                f"validation_nll_{mode}": nll[mode], f"nll_gap_percent_{mode}": 100 * (nll[mode] - nll["live"]) / nll["live"],
            })
    results["meta"] = {"command": " ".join(["python benchmarks/training_cache.py"] + sys.argv[1:]), "commit": commit,
                       "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                       "torch": torch.__version__, "epochs": args.epochs, "limit": args.limit, "top_k": args.top_k, "seed": args.seed,
                       "task_vocab_size": args.task_vocab_size,
                       "patience": args.patience,
                       "modes_run": args.modes, "reused": args.reuse}
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
