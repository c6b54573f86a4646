"""Corpus metrics for generated text against several references per input: BLEU, ROUGE-L, NIST, METEOR, CIDEr-D.

BLEU comes from sacrebleu and ROUGE-L from rouge-score. NIST and CIDEr-D are implemented here after their papers
(Doddington 2002 as in mteval-v13a; Vedantam et al. 2015 as in the coco-caption code). METEOR's standard tool
needs Java and WordNet, which an offline machine may not have, so this module computes the documented
**exact + stem** variant (Banerjee & Lavie 2005, with the Porter stemmer and no synonym stage) and names it
`METEOR (exact+stem)` wherever it is reported.

Scales: BLEU, ROUGE-L and METEOR are fractions reported on 0-100. NIST and CIDEr-D are not bounded by 1; they
keep their own conventional scales (NIST ~ 0-15, CIDEr-D 0-10), as in the E2E NLG challenge's tables.

Text is lower-cased and tokenised with sacrebleu's 13a tokenizer for NIST, METEOR and CIDEr-D (CIDEr-D also
drops punctuation tokens, as coco-caption's tokenizer does).
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path


METRIC_NAMES = ("BLEU", "ROUGE-L", "NIST", "METEOR (exact+stem)", "CIDEr-D")


def corpus_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """All five corpus metrics of `predictions`, each judged against all of its references.

    Args:
        predictions (`Sequence[str]`): one generated text per input.
        references (`Sequence[Sequence[str]]`): for each input, one or more reference texts.

    Returns:
        `dict[str, float]`: scores keyed by the names in `METRIC_NAMES`.

    Examples:

    ```python
    >>> from hf_plugin.metrics import corpus_metrics
    >>> scores = corpus_metrics(["The Eagle is a pub."], [["The Eagle is a pub.", "There is a pub, The Eagle."]])
    >>> round(scores["BLEU"], 1), round(scores["METEOR (exact+stem)"], 1)
    (100.0, 99.8)

    ```
    """
    check_scoring_inputs(predictions, references)
    return {
        "BLEU": bleu(predictions, references),
        "ROUGE-L": rouge_l(predictions, references),
        "NIST": nist(predictions, references),
        "METEOR (exact+stem)": meteor_exact_stem(predictions, references),
        "CIDEr-D": cider_d(predictions, references),
    }


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 with sacrebleu's defaults (13a tokenisation, case-sensitive), 0-100."""
    sacrebleu = _require("sacrebleu", "sacrebleu")
    check_scoring_inputs(predictions, references)
    width = max(len(group) for group in references)
    # sacrebleu takes reference streams; a None marks an input with fewer references.
    streams = [[group[i] if i < len(group) else None for group in references] for i in range(width)]
    return sacrebleu.corpus_bleu(list(predictions), streams).score


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over inputs of the best ROUGE-L F1 against any reference (rouge-score's tokenizer), 0-100."""
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    check_scoring_inputs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score_multi(list(group), prediction)["rougeL"].fmeasure
              for prediction, group in zip(predictions, references)]
    return 100 * sum(scores) / len(scores)


def nist(predictions: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 5) -> float:
    """Corpus NIST (Doddington 2002, as mteval-v13a computes it), on its own scale.

    Each n-gram's information weight is `log2(count(w1..w(n-1)) / count(w1..wn))` over all reference texts (the
    unigram prefix count is the number of reference words). A prediction's n-grams earn their weight up to the
    most times any one of its references holds them. The sum per order is divided by the number of predicted
    n-grams of that order, the orders are added, and a length penalty `exp(-β log²(min(L_sys / L_ref, 1)))`
    with β set so that a ratio of 2/3 scores 0.5 is applied, `L_ref` being the summed mean reference length.
    """
    check_scoring_inputs(predictions, references)
    hypotheses = [_tokens(p) for p in predictions]
    reference_tokens = [[_tokens(r) for r in group] for group in references]
    counts, reference_words = reference_ngram_counts(reference_tokens, max_order)

    def information(ngram: tuple[str, ...]) -> float:
        prefix = counts[ngram[:-1]] if len(ngram) > 1 else reference_words
        return math.log2(prefix / counts[ngram])

    matched = [0.0] * (max_order + 1)
    predicted = [0] * (max_order + 1)
    system_length = reference_length = 0.0
    for hypothesis, group in zip(hypotheses, reference_tokens):
        system_length += len(hypothesis)
        reference_length += sum(len(tokens) for tokens in group) / len(group)
        for n in range(1, max_order + 1):
            hypothesis_counts = ngrams(hypothesis, n)
            most = max_counts(ngrams(tokens, n) for tokens in group)
            predicted[n] += sum(hypothesis_counts.values())
            matched[n] += sum(information(g) * min(c, most[g]) for g, c in hypothesis_counts.items() if g in most)
    score = sum(matched[n] / max(predicted[n], 1) for n in range(1, max_order + 1))
    return score * nist_length_penalty(system_length / reference_length if reference_length else 0.0)


