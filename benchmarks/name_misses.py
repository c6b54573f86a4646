"""Which ViGGO names each row misses, by where the name's pieces occur in the prompt; and what its loops repeat.

Reads the outputs saved in `results/viggo.json` (no generation) and tokenises each test prompt with the base's
tokenizer (the offline SmolLM2). A test game's name falls in one class:

- one piece: the name is a single token of the prompt;
- shared piece: a piece after the first also occurs later in the prompt, outside the name (`:` of `Dirt: Showdown`
  recurs in `Sentence:`), so a pointer that reads each id at its last occurrence reads it there, not in the name;
- own pieces: every later piece's last occurrence is inside the name.

A missed name is also counted by the MR's dialogue act, and split by what the output holds instead: the name with
other spacing or punctuation, its beginning (`Need for Speed` of `Need for Speed: Payback`), a later word of it, or
nothing of it. Of the outputs that repeat a 3-word phrase 3 times or more (the benchmark's "repeats a phrase"), the
script counts those whose repeated phrase holds a word of the MR.

Usage:
    python benchmarks/name_misses.py
Results: benchmarks/results/name_misses.json.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parent / "data" / "viggo"
CLASSES = ("one piece", "shared piece", "own pieces")


def name_class(tokenizer, prompt: str, start: int, end: int) -> str:
    """The class of the name at characters `start:end` of `prompt` (see the module's docstring)."""
    encoded = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    span = [i for i, (a, b) in enumerate(offsets) if a >= start and b <= end]
    if len(span) == 1:
        return "one piece"
    last = {token: i for i, token in enumerate(ids)}
    return "shared piece" if any(last[ids[i]] not in span for i in span[1:]) else "own pieces"


def instead(name: str, output: str) -> str:
    """What a missed name's output holds: the name respaced, its beginning (its first words, not all), a later word
    of it (of 3 characters or more, or a number), or nothing of it. Words are matched whole, case and punctuation
    aside."""
    squeeze = lambda text: re.sub(r"[^a-z0-9]", "", text.lower())  # noqa: E731
    if squeeze(name) in squeeze(output):
        return "respaced"
    words = re.findall(r"[a-z0-9]+", name.lower())
    written = " " + " ".join(re.findall(r"[a-z0-9]+", output.lower())) + " "
    if any(f" {' '.join(words[:n])} " in written for n in range(1, len(words))):
        return "its beginning"
    if any(f" {word} " in written for word in words[1:] if len(word) >= 3 or word.isdigit()):
        return "a later word"
    return "none of it"


def repeated_phrases(output: str) -> list[tuple[str, ...]]:
    """The 3-word phrases `output` writes 3 times or more (lower-cased words)."""
    words = re.findall(r"\w+", output.lower())
    return [phrase for phrase, n in Counter(zip(words, words[1:], words[2:])).items() if n >= 3]


def main() -> None:
    from hf_plugin.loading import load_tokenizer, offline_smollm2

    result = json.loads((RESULTS / "viggo.json").read_text())
    template, test_mrs = result["meta"]["template"], result["meta"]["test_mrs"]
    with open(DATA / "test.csv", newline="", encoding="utf-8") as handle:
        assert list(dict.fromkeys(row["mr"] for row in csv.DictReader(handle))) == test_mrs
    tokenizer = load_tokenizer(offline_smollm2())
    names = []
    for mr in test_mrs:
        found = re.search(r"name\[([^\]]*)\]", mr)
        if found is None:
            names.append(None)
            continue
        prompt = template.format(mr=mr)
        at = prompt.index(mr)
        names.append((found.group(1), name_class(tokenizer, prompt, at + found.start(1), at + found.end(1))))
    sizes = Counter(kind for entry in names if entry for _, kind in [entry])
    rows = {}
    for method, row in result["methods"].items():
        missed, kinds, acts = Counter(), Counter(), Counter()
        for entry, output, mr in zip(names, row["outputs"], test_mrs):
            if entry is None or entry[0].lower() in output.lower():
                continue
            missed[entry[1]] += 1
            acts[mr.split("(")[0]] += 1
            kinds[instead(entry[0], output)] += 1
        loops = [(phrases, mr) for output, mr in zip(row["outputs"], test_mrs) for phrases in [repeated_phrases(output)]
                 if phrases]
        on_values = sum(any(set(phrase) & set(re.findall(r"\w+", mr.lower())) for phrase in phrases)
                        for phrases, mr in loops)
        rows[method] = {"missed % by class": {k: round(100 * missed[k] / sizes[k], 1) for k in CLASSES},
                        "missed by class": dict(missed), "missed by dialogue act": dict(acts),
                        "missed names hold": dict(kinds),
                        "outputs repeating a phrase": len(loops), "of which the phrase holds an MR word": on_values}
    named_acts = Counter(mr.split("(")[0] for entry, mr in zip(names, test_mrs) if entry)
    out = {"command": "python benchmarks/name_misses.py", "names by class": dict(sizes),
           "names by dialogue act": dict(named_acts), "rows": rows}
    (RESULTS / "name_misses.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"names by class: {dict(sizes)}")
    for method, row in rows.items():
        print(f"{method}: {row['missed % by class']} | {row['missed names hold']} | repeats "
              f"{row['outputs repeating a phrase']}, on an MR word {row['of which the phrase holds an MR word']}")


if __name__ == "__main__":
    main()
