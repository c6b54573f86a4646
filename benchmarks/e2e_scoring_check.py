"""Does `hf_plugin.e2e_metrics.e2e_challenge_scores` reproduce the E2E challenge's own `measure_scores.py`?

On a sample of the outputs saved by `benchmarks/e2e_nlg.py` (benchmarks/results/e2e_nlg.json: some methods × the
first MRs of its test list), each against all its references in the cleaned test split (grouped by MR), this scores
every method three ways: the challenge's script (run from a checkout you give with `--official`, default Perl
mteval for BLEU/NIST), `e2e_challenge_scores`, and the library's fast built-in metrics (`corpus_metrics`). The
script prints fractions with 4 decimals, so "reproduced" means within half of its last printed digit: 0.005 on the
0-100 scale for BLEU, METEOR and ROUGE-L, 0.00005 for NIST and CIDEr. Then BLEU and NIST alone on random small
corpora of awkward tokens, against the script's Perl mteval through its own wrapper.

The checkout needs the three jars pycocoevalcap ships (its repository keeps them out of git history on some
mirrors; they are byte-identical to pycocoevalcap 1.2's), Java, Perl, and the Python packages its README lists.

Usage:
    python benchmarks/e2e_scoring_check.py --data-dir ../shared/data/e2e_nlg --official PATH/e2e-metrics
Results: benchmarks/results/e2e_scoring_check.json (and a Markdown table on stdout).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.metadata
import io
import json
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hf_plugin.e2e_metrics import E2E_METRIC_NAMES, e2e_challenge_scores, mteval_bleu_nist
from hf_plugin.metrics import METRIC_NAMES, corpus_metrics, format_table


RESULTS = Path(__file__).parent / "results"
# The script's printed names, and the factor from its scale to ours.
OFFICIAL_NAMES = {"BLEU": ("BLEU", 100), "NIST": ("NIST", 1), "METEOR": ("METEOR", 100), "ROUGE-L": ("ROUGE_L", 100),
                  "CIDEr": ("CIDEr", 1)}
TOLERANCE = {name: round(0.5e-4 * factor, 6) for name, (_, factor) in OFFICIAL_NAMES.items()}


def references_by_mr(path: Path) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            groups.setdefault(row["mr"], []).append(row["ref"])
    return groups


def official_scores(checkout: Path, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Run the challenge's script on plain-text files (one output per line; references in blocks)."""
    with tempfile.TemporaryDirectory() as folder:
        reference_file, output_file = Path(folder) / "references.txt", Path(folder) / "outputs.txt"
        reference_file.write_text("\n\n".join("\n".join(group) for group in references) + "\n", encoding="utf-8")
        output_file.write_text("\n".join(predictions) + "\n", encoding="utf-8")
        result = subprocess.run([sys.executable, "measure_scores.py", str(reference_file), str(output_file)],
                                cwd=checkout, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"measure_scores.py failed: {result.stderr[-2000:]}")
    printed = dict(re.findall(r"^(\w+): ([0-9.]+)$", result.stdout, flags=re.M))
    return {name: float(printed[official]) * factor for name, (official, factor) in OFFICIAL_NAMES.items()}


# Tokens that exercise mteval's tokenisation: digits with commas, periods and dashes, entities, non-ASCII capitals,
# and the token "0" (the script weighs an n-gram after it against all reference words).
TRICKY_WORDS = ["0", "0.5", "1,000", "£20-25", "The", "eagle", "É", "Café", "isn't", "a", "pub", ".", ",", "-", "5-star",
                "&amp;", "&lt;x&gt;", "(near)", '"Rice"', "3.", ".5", "a.b", "x,y", "ÉCOLE", "riverside", "city-centre",
                "0 0", "!"]


