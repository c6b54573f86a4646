"""How should the top-k loss treat the base mass outside the top k? Five treatments, trained side by side.

Runs on the cache and data of `training_cache.py` (same first-N rows, split, seed and hyper-parameters; a cache
with k ≥ the k studied, truncated to it) and scores each trained reweighter with the full base logits, against
the live-trained reweighter's NLL recorded by `training_cache.py`:
  bound    — the library's `combine_topk_nll`: the tail mass poured, at most the k-th probability per token, onto
             the outside tokens the reweighter likes best (an upper bound on the NLL);
  uniform  — the tail mass spread evenly over all outside tokens;
  samples  — an unbiased estimate of the tail's share of the normaliser from M tokens drawn from the base's own
             tail distribution (stored next to the cache: one extra base pass, 4·M bytes per token);
  zipf     — `bound` with a decaying cap: outside token j (in the reweighter's order) gets at most the k-th
             probability times (j / k)^-s, s the log-log slope of the top-k between ranks k/2 and k (an estimate,
             not a bound: it assumes the base's sorted tail keeps the top-k's decay);
  background — the tail mass spread over outside tokens in proportion to a background distribution: the mean
             probability each token gets inside the top-k over the training cache, plus 1% spread uniformly.
Only `bound` is library code; the others live here as experiments.

Usage (after `training_cache.py --limit 1500 --epochs 3 [--top-k 128]` has left its cache in --work-dir):
    python benchmarks/tail_treatments.py --data-dir ../shared/data/e2e_nlg --limit 1500 --epochs 3
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import training_cache  # noqa: E402  (shares the data preparation)


RESULTS = Path(__file__).parent / "results"


def uniform_tail_nll(reweighter_logits, topk_ids, topk_logprobs, labels, label_logprobs, alpha, tail_ids=None):
    reweighter = torch.log_softmax(reweighter_logits.float(), -1)
    label_in_topk = (topk_ids == labels[:, None]).any(-1)
    label_term = label_logprobs + alpha * reweighter.gather(-1, labels[:, None]).squeeze(-1)
    topk_terms = topk_logprobs.float() + alpha * reweighter.gather(-1, topk_ids)
    tail_mass = 1 - topk_logprobs.float().exp().sum(-1) - torch.where(label_in_topk, 0.0, label_logprobs.exp())
    powered = (alpha * reweighter).exp()
    known = powered.gather(-1, topk_ids).sum(-1) + torch.where(label_in_topk, 0.0, powered.gather(-1, labels[:, None]).squeeze(-1))
    outside = reweighter.shape[-1] - topk_ids.shape[-1] - (~label_in_topk).long()
    tail_term = tail_mass.clamp(min=1e-30).log() + ((powered.sum(-1) - known).clamp(min=1e-30) / outside).log()
    return _nll(topk_terms, label_term, label_in_topk, tail_term[:, None])


def sampled_tail_nll(reweighter_logits, topk_ids, topk_logprobs, labels, label_logprobs, alpha, tail_ids=None):
    reweighter = torch.log_softmax(reweighter_logits.float(), -1)
    label_in_topk = (topk_ids == labels[:, None]).any(-1)
    label_term = label_logprobs + alpha * reweighter.gather(-1, labels[:, None]).squeeze(-1)
    topk_terms = topk_logprobs.float() + alpha * reweighter.gather(-1, topk_ids)
    tail_mass = (1 - topk_logprobs.float().exp().sum(-1) - torch.where(label_in_topk, 0.0, label_logprobs.exp())).clamp(min=0)
    share = (tail_mass / tail_ids.shape[-1]).clamp(min=1e-30).log()
    tail_terms = share[:, None] + alpha * reweighter.gather(-1, tail_ids)
    return _nll(topk_terms, label_term, label_in_topk, torch.where(tail_mass[:, None] > 0, tail_terms, float("-inf")))


def zipf_tail_nll(reweighter_logits, topk_ids, topk_logprobs, labels, label_logprobs, alpha, tail_ids=None, fill=256):
    reweighter = torch.log_softmax(reweighter_logits.float(), -1)
    label_in_topk = (topk_ids == labels[:, None]).any(-1)
    label_term = label_logprobs + alpha * reweighter.gather(-1, labels[:, None]).squeeze(-1)
    topk_terms = topk_logprobs.float() + alpha * reweighter.gather(-1, topk_ids)
    tail_mass = (1 - topk_logprobs.float().exp().sum(-1) - torch.where(label_in_topk, 0.0, label_logprobs.exp())).clamp(min=0)
    k = topk_ids.shape[-1]
    ranked = topk_logprobs.float().sort(-1, descending=True).values
    slope = ((ranked[:, k // 2 - 1] - ranked[:, -1]) / torch.log(torch.tensor(2.0))).clamp(min=0.0)
    ranks = torch.arange(k + 1, k + 1 + fill, dtype=torch.float32, device=ranked.device)
    caps = (ranked[:, -1:] - slope[:, None] * torch.log(ranks / k)).exp()  # (N, fill), descending
    known_ids = torch.cat([topk_ids, labels[:, None]], -1)
    values, ids = reweighter.topk(k + 1 + fill, dim=-1)
    favourites = values.masked_fill((ids[:, :, None] == known_ids[:, None, :]).any(-1), float("-inf")).topk(fill, -1).values
    portions = (tail_mass[:, None] - (caps.cumsum(-1) - caps)).clamp(min=0.0).minimum(caps)
    masses = torch.cat([portions, (tail_mass - caps.sum(-1)).clamp(min=0.0)[:, None]], -1)
    rates = torch.cat([favourites, favourites[:, -1:]], -1)
    tail_terms = torch.where(masses > 0, masses.clamp(min=1e-30).log() + alpha * rates, float("-inf"))
    return _nll(topk_terms, label_term, label_in_topk, tail_terms)


def background_distribution(topk_ids, topk_logprobs, vocab_size, floor=0.01) -> torch.Tensor:
    """Mean probability each token gets inside the top-k over a cache's positions, mixed with `floor` uniform."""
    mass = torch.zeros(vocab_size, dtype=torch.float64)
    mass.index_add_(0, topk_ids.long().flatten(), topk_logprobs.double().exp().flatten())
    mass = mass / mass.sum()
    return ((1 - floor) * mass + floor / vocab_size).float()


