"""The paper's E2E NLG experiment with a real black box: SmolLM2-135M-Instruct (offline GGUF), on CPU.

Protocol (Hiranandani et al. 2025, adapted): the cleaned E2E validation split is split 60/40 by distinct MR into
train and held-out parts; methods are compared on the first 500 distinct MRs of the cleaned test split (in file
order; the list is recorded), each against all of its references. Every method decodes greedily with repetition
penalty 1.1, at most 64 new tokens, from the same prompt template, and its output is cut at the first newline.

Methods:
  zero-shot             the base alone;
  ICL-1, ICL-3          the first 1 / 3 distinct train MRs with their first reference as demonstrations;
  weighted combination  p = w·p_small + (1−w)·p_base, the small model trained through the mixture, w picked on
                        held-out NLL (exact: only the base's log-prob of the true token enters this loss);
  small model alone     the same architecture trained on the data with no base model;
  Plugin                the paper's reweighter (1 layer), trained from a top-64 base-logit cache with
                        hf-plugin; learning rate and epoch picked on the held-out NLL;
  Plugin + ICL-3        the same reweighter on the ICL-3 prompts.
The learned methods start from the same seed; a method's train time is its chosen configuration's training run
(the one-time cache pass, shared by Plugin and the weighted combination, is reported apart).

Usage:
    python benchmarks/e2e_nlg.py --data-dir ../shared/data/e2e_nlg            # the full run (about 70 minutes, 2 cores)
    python benchmarks/e2e_nlg.py --data-dir ../shared/data/e2e_nlg --quick    # 20 test MRs, small training
Results: benchmarks/results/e2e_nlg.{md,json}, e2e_nlg_bars.png, e2e_nlg_probabilities.png (--quick writes
e2e_nlg_quick.* instead).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch


RESULTS = Path(__file__).parent / "results"
TEMPLATE = "Data: {mr}\nSentence:"
GENERATION = {"do_sample": False, "repetition_penalty": 1.1, "max_new_tokens": 64}
MAX_LENGTH = 160


# ----------------------------------------------------------------------------------------------- data

def read_pairs(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [(row["mr"], row["ref"]) for row in csv.DictReader(handle)]


def group_by_mr(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for mr, ref in pairs:
        groups.setdefault(mr, []).append(ref)
    return groups  # insertion order = first appearance in the file


def icl_prompt(mr: str, demonstrations: list[tuple[str, str]]) -> str:
    shots = "".join(TEMPLATE.format(mr=d_mr) + " " + d_ref + "\n\n" for d_mr, d_ref in demonstrations)
    return shots + TEMPLATE.format(mr=mr)


# ------------------------------------------------------------------------- the learned methods' losses

class MixtureNLL:
    """−log(w·p_small(y) + (1−w)·p_base(y)): needs only the base's log-prob of the true token, read from the cache."""

    def __init__(self, cache, weight: float):
        self.cache, self.weight = cache, weight

    def nll(self, logits: torch.Tensor, batch: dict, alpha: float) -> torch.Tensor:
        from hf_plugin.base_logits import completion_positions

        rows = torch.cat([torch.arange(self.cache.offsets[i], self.cache.offsets[i + 1]) for i in batch["index"].tolist()])
        targets = batch["labels"][:, 1:][completion_positions(batch["labels"])].to(logits.device)
        small = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        base = self.cache.label_logprobs[rows].to(logits.device).float()
        return -torch.logaddexp(small + math.log(self.weight), base + math.log(1 - self.weight))