def random_mteval_cases(checkout: Path, count: int, seed: int = 0) -> dict:
    """Our mteval BLEU/NIST against the challenge's Perl mteval (through its own wrapper) on random small corpora."""
    sys.path.insert(0, str(checkout))
    from measure_scores import run_mteval  # the challenge's wrapper: writes .sgm files, runs the Perl script

    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(TRICKY_WORDS) for _ in range(rng.randint(1, 12)))

    worst = {"BLEU": 0.0, "NIST": 0.0}
    for _ in range(count):
        inputs = rng.randint(1, 5)
        references = [[sentence() for _ in range(rng.randint(1, 4))] for _ in range(inputs)]
        predictions = [sentence() for _ in range(inputs)]
        with contextlib.redirect_stderr(io.StringIO()):
            official = run_mteval(references, predictions, [""] * inputs)
        bleu, nist = mteval_bleu_nist(predictions, references)
        worst["BLEU"] = max(worst["BLEU"], abs(round(bleu, 4) - official["BLEU"]))
        worst["NIST"] = max(worst["NIST"], abs(round(nist, 4) - official["NIST"]))
    return {"cases": count, "seed": seed, "largest difference after rounding to the printed 4 decimals": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with test-fixed.csv")
    parser.add_argument("--official", type=Path, required=True, help="a checkout of tuetschek/e2e-metrics")
    parser.add_argument("--official-revision", default="", help="its git commit, recorded with the results")
    parser.add_argument("--outputs", type=Path, default=RESULTS / "e2e_nlg.json")
    parser.add_argument("--methods", nargs="+", default=["zero-shot", "ICL-3", "Plugin"])
    parser.add_argument("--mrs", type=int, default=100, help="the first N test MRs of the saved run")
    parser.add_argument("--random-cases", type=int, default=300, help="random small corpora for BLEU/NIST alone")
    args = parser.parse_args()

    saved = json.loads(args.outputs.read_text(encoding="utf-8"))
    groups = references_by_mr(args.data_dir / "test-fixed.csv")
    mrs = saved["meta"]["test_mrs"][: args.mrs]
    references = [groups[mr] for mr in mrs]
    rows = {}
    for method in args.methods:
        predictions = saved["methods"][method]["outputs"][: args.mrs]
        start = time.perf_counter()
        ours = e2e_challenge_scores(predictions, references)
        seconds = time.perf_counter() - start
        official = official_scores(args.official, predictions, references)
        rows[method] = {
            "official": official, "e2e_challenge_scores": ours, "e2e_challenge_scores_seconds": round(seconds, 1),
            "builtin": corpus_metrics(predictions, references),
            "abs_difference": {name: abs(ours[name] - official[name]) for name in E2E_METRIC_NAMES},
            "reproduced": all(abs(ours[name] - official[name]) <= TOLERANCE[name] + 1e-9 for name in E2E_METRIC_NAMES),
        }

    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "meta": {
            "command": " ".join(["python benchmarks/e2e_scoring_check.py"] + sys.argv[1:]), "commit": commit,
            "official_script": f"tuetschek/e2e-metrics measure_scores.py {args.official_revision}".strip(),
            "versions": {"python": platform.python_version(), "pycocoevalcap": importlib.metadata.version("pycocoevalcap"),
                         "java": java, "sacrebleu": importlib.metadata.version("sacrebleu")},
            "sample": f"outputs of {', '.join(args.methods)} from {args.outputs.name} on its first {args.mrs} test MRs, "
                      f"{sum(map(len, references))} references",
            "tolerance": TOLERANCE,
        },
        "methods": rows,
        "mteval_random_cases": random_mteval_cases(args.official, args.random_cases),
    }
    (RESULTS / "e2e_scoring_check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(rows))


def markdown(rows: dict) -> str:
    """The official and our scores side by side, then the built-in metrics under their own names."""
    lines = ["| method | " + " | ".join(f"{n} official | {n} ours" for n in E2E_METRIC_NAMES) + " |",
             "| --- |" + " ---: |" * 2 * len(E2E_METRIC_NAMES)]
    for method, row in rows.items():
        lines.append(f"| {method} | " + " | ".join(
            f"{row['official'][n]:.4f} | {row['e2e_challenge_scores'][n]:.4f}" for n in E2E_METRIC_NAMES) + " |")
    builtin = format_table({method: row["builtin"] for method, row in rows.items()}, METRIC_NAMES)
    return "\n".join(lines) + "\n\nBuilt-in metrics (hf_plugin.metrics) on the same outputs:\n\n" + builtin


if __name__ == "__main__":
    main()
