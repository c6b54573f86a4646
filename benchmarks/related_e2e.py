"""Weak to strong in miniature on E2E NLG: the related logit-level methods against the Plugin one, on CPU.

Large model: SmolLM2-135M-Instruct (the offline GGUF, as in `e2e_nlg.py`). Small base: its embeddings, first
`--layers` decoder layers (of 30), final norm and head, copied (`hf_plugin.first_layers`, pretrained weights). Experts:
that small base fine-tuned with plain NLL on the completions through the library's training loop
(`hf_plugin.training.train`, Accelerate; the loss is `e2e_nlg.AloneNLL`), every weight trainable:
  E2E expert      on a seeded random `--train-pairs` of the E2E training part (the train/held-out split of
                  `e2e_nlg.py`), prompt 'Data: {mr}\\nSentence:' and the reference as completion;
  parsing expert  the reverse task on other pairs of the same part: prompt 'Sentence: {ref}\\nData:', the MR as
                  completion (text to meaning representation), `--parse-pairs` of them.
Both: one epoch (`--epochs`), batch 8, learning rate `--learning-rate`, validated on a seeded random 100 held-out
pairs of their own task.

Rows, on the first `--test-mrs` distinct MRs of the cleaned test split (file order), with the decoding of
`e2e_nlg.py` (greedy, repetition penalty 1.1, at most 64 new tokens, cut at the first newline):
  large zero-shot; E2E expert alone; proxy-tuning (expert = E2E expert, anti-expert = small base, α 1);
  DExperts-style (the same with the base's top-0.9 nucleus); Dynamic Logit Fusion with the E2E expert, and with
  both experts (small base as Q, the paper's grid 0..2); Plugin (the from-scratch reweighter of `e2e_nlg.py`,
  read from `--plugin-dir`, α 1).
Scores: the E2E challenge's metrics (`hf_plugin.e2e_metrics`) and the built-in ones, through `e2e_nlg.score`.
Speed: seconds per decoding step (of a batch of 32 rows) relative to the large model alone, in the same run.

The copied first layers are no language model (their held-out E2E NLL is far above the uniform distribution's:
the early exit through the final norm and head is noise), so a variant heals the small base first:
`--heal-chunks N` trains it (plain NLL, 1 epoch, `--heal-learning-rate`) on N chunks of generic English that ships
with Python (the documentation topics of `pydoc_data`, 48 words each: the first 8 as prompt, the rest as
completion), and the experts are fine-tuned from that healed base; results go to related_e2e_healed.*.

Usage:
    python benchmarks/related_e2e.py --data-dir ../shared/data/e2e_nlg            # the recorded run
    python benchmarks/related_e2e.py --data-dir ../shared/data/e2e_nlg --heal-chunks 400   # the healed variant
    python benchmarks/related_e2e.py --data-dir ../shared/data/e2e_nlg --quick    # smoke: 8 MRs, 40 pairs
Resumable: the experts are saved in `--work-dir` and reused, each row's outputs kept in the results JSON.
Results: benchmarks/results/related_e2e.{json,md} (--quick: related_e2e_quick.*).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor

sys.path.insert(0, str(Path(__file__).parent))
from e2e_nlg import (AloneNLL, GENERATION, MAX_LENGTH, TEMPLATE, generate, group_by_mr, names_in,  # noqa: E402
                     read_pairs, score, slice_tables, train_one)


RESULTS = Path(__file__).parent / "results"
PARSE_TEMPLATE = "Sentence: {ref}\nData:"
BATCH_SIZE = 32


class StepCounter(LogitsProcessor):
    """Counts generate()'s decoding steps (it leaves the scores alone): the denominator of the time per step."""

    def __init__(self):
        self.steps = 0

    def reset(self):
        pass

    def __call__(self, input_ids, scores):
        self.steps += 1
        return scores