def background_tail_nll(reweighter_logits, topk_ids, topk_logprobs, labels, label_logprobs, alpha, tail_ids=None,
                        background=None):
    reweighter = torch.log_softmax(reweighter_logits.float(), -1)
    label_in_topk = (topk_ids == labels[:, None]).any(-1)
    label_term = label_logprobs + alpha * reweighter.gather(-1, labels[:, None]).squeeze(-1)
    topk_terms = topk_logprobs.float() + alpha * reweighter.gather(-1, topk_ids)
    tail_mass = (1 - topk_logprobs.float().exp().sum(-1) - torch.where(label_in_topk, 0.0, label_logprobs.exp())).clamp(min=1e-30)
    outside = torch.ones_like(reweighter, dtype=torch.bool).scatter_(1, torch.cat([topk_ids, labels[:, None]], -1), False)
    log_background = background.log().to(reweighter.device).expand_as(reweighter)
    weighted = torch.logsumexp((log_background + alpha * reweighter).masked_fill(~outside, float("-inf")), -1)
    tail_term = tail_mass.log() + weighted - torch.logsumexp(log_background.masked_fill(~outside, float("-inf")), -1)
    return _nll(topk_terms, label_term, label_in_topk, tail_term[:, None])


def _nll(topk_terms, label_term, label_in_topk, tail_terms):
    extra = torch.where(label_in_topk, float("-inf"), label_term)
    return torch.logsumexp(torch.cat([topk_terms, extra[:, None], tail_terms], -1), -1) - label_term


class TruncatedCache:
    """A training_cache.py cache read at a smaller k, with an optional loss replacing the library's."""

    def __init__(self, cache, k, loss=None, tail_ids=None):
        self.cache, self.k, self.loss, self.tail_ids = cache, k, loss, tail_ids
        if cache.index["k"] < k:
            raise SystemExit(f"the cache has k={cache.index['k']} < {k}")

    def nll(self, reweighter_logits, batch, alpha):
        from hf_plugin.completions import completion_positions
        from hf_plugin.combine import align_vocab, combine_topk_nll

        c = self.cache
        rows = c.rows(batch["index"].tolist())
        labels = batch["labels"][:, 1:][completion_positions(batch["labels"])]
        arguments = (align_vocab(reweighter_logits, c.vocab_size), c.topk_ids[rows, : self.k].long(),
                     c.topk_logprobs[rows, : self.k], labels, c.label_logprobs[rows], alpha)
        if self.loss is None:
            return combine_topk_nll(*arguments)
        return self.loss(*arguments, tail_ids=None if self.tail_ids is None else self.tail_ids[rows].long())


