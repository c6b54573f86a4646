"""`hf-plugin demo`: adapt SmolLM2-135M-Instruct to a house style it does not produce zero-shot, offline.

The task is generated here, seeded: weather records to one-line reports in a fixed format. The base model is
used as a black box through a top-k cache of its log-probs; a small reweighter is trained on it; base and base
+ reweighter are then compared on held-out records.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .base_cache import cached_base_sources
from .configuration_plugin import PluginConfig
from .data import Example, encode_examples
from .logits_process import PluginLogitsProcessor
from .metrics import bleu, rouge_l
from .modeling_plugin import PluginModel
from .training import PluginTrainingArguments, train


CITIES = ["Oslo", "Lisbon", "Nairobi", "Lima", "Osaka", "Denver", "Cairo", "Dublin", "Hanoi", "Perth", "Quito",
          "Tunis", "Riga", "Austin", "Seville", "Bergen", "Male", "Kyoto", "Porto", "Accra"]
SKIES = ["sunny", "cloudy", "rainy", "foggy", "windy", "snowy"]


@dataclass
class WeatherRecord:
    city: str
    sky: str
    temperature: int

    def prompt(self) -> str:
        return f"Record: city={self.city}; sky={self.sky}; temp={self.temperature}\nReport:"

    def report(self) -> str:
        """The house style: city in capitals, fixed separators, and a verdict that follows from the record."""
        verdict = "stay in" if self.sky in ("rainy", "snowy") or self.temperature < 5 else "go out"
        return f"{self.city.upper()} | {self.sky} | {self.temperature}C | verdict: {verdict}."


def weather_records(count: int, seed: int) -> list[WeatherRecord]:
    rng = random.Random(seed)
    return [WeatherRecord(rng.choice(CITIES), rng.choice(SKIES), rng.randint(-10, 35)) for _ in range(count)]


def corpus_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and mean ROUGE-L F1 against one reference each, both on a 0-100 scale."""
    groups = [[reference] for reference in references]
    try:
        return {"BLEU": bleu(predictions, groups), "ROUGE-L": rouge_l(predictions, groups)}
    except ImportError as error:
        raise SystemExit(f"error: the demo's scores need the eval extra: {error}") from error


@torch.no_grad()
def generate_reports(base, tokenizer, prompts: list[str], processors: list, max_new_tokens: int = 32) -> list[str]:
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    out = base.generate(**inputs, logits_processor=processors, max_new_tokens=max_new_tokens, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [text.strip().split("\n")[0] for text in texts]


def run_demo(base, tokenizer, output_dir: str | Path, train_size: int = 400, test_size: int = 40, epochs: int = 8,
             seed: int = 0) -> dict:
    """Trains a reweighter on the weather task from a top-k cache of `base` and compares it with `base` alone.

    Returns:
        `dict`: the scores of both, a few sample outputs, timings and where the reweighter was saved.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    records = weather_records(train_size + test_size, seed)
    train_records, test_records = records[:train_size], records[train_size:]
    pairs = [Example(r.prompt(), r.report(), i) for i, r in enumerate(train_records)]
    validation_pairs, training_pairs = pairs[: train_size // 10], pairs[train_size // 10 :]
    train_examples = encode_examples(tokenizer, training_pairs, max_length=64)
    validation_examples = encode_examples(tokenizer, validation_pairs, max_length=64)

    sources, binding = cached_base_sources(lambda: base, tokenizer, {"train": train_examples, "validation": validation_examples},
                                           output_dir / "cache", k=64, batch_size=16)
    cache_seconds = time.perf_counter() - started

    torch.manual_seed(seed)
    config = PluginConfig(vocab_size=base.get_output_embeddings().weight.shape[0], hidden_size=256,
                          intermediate_size=1024, max_position_embeddings=128, **binding)
    args = PluginTrainingArguments(output_dir=str(output_dir / "reweighter"), epochs=epochs, batch_size=16,
                                   learning_rate=2e-3, weight_decay=0.1, patience=2, seed=seed,
                                   overwrite_output_dir=True)  # the demo redoes everything on each run
    plugin = train(PluginModel(config), train_examples, validation_examples, sources["train"], args,
                   validation_source=sources["validation"], tokenizer=tokenizer)
    train_seconds = time.perf_counter() - started - cache_seconds

    prompts = [r.prompt() for r in test_records]
    references = [r.report() for r in test_records]
    outputs = {
        "base": generate_reports(base, tokenizer, prompts, []),
        "base + reweighter": generate_reports(base, tokenizer, prompts, [PluginLogitsProcessor(plugin.eval(), tokenizer=tokenizer)]),
    }
    return {
        "scores": {name: corpus_scores(predictions, references) for name, predictions in outputs.items()},
        "samples": [{"prompt": p, "reference": r, **{n: o[i] for n, o in outputs.items()}}
                    for i, (p, r) in enumerate(zip(prompts[:3], references[:3]))],
        "seconds": {"cache": cache_seconds, "training": train_seconds, "total": time.perf_counter() - started},
        "saved_to": str(output_dir / "reweighter"),
    }


def format_demo_report(result: dict) -> str:
    lines = ["", "| | BLEU | ROUGE-L |", "| --- | --- | --- |"]
    lines += [f"| {name} | {s['BLEU']:.1f} | {s['ROUGE-L']:.1f} |" for name, s in result["scores"].items()]
    for sample in result["samples"]:
        lines += ["", sample["prompt"].replace("\n", " "), f"  reference:         {sample['reference']}",
                  f"  base:              {sample['base']}", f"  base + reweighter: {sample['base + reweighter']}"]
    seconds = result["seconds"]
    lines += ["", f"Cache pass {seconds['cache']:.0f}s, training {seconds['training']:.0f}s, total {seconds['total']:.0f}s.",
              f"Reweighter saved to {result['saved_to']}"]
    return "\n".join(lines)
