"""Unlearning in miniature with ULD: SmolLM2-135M-Instruct forgets some capitals it knows, keeps the others.

The facts are "What is the capital of X?" questions in the base's chat template, answered "The capital of X is Y."
(the base's own phrasing). Only those the base answers correctly (greedy) are used: the
first `--forget` of them (in the fixed order below) are the forget set, the last `--held-out` are retain questions
the assistant never sees, and the rest are the retain set it is trained on. ULD's assistant is the base's first
`--layers` layers with LoRA adapters (`hf_plugin.unlearning.train_assistant`, loss NLL(forget) + 5 KL(uniform ‖ q)
(retain)); decoding uses `LogitDifferenceLogitsProcessor` (r 1e-2, each `--betas`).

Reported for each set, base vs ULD: NLL per answer token (teacher-forced; tokens outside ULD's plausibility mask
are counted apart, as their NLL is infinite), greedy accuracy (the capital in the answer), and a few generations.

Usage:
    python benchmarks/related_unlearning.py              # the recorded configuration
    python benchmarks/related_unlearning.py --learning-rate 1e-2 --epochs 20 --output related_unlearning_lr1e-2.json
    python benchmarks/related_unlearning.py --quick      # a short smoke run (1 epoch)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from hf_plugin import LogitDifferenceLogitsProcessor
from hf_plugin.data import Example, encode_examples
from hf_plugin.loading import load_base_model, offline_smollm2
from hf_plugin.methods import logit_difference_scores
from hf_plugin.training import PluginTrainingArguments
from hf_plugin.unlearning import kl_from_uniform, train_assistant


RESULTS = Path(__file__).parent / "results"
CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"), ("England", "London"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
    ("Kenya", "Nairobi"), ("Cuba", "Havana"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
    ("Mexico", "Mexico City"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Turkey", "Ankara"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("India", "New Delhi"), ("Chile", "Santiago"), ("Colombia", "Bogotá"),
    ("Venezuela", "Caracas"), ("Vietnam", "Hanoi"), ("the Philippines", "Manila"), ("Indonesia", "Jakarta"),
]


def question(tokenizer, country: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": f"What is the capital of {country}?"}],
                                         tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def greedy_answers(base, tokenizer, prompts, processors_of=lambda: [], new_tokens=12) -> list[str]:
    answers = []
    for start in range(0, len(prompts), 8):
        batch = tokenizer(prompts[start:start + 8], return_tensors="pt", padding=True)
        out = base.generate(**batch, logits_processor=processors_of(), max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
        answers += [text.strip() for text in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                                    skip_special_tokens=True)]
    return answers


@torch.no_grad()
def answer_nll(base, assistant, examples, beta, relative_top) -> dict:
    """Teacher-forced NLL per answer token under the base and under ULD; tokens outside ULD's mask apart."""
    base_total = uld_total = 0.0
    tokens = masked = 0
    for example in examples:
        ids = torch.tensor([example.input_ids])
        target_logits, assistant_logits = base(ids).logits[0, :-1], assistant(ids).logits[0, :-1]
        labels = torch.tensor(example.labels[1:])
        keep = labels != -100
        base_log_probs = target_logits.log_softmax(-1)[keep].gather(-1, labels[keep, None]).squeeze(-1)
        uld_log_probs = logit_difference_scores(target_logits, assistant_logits, beta, relative_top)[keep]
        uld_log_probs = uld_log_probs.gather(-1, labels[keep, None]).squeeze(-1)
        inside = torch.isfinite(uld_log_probs)
        base_total -= float(base_log_probs.sum())
        uld_total -= float(uld_log_probs[inside].sum())
        tokens += int(keep.sum())
        masked += int((~inside).sum())
    return {"answer tokens": tokens, "base NLL/token": base_total / tokens,
            "ULD NLL/token (tokens inside its mask)": uld_total / max(tokens - masked, 1),
            "answer tokens outside ULD's mask": masked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forget", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=6)
    parser.add_argument("--layers", type=int, default=8, help="of SmolLM2's 30 layers (ULD: 8 of 32)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.75], help="ULD's decoding weights to try")
    parser.add_argument("--relative-top", type=float, default=1e-2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default="related_unlearning.json", help="file name under benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 1
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base, tokenizer = load_base_model(offline_smollm2())
    answers = greedy_answers(base, tokenizer, [question(tokenizer, country) for country, _ in CAPITALS])
    known = [(country, capital) for (country, capital), answer in zip(CAPITALS, answers) if capital in answer]
    forget, retain, held_out = known[:args.forget], known[args.forget:-args.held_out], known[-args.held_out:]
    encode = lambda pairs: encode_examples(tokenizer, [
        Example(question(tokenizer, country), f"The capital of {country} is {capital}.", i)
        for i, (country, capital) in enumerate(pairs)], 128, separator="")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        training = PluginTrainingArguments(output_dir=folder + "/assistant", epochs=args.epochs, batch_size=8,
                                           learning_rate=args.learning_rate, patience=0)
        assistant = train_assistant(base, encode(forget), encode(retain), training, num_layers=args.layers,
                                    lora_rank=args.lora_rank, tokenizer=tokenizer).eval()
        metrics = (Path(folder) / "assistant" / "metrics.json").read_text()
    training_seconds = time.perf_counter() - started

    record = {"base": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
              "assistant validation loss (its training data)": json.loads(metrics)["history"],
              "settings": {**vars(args), "assistant loss beta": 5.0, "batch size": 8},
              "known capitals": f"{len(known)} of {len(CAPITALS)}", "training seconds": training_seconds, "sets": {}}
    for name, pairs in (("forget", forget), ("retain (trained on)", retain), ("retain (held out)", held_out)):
        questions = [question(tokenizer, country) for country, _ in pairs]
        base_answers = greedy_answers(base, tokenizer, questions)
        correct = lambda outputs: sum(capital in output for (_, capital), output in zip(pairs, outputs))
        flatness = kl_from_uniform(assistant, encode(pairs))
        entry = {"questions": len(pairs), "base greedy correct": correct(base_answers),
                 "assistant KL(uniform || q) per answer position": flatness}
        for beta in args.betas:
            uld = lambda: [LogitDifferenceLogitsProcessor(assistant, beta=beta, relative_top=args.relative_top,
                                                          tokenizer=tokenizer)]
            uld_answers = greedy_answers(base, tokenizer, questions, uld)
            entry[f"ULD beta {beta}"] = {
                **answer_nll(base, assistant, encode(pairs), beta, args.relative_top),
                "ULD greedy correct": correct(uld_answers),
                "generations (country, base, ULD)": [[country, b, u] for (country, _), b, u
                                                     in list(zip(pairs, base_answers, uld_answers))[:4]],
            }
        record["sets"][name] = entry
        print(json.dumps({name: entry}, indent=2, ensure_ascii=False))
    record["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=Path(__file__).parent).stdout.strip()
    record["machine"] = f"{platform.machine()}, torch {torch.__version__}, 1 thread"
    if not args.quick:
        (RESULTS / args.output).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