class AloneNLL:
    """The small model's own cross-entropy: no base model at all."""

    def nll(self, logits: torch.Tensor, batch: dict, alpha: float) -> torch.Tensor:
        from hf_plugin.base_logits import completion_positions

        targets = batch["labels"][:, 1:][completion_positions(batch["labels"])].to(logits.device)
        return -torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def mixture_processor(small, weight: float, tokenizer):
    """A logits processor for the weighted combination, running the small model with its own incremental KV cache."""
    from transformers import LogitsProcessor

    from hf_plugin import CachedModelRunner
    from hf_plugin.logits_process import left_padding_mask

    class MixtureLogitsProcessor(LogitsProcessor):
        def __init__(self):
            self.runner = CachedModelRunner(small)

        @staticmethod
        def attention_mask_of(input_ids):  # prompts are left-padded
            return left_padding_mask(input_ids, tokenizer.pad_token_id)

        @torch.no_grad()
        def __call__(self, input_ids, scores):
            small_logits = self.runner.next_token_logits(input_ids, self.attention_mask_of).to(scores.device)
            small_logits = small_logits[:, : scores.shape[-1]]
            mixed = torch.logaddexp(torch.log_softmax(small_logits, -1) + math.log(weight),
                                    torch.log_softmax(scores.float(), -1) + math.log(1 - weight))
            return mixed.to(scores.dtype)

    return MixtureLogitsProcessor()


# ------------------------------------------------------------------------------------------ training

def new_reweighter(binding: dict):
    from hf_plugin import PluginConfig, PluginModel

    torch.manual_seed(0)
    return PluginModel(PluginConfig(vocab_size=binding["base_vocab_size"], max_position_embeddings=512, **binding))


def train_one(name: str, binding: dict, train_examples, heldout_examples, train_source, heldout_source, work: Path,
              tokenizer, epochs: int, learning_rate: float, patience: int) -> dict:
    from hf_plugin.training import TrainingArguments, train

    output = work / name
    started = time.perf_counter()
    model = train(new_reweighter(binding), train_examples, heldout_examples, train_source,
                  TrainingArguments(output_dir=str(output), epochs=epochs, batch_size=16, learning_rate=learning_rate,
                                    patience=patience, seed=0, overwrite_output_dir=True),
                  validation_source=heldout_source, tokenizer=tokenizer)
    seconds = time.perf_counter() - started
    history = json.loads((output / "metrics.json").read_text())["history"]
    print(f"  {name}: held-out NLL by epoch {[round(h['validation_nll'], 4) for h in history]} ({seconds:.0f}s)",
          flush=True)
    return {"model": model.eval(), "seconds": seconds, "heldout_nll": min(h["validation_nll"] for h in history),
            "history": [h["validation_nll"] for h in history], "learning_rate": learning_rate}


# ---------------------------------------------------------------------------------------- generation

@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], processors=(), batch_size: int = 32) -> list[str]:
    outputs = []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        for processor in processors:
            processor.reset()
        tokens = model.generate(**inputs, logits_processor=list(processors), pad_token_id=tokenizer.pad_token_id,
                                **GENERATION)
        texts = tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        outputs += [text.strip().split("\n")[0].strip() for text in texts]
    return outputs


def degeneration(outputs: list[str], mrs: list[str]) -> dict[str, float]:
    """Shares (in %) of outputs that are empty, repeat a 3-word phrase 3+ times, or miss the MR's name slot."""

    def repeats(text: str) -> bool:
        words = re.findall(r"\w+", text.lower())
        return any(c >= 3 for c in Counter(zip(words, words[1:], words[2:])).values())

    names = [re.search(r"name\[([^\]]*)\]", mr) for mr in mrs]
    missing = [m is not None and m.group(1).lower() not in out.lower() for m, out in zip(names, outputs)]
    n = len(outputs)
    return {"empty %": 100 * sum(not o for o in outputs) / n, "repeats phrase 3+ %": 100 * sum(map(repeats, outputs)) / n,
            "misses name %": 100 * sum(missing) / n}


# ------------------------------------------------------------------------------------------- figures