def fusion_with_record(pad_token_id: int):
    """`DynamicLogitFusionLogitsProcessor` that keeps its (expert, α) choices of the rows still generating across the
    per-batch resets of `e2e_nlg.generate`."""
    from hf_plugin import DynamicLogitFusionLogitsProcessor

    class RecordedFusion(DynamicLogitFusionLogitsProcessor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.kept = []

        def __call__(self, input_ids, scores):
            out = super().__call__(input_ids, scores)
            live = input_ids[:, -1] != pad_token_id  # a finished row is padded from then on
            self.kept.append((self.choices[-1]["expert"][live], self.choices[-1]["alpha"][live]))
            return out

        def summary(self) -> dict:
            experts = torch.cat([e for e, _ in self.kept])
            alphas = torch.cat([a for _, a in self.kept])
            return {"steps of live rows": len(experts),
                    "share choosing each expert": [round(float((experts == i).float().mean()), 3)
                                                   for i in range(len(self.auxiliaries) - 1)],
                    "mean alpha": round(float(alphas.mean()), 3),
                    "share alpha 0": round(float((alphas == 0).float().mean()), 3)}

    return RecordedFusion


def generic_text(chunks: int) -> list:
    """`chunks` pieces of 48 words of the English documentation topics shipped with Python (8 words of prompt, 40 of
    completion): generic text to heal the copied layers into a language model."""
    from pydoc_data.topics import topics

    from hf_plugin.data import Example

    words = " ".join(topics[key] for key in sorted(topics)).split()
    pieces = [words[i : i + 48] for i in range(0, len(words) - 48, 48)][:chunks]
    return [Example(" ".join(piece[:8]), " ".join(piece[8:]), row) for row, piece in enumerate(pieces)]


def train_expert(name: str, small_base_factory, train_examples, heldout_examples, work: Path, tokenizer, args,
                 learning_rate: float | None = None) -> dict:
    """Fine-tunes (or reloads) one expert from the small base with plain NLL, through `e2e_nlg.train_one`."""
    return train_one(name, small_base_factory, train_examples, heldout_examples, AloneNLL(), None, work, tokenizer,
                     args.epochs, learning_rate or args.learning_rate, batch_size=8, patience=0)


@torch.no_grad()
def layer_probe(base, examples, pad_token_id: int, layers: list[int]) -> dict:
    """Held-out NLL per completion token of the base's first K layers (copied, untrained), and of the whole base."""
    from hf_plugin import PluginModel, first_layers
    from hf_plugin.training import completion_nll

    probe = {}
    for k in layers + [base.config.num_hidden_layers]:
        small = PluginModel.from_causal_lm(first_layers(base, k)).eval()
        total, count = completion_nll(small, examples, AloneNLL(), 0.0, pad_token_id, batch_size=16)
        probe[k] = total / count
    return probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/e2e_nlg")
    parser.add_argument("--work-dir", default="/tmp/hf-plugin-related-e2e")
    parser.add_argument("--plugin-dir", default="/tmp/hf-plugin-e2e/plugin-scratch",
                        help="the from-scratch reweighter trained by e2e_nlg.py (the row is skipped without it)")
    parser.add_argument("--layers", type=int, default=4, help="K: the small base is the large model's first K layers")
    parser.add_argument("--test-mrs", type=int, default=100)
    parser.add_argument("--train-pairs", type=int, default=800, help="E2E pairs the E2E expert is trained on")
    parser.add_argument("--parse-pairs", type=int, default=800, help="pairs the parsing expert is trained on")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--heal-chunks", type=int, default=0,
                        help="first train the small base on this many chunks of generic text (0: the plain copy)")
    parser.add_argument("--heal-learning-rate", type=float, default=1e-3)
    parser.add_argument("--proxy-alphas", type=float, nargs="+", default=[1.0],
                        help="proxy-tuning's strengths: one proxy-tuning row each (DExperts uses the first)")
    parser.add_argument("--skip", nargs="*", choices=["parsing", "plugin"], default=[],
                        help="rows not to run: the parsing expert (and the two-expert fusion), the Plugin row")
    parser.add_argument("--quick", action="store_true", help="smoke: 8 test MRs, 40 training pairs per expert")
    args = parser.parse_args()
    if args.quick:
        args.test_mrs, args.train_pairs, args.parse_pairs = 8, 40, 40
        args.heal_chunks = min(args.heal_chunks, 40)

    from hf_plugin import PluginLogitsProcessor, PluginModel, ProxyTuningLogitsProcessor, binding_kwargs
    from hf_plugin.data import Example, encode_examples, split_by_prompt
    from hf_plugin.loading import load_base_model, offline_smollm2

    suffix = ("_healed" if args.heal_chunks else "") + ("_quick" if args.quick else "")
    path = RESULTS / f"related_e2e{suffix}.json"
    work = Path(args.work_dir + suffix)
    data_dir = Path(args.data_dir)
    test_groups = group_by_mr(read_pairs(data_dir / "test-fixed.csv"))
    mrs = list(test_groups)[: args.test_mrs]
    slices = {f"first {len(mrs)}": mrs}
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("meta", {}).get("test_mrs") != mrs:
        result = {"methods": {}}

    base, tokenizer = load_base_model(offline_smollm2())
    pad = tokenizer.pad_token_id

    # The split of e2e_nlg.py (so the experts see only the Plugin reweighter's training part), then seeded subsets.
    devel_pairs = read_pairs(data_dir / "devel-fixed.no-ol.csv")
    devel = [Example(TEMPLATE.format(mr=mr), ref, row) for row, (mr, ref) in enumerate(devel_pairs)]
    train_part, heldout_part = split_by_prompt(devel, 0.4, seed=0)
    order = random.Random(0).sample(range(len(train_part)), len(train_part))
    e2e_train = [train_part[i] for i in order[: args.train_pairs]]
    # The parsing expert's pairs: the next ones of the same shuffle, turned around (sentence -> MR).
    parse_source = [train_part[i] for i in order[args.train_pairs : args.train_pairs + args.parse_pairs]]
    heldout_size = 20 if args.quick else 100
    heldout = [heldout_part[i] for i in sorted(random.Random(1).sample(range(len(heldout_part)), heldout_size))]
    mr_of_row = {row: mr for row, (mr, _) in enumerate(devel_pairs)}

    def parsing(examples):
        return [Example(PARSE_TEMPLATE.format(ref=e.completion), mr_of_row[e.row], e.row) for e in examples]

    encode = lambda pairs: encode_examples(tokenizer, pairs, MAX_LENGTH)  # noqa: E731
    e2e_train_enc, e2e_heldout_enc = encode(e2e_train), encode(heldout)
    parse_train_enc, parse_heldout_enc = encode(parsing(parse_source)), encode(parsing(heldout))

    meta = result.setdefault("meta", {})
    meta.update({
        "command": " ".join(["python benchmarks/related_e2e.py"] + sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads (a shared 2-core machine)",
        "torch": torch.__version__, "template": TEMPLATE, "parse_template": PARSE_TEMPLATE, "decoding": GENERATION,
        "layers": args.layers, "test_mrs": mrs, "batch_size": BATCH_SIZE,
    })
    if "layer_probe" not in meta and not args.heal_chunks:
        probe_layers = [1, 2] if args.quick else [2, 4, 8]
        meta["layer_probe"] = layer_probe(base, e2e_heldout_enc, pad, probe_layers)
        print(f"held-out NLL/token of the first K layers: {meta['layer_probe']}", flush=True)

    def copied_layers():
        torch.manual_seed(0)
        return PluginModel.from_base_layers(base, args.layers, **binding_kwargs(base, tokenizer))

    small_base_model, healing = copied_layers, ()
    if args.heal_chunks:
        healed = train_expert("small-base-healed", copied_layers, encode(generic_text(args.heal_chunks)),
                              e2e_heldout_enc, work, tokenizer, args, learning_rate=args.heal_learning_rate)
        meta["healing"] = {k: v for k, v in healed.items() if k != "model"}
        healing = ({**meta["healing"], "trainable_parameters": 0},)  # its seconds count; its weights are the experts'
        small_base_model = lambda: PluginModel.from_pretrained(work / "small-base-healed")  # noqa: E731
    small_base = small_base_model().eval()
    print(f"train: E2E expert {len(e2e_train_enc)} pairs, parsing expert {len(parse_train_enc)} pairs; held-out "
          f"{heldout_size} each; test {len(mrs)} MRs", flush=True)
    e2e_expert = train_expert("expert-e2e", small_base_model, e2e_train_enc, e2e_heldout_enc, work, tokenizer, args)
    experts = {"E2E": e2e_expert}
    if "parsing" not in args.skip:
        experts["parsing"] = parse_expert = train_expert("expert-parse", small_base_model, parse_train_enc,
                                                         parse_heldout_enc, work, tokenizer, args)
    meta["experts"] = {name: {k: v for k, v in run.items() if k != "model"} for name, run in experts.items()}
    plain = [TEMPLATE.format(mr=mr) for mr in mrs]

    def record(name: str, model, processors=lambda: [], trained: tuple = (), **extra) -> None:
        if name in result["methods"]:
            print(f"{name}: outputs reused", flush=True)
            return
        counter, made = StepCounter(), processors()
        started = time.perf_counter()
        outputs = generate(model, tokenizer, plain, made + [counter], BATCH_SIZE)
        seconds = time.perf_counter() - started
        fusion = [p.summary() for p in made if hasattr(p, "summary")]
        result["methods"][name] = {
            "outputs": outputs, "generation_seconds": seconds, "decoding_steps": counter.steps,
            "seconds_per_step": seconds / counter.steps,
            "train_seconds": sum(run["seconds"] for run in trained),
            "trainable_parameters": sum(run["trainable_parameters"] for run in trained),
            **({"fusion_choices": fusion[0]} if fusion else {}), **extra}
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"{name}: {seconds:.0f}s, {counter.steps} steps; first output: {outputs[0]}", flush=True)

    Fusion = fusion_with_record(pad)
    record("large zero-shot", base)
    one = healing + (e2e_expert,)
    record("E2E expert alone", e2e_expert["model"].backbone, trained=one)
    for alpha in args.proxy_alphas:
        record(f"proxy-tuning (α {alpha:g})", base,
               lambda: [ProxyTuningLogitsProcessor(e2e_expert["model"], small_base, alpha=alpha, tokenizer=tokenizer)],
               one, alpha=alpha)
    alpha = args.proxy_alphas[0]
    record(f"DExperts-style (α {alpha:g}, top-p 0.9)", base,
           lambda: [ProxyTuningLogitsProcessor(e2e_expert["model"], small_base, alpha=alpha, plausibility_top_p=0.9,
                                               tokenizer=tokenizer)], one, alpha=alpha)
    record("Dynamic Logit Fusion, E2E expert", base,
           lambda: [Fusion([e2e_expert["model"]], small_base, tokenizer=tokenizer)], one)
    if "parsing" in experts:
        record("Dynamic Logit Fusion, E2E + parsing experts", base,
               lambda: [Fusion([e2e_expert["model"], parse_expert["model"]], small_base, tokenizer=tokenizer)],
               one + (parse_expert,))
    plugin_dir = Path(args.plugin_dir)
    if "plugin" not in args.skip and (plugin_dir / "model.safetensors").exists():
        plugin = PluginModel.from_pretrained(plugin_dir).eval()
        run = json.loads((plugin_dir / "benchmark_run.json").read_text())
        record("Plugin (from scratch, α 1)", base,
               lambda: [PluginLogitsProcessor(plugin, alpha=1.0, tokenizer=tokenizer)],
               ({"seconds": run["seconds"], "trainable_parameters": run["trainable_parameters"]},), alpha=1.0,
               train_pairs=json.loads((plugin_dir / "metrics.json").read_text()).get("training examples"))
    elif "plugin" not in args.skip:
        meta["plugin_missing"] = f"no reweighter at {plugin_dir}: the Plugin row was not run"
        print(meta["plugin_missing"], flush=True)

    score(result, test_groups, slices, path, names_in(data_dir / "devel-fixed.no-ol.csv"))
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    meta, methods = result["meta"], result["methods"]
    reference = methods["large zero-shot"]["seconds_per_step"]
    batches = math.ceil(len(meta["test_mrs"]) / meta["batch_size"])
    prefill_only = lambda row: row["decoding_steps"] <= batches  # noqa: E731
    experts = meta["experts"]
    lines = [
        "# Weak to strong in miniature on E2E: the related logit-level methods", "",
        f"`{meta['command']}` at commit {meta['commit']} ({meta['machine']}, torch {meta['torch']}).",
        f"Large: SmolLM2-135M-Instruct (30 layers). Small base: its first {meta['layers']} layers, copied"
        + (", then healed on generic text (below)" if meta.get("healing") else "") + ". Greedy, "
        f"repetition penalty 1.1, at most 64 new tokens, prompt `{meta['template']!r}`, cut at the first newline; "
        f"batches of {meta['batch_size']}.", "",
        "Experts (every weight trainable, plain NLL on the completions, `hf_plugin.training.train`):", "",
        "| model | task | train pairs | epochs | lr | held-out NLL/token: start → trained | train s | params |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    tasks = {"E2E": f"`{meta['template']!r}` → reference", "parsing": f"`{meta['parse_template']!r}` → MR",
             "small base healing": "Python's documentation topics, 8 words → the next 40"}
    if meta.get("healing"):
        experts = {"small base healing": meta["healing"], **experts}
    for name, run in experts.items():
        lines.append(f"| {name} | {tasks[name]} | {run['train_pairs']} | {run['epochs']} | {run['learning_rate']} | "
                     f"{run['base_heldout_nll']:.3f} → {min(run['history']):.3f} | "
                     f"{run['seconds']:.0f} | {run['trainable_parameters']:,} |")
    lines.append("")
    if meta.get("layer_probe"):
        probe = ", ".join(f"K={k}: {v:.2f}" for k, v in meta["layer_probe"].items())
        lines += [f"Held-out E2E NLL/token of the large model's first K layers, untrained: {probe} (uniform: "
                  f"{math.log(49152):.2f}).", ""]
    for slice_name in next(iter(methods.values()))["scores"]:
        lines += [f"## {slice_name} test MRs (file order)", ""]
        lines += slice_tables(methods, slice_name, {
            "time/step vs large": lambda row: f"{row['seconds_per_step'] / reference:.2f}{'†' if prefill_only(row) else ''}",
            "train s": lambda row: f"{row['train_seconds']:.0f}",
            "trainable params": lambda row: f"{row['trainable_parameters']:,}"})
        if any(map(prefill_only, methods.values())):
            lines += ["† Every row stopped at its first token (an empty output): the time is the prompts' prefill in "
                      "all models, not a decoding step.", ""]
    lines += ["Decoding: " + "; ".join(f"{name} {row['generation_seconds']:.0f}s / {row['decoding_steps']} steps"
                                       for name, row in methods.items()) + ".", ""]
    for name, row in methods.items():
        if "fusion_choices" in row:
            lines.append(f"- {name}, choices over the live rows' steps: {json.dumps(row['fusion_choices'])}")
    if meta.get("plugin_missing"):
        lines.append(f"- {meta['plugin_missing']}")
    lines += ["", f"First test MR: `{meta['test_mrs'][0]}`", ""]
    lines += [f"- {name}: {row['outputs'][0]}" for name, row in methods.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