def meteor_exact_stem(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """METEOR with exact and Porter-stem matching only (no WordNet synonyms), 0-100.

    Per input and reference (Banerjee & Lavie 2005): unigrams are aligned first by exact form, then by stem;
    with `m` matches, precision `P = m / |prediction|`, recall `R = m / |reference|`,
    `Fmean = 10PR / (R + 9P)`, and the fragmentation penalty `0.5 (chunks / m)^3`, where a chunk is a run of
    matches adjacent and in the same order on both sides. The score is `Fmean (1 - penalty)`; each input takes
    its best reference, and the corpus score is the mean over inputs. The alignment is greedy (each word takes
    the reference position that extends the current chunk if it can, else the first free one), not the full
    search of the Java tool.
    """
    stemmer = _require("nltk.stem.porter", "nltk").PorterStemmer()
    check_scoring_inputs(predictions, references)
    scores = [max(_meteor_segment(_tokens(p), _tokens(r), stemmer.stem) for r in group)
              for p, group in zip(predictions, references)]
    return 100 * sum(scores) / len(scores)


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, as coco-caption computes it), on its own 0-10 scale.

    n-grams (n = 1..4) are weighted by term frequency times `log(inputs / document frequency)`, the document
    frequency being the number of inputs whose references contain the n-gram. Per order, the similarity to each
    reference is the cosine with the prediction's weights clipped to the reference's, times a Gaussian length
    penalty `exp(-(len_p - len_r)² / 2σ²)`; orders are averaged, references averaged, and the result times 10.
    The corpus score is the mean over inputs.
    """
    check_scoring_inputs(predictions, references)
    hypotheses = [_content_tokens(p) for p in predictions]
    reference_tokens = [[_content_tokens(r) for r in group] for group in references]
    document_frequency: Counter = Counter()
    for group in reference_tokens:
        document_frequency.update({g for tokens in group for n in range(1, 5) for g in ngrams(tokens, n)})
    log_inputs = math.log(len(references))

    def weights(tokens: list[str]) -> list[dict]:
        return [{g: c * (log_inputs - math.log(max(1.0, document_frequency[g]))) for g, c in ngrams(tokens, n).items()}
                for n in range(1, 5)]

    total = 0.0
    for hypothesis, group in zip(hypotheses, reference_tokens):
        hypothesis_weights = weights(hypothesis)
        per_reference = []
        for tokens in group:
            reference_weights = weights(tokens)
            penalty = math.exp(-((len(hypothesis) - len(tokens)) ** 2) / (2 * sigma**2))
            per_order = []
            for h, r in zip(hypothesis_weights, reference_weights):
                norms = math.sqrt(sum(v * v for v in h.values())) * math.sqrt(sum(v * v for v in r.values()))
                overlap = sum(min(v, r[g]) * r[g] for g, v in h.items() if g in r)
                per_order.append(penalty * overlap / norms if norms else 0.0)
            per_reference.append(sum(per_order) / len(per_order))
        total += 10 * sum(per_reference) / len(per_reference)
    return total / len(hypotheses)


def read_predictions(path: str | Path) -> list[str]:
    """Predictions from a text file (one per line), a JSON list of strings, or JSON lines with a `"completion"` field
    (what `hf-plugin generate --output` writes)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [_field(path, number, line, "completion", str) for number, line in _json_lines(text)]
    if path.suffix == ".json":
        predictions = json.loads(text)
        if not isinstance(predictions, list) or not all(isinstance(p, str) for p in predictions):
            raise ValueError(f"{path}: expected a JSON list of strings")
        return predictions
    # Only the final line break is a terminator: empty lines before it are empty predictions.
    return text.removesuffix("\n").split("\n") if text else []


