"""A second data-to-text set under shift: ViGGO split by game genre (`benchmarks/data/viggo`), every test game unseen.

SmolLM2-135M-Instruct (offline GGUF) is the black box, as in `e2e_nlg.py`, with the same template, decoding (greedy,
repetition penalty 1.1, at most 64 new tokens, cut at the first newline) and scoring (the E2E challenge's metrics
against all references of an MR, and the built-in ones). Trained on the train categories' 3,000 pairs; early stopping
and α on the held-out pairs (train categories, other MRs); tested on the 445 MRs of 7 other categories.

Rows: zero-shot; ICL-3 (the first 3 distinct train MRs with their first reference); the weighted combination and the
small model alone (as in `e2e_nlg.py`, w = 0.75); the from-scratch Plugin; the Plugin with copy modes (`shared` with
word starts; with spelled words and the frequent ids kept by the reweighter; with the copy pointer, at each id's last
occurrence or at every occurrence, and with coverage, see `hf_plugin.copying`); these used with the ICL-3 prompt (α
picked on 3-shot held-out pairs); and copy-mode Plugins trained on 3-shot prompts (with and without the pointer and
coverage), used with ICL-3. The name-miss columns count outputs that lack the MR's `name[...]` value (every test
game is unseen).

Usage:
    python benchmarks/viggo.py                 # about 2 hours on 2 cores
    python benchmarks/viggo.py --rows copy     # the copy-mode rows only (--rows baselines: the others)
    python benchmarks/viggo.py --quick         # a smoke run
    python benchmarks/viggo.py --score-only    # score the outputs saved so far (e.g. after an interrupted run)
Results: benchmarks/results/viggo.{json,md}; trained models and caches in --work-dir, reused when run again.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e_nlg import (CONTINUATION, COVERAGE, EVERY, POINTER, RUN_COLUMNS, SPELLED_FREQUENT, SPELLED_POINTER, SPELLED_UNCOPIED, AloneNLL, GENERATION,  # noqa: E402
                     TEMPLATE, MixtureNLL, copy_reweighter, generate, icl_prompt, mixture_processor, new_reweighter,
                     pick_alpha, result_tail, score, slice_tables, train_one)


DATA = Path(__file__).parent / "data" / "viggo"
RESULTS = Path(__file__).parent / "results"
MAX_LENGTH = 192
SPELLED = "Plugin, copy shared + spelled words, frequent ids kept"
UNCOPIED = "Plugin, copy shared + spelled words, uncopied ids kept"
COVERED = "Plugin, copy shared + word starts + pointer, every occurrence, coverage"
SPELLED_CONTINUED = "Plugin, copy shared + spelled words + pointer, every occurrence, coverage, continuation"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--work-dir", default="/tmp/hf-plugin-viggo")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 24 test MRs, 200 training pairs, one epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--task-vocab-size", type=int, default=2048)
    parser.add_argument("--alphas", default="0.25,0.5,0.75,1.0,1.5")
    parser.add_argument("--rows", choices=["all", "copy", "baselines"], default="all",
                        help="only the copy-mode rows, or only the from-scratch Plugin and the baselines (outputs "
                             "already in the results are kept either way)")
    parser.add_argument("--score-only", action="store_true", help="no run: score the saved outputs")
    args = parser.parse_args()

    suffix = "_quick" if args.quick else ""
    path = RESULTS / f"viggo{suffix}.json"
    work = Path(args.work_dir + suffix)
    data_dir = Path(args.data_dir)
    epochs = 1 if args.quick else args.epochs
    alphas = [float(a) for a in args.alphas.split(",")]

    train_rows, heldout_rows, test_rows = (read_rows(data_dir / f"{name}.csv") for name in ("train", "heldout", "test"))
    test_groups: dict[str, list[str]] = {}
    for row in test_rows:
        test_groups.setdefault(row["mr"], []).append(row["ref"])
    test_mrs = list(test_groups)[:24] if args.quick else list(test_groups)
    if args.quick:
        train_rows, heldout_rows = train_rows[:200], heldout_rows[:60]
    slices = {f"test {len(test_mrs)}": test_mrs}

    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("meta", {}).get("test_mrs") != test_mrs:
        result = {"methods": {}}
    if not args.score_only:
        run_methods(args, path, work, epochs, alphas, train_rows, heldout_rows, test_mrs, result)
    seen = {name for r in train_rows for name in [r["entity"]] if name}
    score(result, test_groups, slices, path, seen)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def run_methods(args, path, work, epochs, alphas, train_rows, heldout_rows, test_mrs, result) -> None:
    from hf_plugin import PluginLogitsProcessor
    from hf_plugin.base_cache import cached_base_sources
    from hf_plugin.data import Example, encode_examples, with_demonstrations
    from hf_plugin.loading import load_base_model, offline_smollm2

    base, tokenizer = load_base_model(offline_smollm2())
    pad = tokenizer.pad_token_id
    train_pairs = [Example(TEMPLATE.format(mr=r["mr"]), r["ref"], i) for i, r in enumerate(train_rows)]
    heldout_pairs = [Example(TEMPLATE.format(mr=r["mr"]), r["ref"], i) for i, r in enumerate(heldout_rows)]
    train_examples = encode_examples(tokenizer, train_pairs, MAX_LENGTH)
    heldout_examples = encode_examples(tokenizer, heldout_pairs, MAX_LENGTH)
    first_refs: dict[str, str] = {}
    for row in train_rows:
        first_refs.setdefault(row["mr"], row["ref"])
    demonstrations = list(first_refs.items())[:3]
    icl_heldout_pairs = with_demonstrations(heldout_pairs, train_pairs, 3, seed=1)
    icl_heldout_examples = encode_examples(tokenizer, icl_heldout_pairs, 4 * MAX_LENGTH)
    print(f"train {len(train_examples)} pairs, held-out {len(heldout_examples)}, test {len(test_mrs)} MRs", flush=True)

    result.setdefault("meta", {}).update({
        "command": " ".join(["python benchmarks/viggo.py"] + sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__,
        "template": TEMPLATE, "decoding": GENERATION, "train_pairs": len(train_examples),
        "heldout_pairs": len(heldout_examples), "alpha_grid": alphas, "epochs": epochs, "test_mrs": test_mrs,
        "demonstrations": demonstrations,
    })
    timings = result["meta"].setdefault("cache_seconds", {})
    plain = [TEMPLATE.format(mr=mr) for mr in test_mrs]
    icl3 = [icl_prompt(mr, demonstrations) for mr in test_mrs]

    def record(name, run_generation, learned=None, **extra):
        if name in result["methods"]:
            print(f"{name}: outputs reused", flush=True)
            return
        started = time.perf_counter()
        outputs = run_generation()
        result["methods"][name] = {
            "outputs": outputs, "generation_seconds": time.perf_counter() - started,
            "train_seconds": learned["seconds"] if learned else 0.0,
            "trainable_parameters": learned["trainable_parameters"] if learned else 0,
            "heldout_nll_by_epoch": learned["history"] if learned else None, **extra}
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"{name}: first output: {outputs[0]}", flush=True)

    def plugin_row(name, learned, prompts, alpha_source, alpha_examples):
        if name in result["methods"]:
            return record(name, None)
        alpha, nlls = pick_alpha(learned["model"], alpha_examples, alpha_source, alphas, pad)
        print(f"  {name}: held-out NLL by α {json.dumps({a: round(v, 4) for a, v in nlls.items()})}", flush=True)
        processor = PluginLogitsProcessor(learned["model"], alpha=alpha, tokenizer=tokenizer)
        record(name, lambda: generate(base, tokenizer, prompts, [processor]), learned, alpha=alpha,
               heldout_nll_by_alpha=nlls)

    def trained(name, make_model, train_source, heldout_source, train_=None, heldout_=None):
        return train_one(name, make_model, train_ or train_examples, heldout_ or heldout_examples, train_source,
                         heldout_source, work, tokenizer, epochs, 1e-3)

    record("zero-shot", lambda: generate(base, tokenizer, plain))
    record("ICL-3", lambda: generate(base, tokenizer, icl3))
    started = time.perf_counter()
    caches, binding = cached_base_sources(lambda: base, tokenizer, {"train": train_examples, "heldout": heldout_examples},
                                          work / "cache", k=args.top_k, batch_size=16, task_vocab_size=args.task_vocab_size)
    timings.setdefault("plain prompts", time.perf_counter() - started)

    def copy_model(options):
        return lambda: copy_reweighter(binding, tokenizer, train_examples, options)

    def icl_heldout():
        started = time.perf_counter()
        icl_caches, _ = cached_base_sources(lambda: base, tokenizer, {"heldout": icl_heldout_examples},
                                            work / "cache-icl", k=args.top_k, batch_size=8,
                                            task_vocab_size=args.task_vocab_size)
        timings.setdefault("3-shot held-out prompts", time.perf_counter() - started)
        return icl_caches["heldout"]

    if args.rows in ("all", "copy"):
        continued = trained("plugin-copy-shared-ws-pointer-every-coverage-continuation",
                            copy_model(dict(POINTER, **CONTINUATION)), caches["train"], caches["heldout"])
        plugin_row(f"{COVERED}, continuation", continued, plain, caches["heldout"], heldout_examples)
        plugin_row(f"{COVERED}, continuation + ICL-3", continued, icl3, icl_heldout(), icl_heldout_examples)
        spelled_continued = trained("plugin-copy-shared-spelled-pointer-every-coverage-continuation",
                                    copy_model(dict(SPELLED_POINTER, **CONTINUATION)), caches["train"], caches["heldout"])
        plugin_row(SPELLED_CONTINUED, spelled_continued, plain, caches["heldout"], heldout_examples)
        plugin_row(f"{SPELLED_CONTINUED} + ICL-3", spelled_continued, icl3, icl_heldout(), icl_heldout_examples)
        every = trained("plugin-copy-shared-ws-pointer-every", copy_model(dict(POINTER, **EVERY)), caches["train"],
                        caches["heldout"])
        plugin_row("Plugin, copy shared + word starts + pointer, every occurrence", every, plain, caches["heldout"],
                   heldout_examples)
        plugin_row("Plugin, copy shared + word starts + pointer, every occurrence + ICL-3", every, icl3, icl_heldout(),
                   icl_heldout_examples)
        covered = trained("plugin-copy-shared-ws-pointer-every-coverage", copy_model(dict(POINTER, **COVERAGE)),
                          caches["train"], caches["heldout"])
        plugin_row(COVERED, covered, plain, caches["heldout"], heldout_examples)
        plugin_row(f"{COVERED} + ICL-3", covered, icl3, icl_heldout(), icl_heldout_examples)
        pointer = trained("plugin-copy-shared-ws-pointer", copy_model(POINTER), caches["train"], caches["heldout"])
        plugin_row("Plugin, copy shared + word starts + pointer", pointer, plain, caches["heldout"], heldout_examples)
        plugin_row("Plugin, copy shared + word starts + pointer + ICL-3", pointer, icl3, icl_heldout(),
                   icl_heldout_examples)
        spelled_pointer = trained("plugin-copy-shared-spelled-pointer", copy_model(SPELLED_POINTER), caches["train"],
                                  caches["heldout"])
        plugin_row("Plugin, copy shared + spelled words + pointer", spelled_pointer, plain, caches["heldout"],
                   heldout_examples)
        spelled = trained("plugin-copy-shared-spelled-frequent", copy_model(SPELLED_FREQUENT), caches["train"],
                          caches["heldout"])
        plugin_row(SPELLED, spelled, plain, caches["heldout"], heldout_examples)
        plugin_row(f"{SPELLED} + ICL-3", spelled, icl3, icl_heldout(), icl_heldout_examples)
        # Trained on 3-shot prompts (3 random train pairs before each of the first 1,000), so that the demonstrations'
        # words are in its copy sets in training as they are with ICL-3; its uncopied ids are counted on them.
        icl_train_pairs = with_demonstrations(train_pairs[:1000], train_pairs, 3, seed=0)
        icl_train_examples = encode_examples(tokenizer, icl_train_pairs, 512)  # new_reweighter's positions
        icl_train_cache, _ = cached_base_sources(lambda: base, tokenizer, {"train": icl_train_examples},
                                                 work / "cache-icl-train", k=args.top_k, batch_size=8,
                                                 task_vocab_size=args.task_vocab_size)
        with_icl = trained("plugin-icl-copy-shared-spelled-uncopied",
                           lambda: copy_reweighter(binding, tokenizer, icl_train_examples, SPELLED_UNCOPIED),
                           icl_train_cache["train"], icl_heldout(), icl_train_examples, icl_heldout_examples)
        plugin_row(f"{UNCOPIED}, trained with ICL + ICL-3", with_icl, icl3, icl_heldout(), icl_heldout_examples)
        with_pointer = trained("plugin-icl-copy-shared-spelled-uncopied-pointer",
                               lambda: copy_reweighter(binding, tokenizer, icl_train_examples,
                                                       {**SPELLED_UNCOPIED, "copy_pointer": 4}),
                               icl_train_cache["train"], icl_heldout(), icl_train_examples, icl_heldout_examples)
        plugin_row(f"{UNCOPIED} + pointer, trained with ICL + ICL-3", with_pointer, icl3, icl_heldout(),
                   icl_heldout_examples)
        # Coverage (the prompt ids written get their own value) against the loops of the ICL-trained pointer row;
        # continuation (the prompt ids after the last one written get theirs) against names written in part.
        for suffix, folder, options in ((", coverage", "coverage", {"copy_coverage": True}),
                                        (", coverage, continuation", "coverage-continuation",
                                         {"copy_coverage": True, "copy_continuation": True}),
                                        (" + pointer, every occurrence, coverage", "pointer-every-coverage",
                                         {"copy_pointer": 4, **COVERAGE})):
            make = functools.partial(copy_reweighter, binding, tokenizer, icl_train_examples, {**SPELLED_UNCOPIED, **options})
            learned = trained(f"plugin-icl-copy-shared-spelled-uncopied-{folder}", make, icl_train_cache["train"],
                              icl_heldout(), icl_train_examples, icl_heldout_examples)
            plugin_row(f"{UNCOPIED}{suffix}, trained with ICL + ICL-3", learned, icl3, icl_heldout(),
                       icl_heldout_examples)
        copying = trained("plugin-copy-shared-ws", copy_model(dict(copy_mode="shared", copy_word_starts=True)),
                          caches["train"], caches["heldout"])
        plugin_row("Plugin, copy shared + word starts", copying, plain, caches["heldout"], heldout_examples)
        plugin_row("Plugin, copy shared + word starts + ICL-3", copying, icl3, icl_heldout(), icl_heldout_examples)
    if args.rows in ("all", "baselines"):
        scratch = trained("plugin-scratch", lambda: new_reweighter(binding), caches["train"], caches["heldout"])
        plugin_row("Plugin, from scratch", scratch, plain, caches["heldout"], heldout_examples)
        mixture = trained("mixture-w0.75", lambda: new_reweighter(binding), MixtureNLL(caches["train"], 0.75),
                          MixtureNLL(caches["heldout"], 0.75))
        record("weighted combination", lambda: generate(base, tokenizer, plain,
                                                        [mixture_processor(mixture["model"], 0.75, tokenizer)]),
               mixture, w=0.75)
        alone = trained("alone", lambda: new_reweighter(binding), AloneNLL(), AloneNLL())
        record("small model alone", lambda: generate(alone["model"].backbone, tokenizer, plain), alone)
        plugin_row("Plugin, from scratch + ICL-3", scratch, icl3, icl_heldout(), icl_heldout_examples)


def markdown(result: dict) -> str:
    meta, methods = result["meta"], result["methods"]
    slice_name = next(iter(next(iter(methods.values()))["scores"]))
    lines = [
        "# ViGGO by genre (unseen games) with SmolLM2-135M-Instruct as the black box", "",
        f"`{meta['command']}` at commit {meta['commit']} ({meta['machine']}, torch {meta['torch']}).",
        f"Greedy, repetition penalty 1.1, at most 64 new tokens, prompt `{meta['template']!r}`, cut at the first "
        f"newline. Trained on {meta['train_pairs']} pairs of 14 genres (held-out: {meta['heldout_pairs']}); tested on "
        f"the MRs of 7 other genres; α picked from {meta['alpha_grid']} on held-out NLL.", "",
        f"## {slice_name} MRs", "",
    ]
    lines += slice_tables(methods, slice_name, RUN_COLUMNS)
    return "\n".join(lines + result_tail(meta, methods, "First test MR")) + "\n"


if __name__ == "__main__":
    main()