@torch.no_grad()
def draw_tail_samples(base, examples, k, samples, pad_token_id) -> torch.Tensor:
    """`samples` tokens per completion position, drawn from the base distribution outside its top-k and label."""
    from hf_plugin.completions import completion_positions
    from hf_plugin.data import collate

    generator = torch.Generator().manual_seed(0)
    drawn = []
    for start in range(0, len(examples), 16):
        batch = collate(examples[start : start + 16], pad_token_id)
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        positions = completion_positions(batch["labels"])
        probs = torch.softmax(logits[:, :-1][positions].float(), -1)
        probs.scatter_(-1, probs.topk(k, -1).indices, 0.0)
        probs.scatter_(-1, batch["labels"][:, 1:][positions][:, None], 0.0)
        drawn.append(torch.multinomial(probs + 1e-30, samples, replacement=True, generator=generator))
    return torch.cat(drawn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/e2e_nlg")
    parser.add_argument("--work-dir", default="/tmp/hf-plugin-training-cache")
    parser.add_argument("--limit", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--treatments", default="bound,uniform,samples")
    parser.add_argument("--live-results", default=str(RESULTS / "training_cache.json"),
                        help="training_cache.py results holding the live-trained reweighter's full-logit NLL")
    parser.add_argument("--output", default=str(RESULTS / "tail_treatments.json"))
    args = parser.parse_args()

    from hf_plugin import PluginConfig, PluginModel
    from hf_plugin.base_cache import cached_base_sources
    from hf_plugin.base_logits import LiveBaseModel
    from hf_plugin.loading import load_base_model, offline_smollm2
    from hf_plugin.training import PluginTrainingArguments, completion_nll, train

    tokenizer, train_examples, validation_examples = training_cache.prepare(args)
    work = Path(args.work_dir)
    base, _ = load_base_model(offline_smollm2())
    live_nll = json.loads(Path(args.live_results).read_text())["summary"]["validation_nll_live"]
    caches, binding = cached_base_sources(lambda: base, tokenizer, {"train": train_examples, "validation": validation_examples},
                                          work / "cache", k=args.top_k, batch_size=16)
    results = {}
    for treatment in args.treatments.split(","):
        sources = []
        for name, examples in (("train", train_examples), ("validation", validation_examples)):
            cache = caches[name]
            loss, tail_ids = {"bound": None, "uniform": uniform_tail_nll, "samples": sampled_tail_nll,
                              "zipf": zipf_tail_nll, "background": background_tail_nll}[treatment], None
            if treatment == "samples":
                tail_ids = draw_tail_samples(base, examples, args.top_k, args.samples, tokenizer.pad_token_id)
            if treatment == "background":
                # One distribution, from the training cache's top-k only, for both splits.
                if name == "train":
                    background = background_distribution(cache.topk_ids[:, : args.top_k],
                                                         cache.topk_logprobs[:, : args.top_k], cache.vocab_size)
                loss = functools.partial(background_tail_nll, background=background)
            sources.append(TruncatedCache(cache, args.top_k, loss, tail_ids))
        torch.manual_seed(0)
        plugin = PluginModel(PluginConfig(vocab_size=binding["base_vocab_size"], max_position_embeddings=256, **binding))
        started = time.perf_counter()
        output_dir = work / f"tail-{treatment}"
        train(plugin, train_examples, validation_examples, sources[0],
              PluginTrainingArguments(output_dir=str(output_dir), epochs=args.epochs, batch_size=16, learning_rate=1e-3,
                                      patience=0, seed=0, overwrite_output_dir=True),
              validation_source=sources[1], tokenizer=tokenizer)
        seconds = time.perf_counter() - started
        trained = PluginModel.from_pretrained(output_dir).eval()
        total, count = completion_nll(trained, validation_examples, LiveBaseModel(base), 1.0, tokenizer.pad_token_id,
                                      batch_size=16)
        results[treatment] = {"validation_nll_full_logits": total / count, "train_seconds": seconds,
                              "gap_percent_vs_live": 100 * (total / count - live_nll) / live_nll}
        print(treatment, json.dumps(results[treatment]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    output = {"results": results, "live_validation_nll_full_logits": live_nll,
              "meta": {"command": " ".join(["python benchmarks/tail_treatments.py"] + sys.argv[1:]), "commit": commit,
                       "top_k": args.top_k, "samples": args.samples, "limit": args.limit, "epochs": args.epochs}}
    Path(args.output).write_text(json.dumps(output, indent=2) + "\n")


if __name__ == "__main__":
    main()