def bar_chart(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    metrics = ["BLEU", "ROUGE-L", "METEOR (exact+stem)"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        ax.bar([x + i * width for x in range(len(names))], [rows[n]["scores"][metric] for n in names], width,
               label=metric)
    ax.set_xticks([x + width for x in range(len(names))], names, rotation=20, ha="right")
    ax.set_ylabel("score (0-100)")
    ax.set_title("E2E NLG, SmolLM2-135M-Instruct as the black box")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def probability_figure(base, plugin, tokenizer, prompt: str, path: Path, steps=(0, 1, 2, 3, 4, 5), top: int = 6):
    """For one test input, base vs base × reweighter probabilities of the top tokens along the Plugin's output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_plugin import PluginLogitsProcessor
    from hf_plugin.combine import combine_logits

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated = base.generate(ids, logits_processor=[PluginLogitsProcessor(plugin, tokenizer=tokenizer)],
                              pad_token_id=tokenizer.pad_token_id, **GENERATION)
    base_logits = base(generated).logits[0]
    reweighter_logits = plugin(generated).logits[0, :, : base_logits.shape[-1]]
    combined = torch.softmax(combine_logits(base_logits, reweighter_logits, plugin.config.alpha), -1)
    base_probs = torch.softmax(base_logits.float(), -1)
    fig, axes = plt.subplots(1, len(steps), figsize=(3 * len(steps), 3.6), sharey=True)
    record = []
    for ax, step in zip(axes, steps):
        position = ids.shape[1] - 1 + step
        candidates = torch.cat([combined[position].topk(top).indices, base_probs[position].topk(top).indices]).unique()
        candidates = candidates[combined[position, candidates].argsort(descending=True)][:top]
        labels = [repr(tokenizer.decode([int(t)]))[1:-1] for t in candidates]
        xs = range(len(candidates))
        ax.bar([x - 0.2 for x in xs], base_probs[position, candidates].tolist(), 0.4, label="base")
        ax.bar([x + 0.2 for x in xs], combined[position, candidates].tolist(), 0.4, label="base × reweighter")
        ax.set_xticks(list(xs), labels, rotation=60, fontsize=8)
        ax.set_title(f"step {step + 1}", fontsize=9)
        record.append({"step": step + 1, "tokens": labels, "base": base_probs[position, candidates].tolist(),
                       "combined": combined[position, candidates].tolist()})
    axes[0].set_ylabel("next-token probability")
    axes[0].legend(fontsize=8)
    fig.suptitle(prompt.replace("\n", " | "), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return record


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/e2e_nlg")
    parser.add_argument("--work-dir", default="/tmp/hf-plugin-e2e")
    parser.add_argument("--quick", action="store_true", help="20 test MRs, 400 training rows, one epoch")
    parser.add_argument("--test-mrs", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=5, help="most epochs per run (early stopping, patience 1)")
    parser.add_argument("--learning-rates", default="1e-3,3e-3", help="Plugin's learning-rate grid")
    parser.add_argument("--weights", default="0.25,0.5,0.75", help="the weighted combination's w grid")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--rescore-first", type=int, metavar="N",
                        help="no run: score the saved outputs of results/e2e_nlg.json on the first N test MRs only")
    args = parser.parse_args()
    if args.rescore_first:
        rescore_first(Path(args.data_dir), args.rescore_first)
        return

    from hf_plugin.base_logits import cached_base_sources
    from hf_plugin.data import Example, encode_examples, split_by_prompt
    from hf_plugin.loading import load_base_model, offline_smollm2
    from hf_plugin.logits_process import PluginLogitsProcessor
    from hf_plugin.metrics import METRIC_NAMES, corpus_metrics

    data_dir = Path(args.data_dir)
    suffix = "_quick" if args.quick else ""
    work = Path(args.work_dir + suffix)
    test_mrs = 20 if args.quick else args.test_mrs
    epochs = 1 if args.quick else args.epochs
    learning_rates = [float(x) for x in args.learning_rates.split(",")][: 1 if args.quick else None]
    weights = [float(x) for x in args.weights.split(",")]

    base, tokenizer = load_base_model(offline_smollm2())
    base.eval()

    devel_pairs = read_pairs(data_dir / "devel-fixed.no-ol.csv")
    devel = [Example(TEMPLATE.format(mr=mr), ref, row) for row, (mr, ref) in enumerate(devel_pairs)]
    train_pairs, heldout_pairs = split_by_prompt(devel, 0.4, seed=0)
    if args.quick:
        train_pairs, heldout_pairs = train_pairs[:400], heldout_pairs[:100]
    train_examples = encode_examples(tokenizer, train_pairs, MAX_LENGTH)
    heldout_examples = encode_examples(tokenizer, heldout_pairs, MAX_LENGTH)
    test = list(group_by_mr(read_pairs(data_dir / "test-fixed.csv")).items())[:test_mrs]
    mr_of_prompt = {example.prompt: mr for example, (mr, _) in zip(devel, devel_pairs)}
    train_groups = group_by_mr([(mr_of_prompt[p.prompt], p.completion) for p in train_pairs])
    demonstrations = [(mr, refs[0]) for mr, refs in list(train_groups.items())[:3]]
    print(f"train {len(train_examples)} pairs / {len(train_groups)} MRs, held-out {len(heldout_examples)} pairs, "
          f"test {len(test)} MRs", flush=True)

    started = time.perf_counter()
    caches, binding = cached_base_sources(lambda: base, tokenizer, {"train": train_examples, "heldout": heldout_examples},
                                          work / "cache", k=args.top_k, batch_size=16)
    cache_seconds = time.perf_counter() - started
    train_cache, heldout_cache = caches["train"], caches["heldout"]
    print(f"cache pass {cache_seconds:.0f}s", flush=True)

    runs: dict[str, dict] = {}
    print("Plugin grid:", flush=True)
    plugin_runs = [train_one(f"plugin-lr{lr:g}", binding, train_examples, heldout_examples, train_cache, heldout_cache,
                             work, tokenizer, epochs, lr, patience=1) for lr in learning_rates]
    runs["Plugin"] = min(plugin_runs, key=lambda r: r["heldout_nll"])
    print("weighted combination grid:", flush=True)
    mixture_runs = []
    for w in weights:
        run = train_one(f"mixture-w{w:g}", binding, train_examples, heldout_examples, MixtureNLL(train_cache, w),
                        MixtureNLL(heldout_cache, w), work, tokenizer, epochs, learning_rates[0], patience=1)
        mixture_runs.append({**run, "weight": w})
    runs["weighted combination"] = min(mixture_runs, key=lambda r: r["heldout_nll"])
    print("small model alone:", flush=True)
    runs["small model alone"] = train_one("alone", binding, train_examples, heldout_examples, AloneNLL(), AloneNLL(),
                                          work, tokenizer, epochs, learning_rates[0], patience=1)

    plain = [TEMPLATE.format(mr=mr) for mr, _ in test]
    icl1 = [icl_prompt(mr, demonstrations[:1]) for mr, _ in test]
    icl3 = [icl_prompt(mr, demonstrations) for mr, _ in test]
    plugin = runs["Plugin"]["model"]
    mixture = runs["weighted combination"]
    methods = {
        "zero-shot": lambda: generate(base, tokenizer, plain),
        "ICL-1": lambda: generate(base, tokenizer, icl1),
        "ICL-3": lambda: generate(base, tokenizer, icl3),
        "weighted combination": lambda: generate(base, tokenizer, plain,
                                                 [mixture_processor(mixture["model"], mixture["weight"], tokenizer)]),
        "small model alone": lambda: generate(runs["small model alone"]["model"].backbone, tokenizer, plain),
        "Plugin": lambda: generate(base, tokenizer, plain, [PluginLogitsProcessor(plugin, tokenizer=tokenizer)]),
        "Plugin + ICL-3": lambda: generate(base, tokenizer, icl3, [PluginLogitsProcessor(plugin, tokenizer=tokenizer)]),
    }
    trainable = sum(p.numel() for p in plugin.parameters())
    references = [refs for _, refs in test]
    mrs = [mr for mr, _ in test]
    rows = {}
    for name, run in methods.items():
        started = time.perf_counter()
        outputs = run()
        seconds = time.perf_counter() - started
        learned = runs.get(name.replace(" + ICL-3", ""))
        rows[name] = {"scores": corpus_metrics(outputs, references), "degeneration": degeneration(outputs, mrs),
                      "generation_seconds": seconds, "train_seconds": learned["seconds"] if learned else 0.0,
                      "trainable_parameters": trainable if learned else 0, "outputs": outputs}
        print(f"{name}: {json.dumps(rows[name]['scores'])} ({seconds:.0f}s)", flush=True)

    suffix_path = RESULTS / f"e2e_nlg{suffix}"
    bar_chart(rows, suffix_path.with_name(suffix_path.name + "_bars.png"))
    figure = probability_figure(base, plugin, tokenizer, plain[0],
                                suffix_path.with_name(suffix_path.name + "_probabilities.png"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "meta": {"command": " ".join(["python benchmarks/e2e_nlg.py"] + sys.argv[1:]), "commit": commit,
                 "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__,
                 "template": TEMPLATE, "decoding": GENERATION, "top_k": args.top_k,
                 "train_pairs": len(train_examples), "heldout_pairs": len(heldout_examples),
                 "test_mrs": mrs, "demonstrations": demonstrations, "cache_seconds": cache_seconds,
                 "grids": {"Plugin learning rate": learning_rates, "weighted combination w": weights,
                           "epochs": f"at most {epochs}, early stopping with patience 1 on held-out NLL"}},
        "selection": {
            "Plugin": [{"learning_rate": r["learning_rate"], "heldout_nll_topk_bound": r["history"]} for r in plugin_runs],
            "weighted combination": [{"w": r["weight"], "heldout_nll": r["history"]} for r in mixture_runs],
            "small model alone": runs["small model alone"]["history"],
            "chosen": {"Plugin learning rate": runs["Plugin"]["learning_rate"], "w": mixture["weight"]},
        },
        "methods": rows,
        "probability_figure": {"prompt": plain[0], "steps": figure},
    }
    suffix_path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    suffix_path.with_suffix(".md").write_text(markdown(result, METRIC_NAMES))
    print(markdown(result, METRIC_NAMES))


def rescore_first(data_dir: Path, count: int) -> None:
    """BLEU and ROUGE-L of each method's saved outputs on the first `count` test MRs (added to the JSON)."""
    from hf_plugin.metrics import bleu, rouge_l

    path = RESULTS / "e2e_nlg.json"
    result = json.loads(path.read_text())
    groups = group_by_mr(read_pairs(data_dir / "test-fixed.csv"))
    references = [groups[mr] for mr in result["meta"]["test_mrs"][:count]]
    subset = {name: {"BLEU": bleu(row["outputs"][:count], references),
                     "ROUGE-L": rouge_l(row["outputs"][:count], references)}
              for name, row in result["methods"].items()}
    result[f"first_{count}_mrs"] = subset
    path.write_text(json.dumps(result, indent=2) + "\n")
    for name, scores in subset.items():
        print(f"{name}: BLEU {scores['BLEU']:.2f}, ROUGE-L {scores['ROUGE-L']:.2f}")


def markdown(result: dict, metric_names) -> str:
    meta = result["meta"]
    lines = [
        f"# E2E NLG with SmolLM2-135M-Instruct as the black box ({len(meta['test_mrs'])} test MRs)", "",
        f"`{meta['command']}` at commit {meta['commit']} ({meta['machine']}, torch {meta['torch']}).",
        f"Greedy, repetition penalty 1.1, at most 64 new tokens, prompt `{meta['template']!r}`, cut at the first "
        "newline. METEOR is the exact+stem variant (no WordNet synonyms); NIST and CIDEr-D on their own scales.", "",
        "| method | " + " | ".join(metric_names) + " | train s | generation s | trainable params |",
        "| --- |" + " ---: |" * (len(metric_names) + 3),
    ]
    for name, row in result["methods"].items():
        scores = " | ".join(f"{row['scores'][m]:.2f}" for m in metric_names)
        lines.append(f"| {name} | {scores} | {row['train_seconds']:.0f} | {row['generation_seconds']:.0f} | "
                     f"{row['trainable_parameters']:,} |")
    lines += ["", f"One-time base-logit cache pass (top-{meta['top_k']}, train + held-out): {meta['cache_seconds']:.0f} s.",
              f"Chosen on held-out NLL: {json.dumps(result['selection']['chosen'])}; grid {json.dumps(meta['grids'])}.",
              "", "| method | empty % | repeats a phrase 3+ times % | misses the name slot % |", "| --- | ---: | ---: | ---: |"]
    for name, row in result["methods"].items():
        d = row["degeneration"]
        lines.append(f"| {name} | {d['empty %']:.1f} | {d['repeats phrase 3+ %']:.1f} | {d['misses name %']:.1f} |")
    first = meta["test_mrs"][0]
    lines += ["", f"First test MR: `{first}`", ""]
    lines += [f"- {name}: {row['outputs'][0]}" for name, row in result["methods"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