def read_references(path: str | Path) -> list[list[str]]:
    """References from a text file (one per line, inputs separated by a blank line, as in the E2E challenge), a
    JSON list of lists of strings, or JSON lines with one list per input or a `"references"` field (what
    `hf-plugin generate --data ... --completion-column ... --output` writes)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".json", ".jsonl"):
        groups = json.loads(text) if path.suffix == ".json" else [
            json.loads(line) if line.lstrip().startswith("[") else _field(path, number, line, "references", list)
            for number, line in _json_lines(text)]
        if not isinstance(groups, list) or not all(isinstance(g, list) and g and all(isinstance(r, str) for r in g)
                                                   for g in groups):
            raise ValueError(f"{path}: expected, per input, a non-empty list of reference strings")
        return groups
    return [block.split("\n") for block in text.strip("\n").split("\n\n")] if text.strip() else []


def _json_lines(text: str) -> list[tuple[int, str]]:
    """The non-blank lines of a JSON-lines text, with their 1-based line numbers."""
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _field(path: Path, number: int, line: str, name: str, kind: type):
    """Field `name` of the JSON object on line `number`; anything else is an error naming the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
    if not isinstance(record, dict) or not isinstance(record.get(name), kind):
        raise ValueError(f"{path}, line {number}: expected a JSON object with a {kind.__name__} field {name!r}")
    return record[name]


def format_table(rows: dict[str, dict[str, float]], columns: Sequence[str] = METRIC_NAMES) -> str:
    """A Markdown table: one row per system, one column per metric."""
    lines = ["| system | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    lines += [f"| {name} | " + " | ".join(f"{scores[c]:.2f}" for c in columns) + " |" for name, scores in rows.items()]
    return "\n".join(lines)


def check_scoring_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raises unless there is at least one prediction and each has a non-empty group of references."""
    if isinstance(predictions, str) or any(isinstance(group, str) for group in references):
        raise TypeError("predictions must be a sequence of strings and references a sequence of lists of strings")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference groups; they must pair up")
    if not predictions:
        raise ValueError("no predictions to score")
    if any(len(group) == 0 for group in references):
        raise ValueError("every prediction needs at least one reference")


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"this metric needs {package}: pip install 'hf-plugin[eval]'") from error


@functools.cache
def _tokenizer_13a():
    return _require("sacrebleu.tokenizers.tokenizer_13a", "sacrebleu").Tokenizer13a()


def _tokens(text: str) -> list[str]:
    return _tokenizer_13a()(text.lower()).split()


def _content_tokens(text: str) -> list[str]:
    return [t for t in _tokens(text) if any(ch.isalnum() for ch in t)]


def ngrams(tokens: list[str], n: int) -> Counter:
    """The counts of the n-grams of `tokens`, as tuples."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def reference_ngram_counts(reference_tokens: list[list[list[str]]], max_order: int) -> tuple[Counter, int]:
    """Counts of every n-gram (n <= max_order) over all reference texts, and their number of words (NIST's input)."""
    counts: Counter = Counter()
    words = 0
    for group in reference_tokens:
        for tokens in group:
            words += len(tokens)
            for n in range(1, max_order + 1):
                counts.update(ngrams(tokens, n))
    return counts, words


def max_counts(counters) -> Counter:
    """Each n-gram's highest count over `counters` (BLEU's clipping: the most any one reference has)."""
    most: Counter = Counter()
    for counter in counters:
        most |= counter
    return most


def nist_length_penalty(ratio: float) -> float:
    """NIST's brevity penalty for a hypothesis/reference length `ratio`: 1 from 1 up, 0.5 at 2/3."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def _meteor_segment(hypothesis: list[str], reference: list[str], stem) -> float:
    if not hypothesis or not reference:
        return 0.0
    alignment: dict[int, int] = {}  # hypothesis position -> reference position
    for normalise in (lambda word: word, stem):
        free = [j for j in range(len(reference)) if j not in alignment.values()]
        reference_forms = {j: normalise(reference[j]) for j in free}
        for i, word in enumerate(hypothesis):
            if i in alignment:
                continue
            form = normalise(word)
            candidates = [j for j in free if reference_forms[j] == form]
            if not candidates:
                continue
            follows = alignment.get(i - 1, -2) + 1
            j = follows if follows in candidates else candidates[0]
            alignment[i] = j
            free.remove(j)
    matches = len(alignment)
    if matches == 0:
        return 0.0
    pairs = sorted(alignment.items())
    chunks = 1 + sum(1 for (i, j), (i2, j2) in zip(pairs, pairs[1:]) if i2 != i + 1 or j2 != j + 1)
    precision, recall = matches / len(hypothesis), matches / len(reference)
    f_mean = 10 * precision * recall / (recall + 9 * precision)
    return f_mean * (1 - 0.5 * (chunks / matches) ** 3)
