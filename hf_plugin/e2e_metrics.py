"""The E2E NLG Challenge's official scores: BLEU, NIST, METEOR, ROUGE-L and CIDEr as its `measure_scores.py` gives them.

The challenge (Dušek et al. 2020, github.com/tuetschek/e2e-metrics) scores a system with two tools:

- BLEU and NIST from the Perl script mteval-v13a, adapted to a variable number of references per input. Text is
  lower-cased (ASCII letters only) and split by the script's own punctuation rules. BLEU takes, per input, the
  reference length closest to the output's (ties to the shorter) and smooths a zero n-gram precision. NIST's length
  penalty compares the output's words with the reference words divided by the mean number of references per
  input. Both are computed here in Python after the Perl script, the challenge's default (its `-p` option runs a
  Python port instead, whose NIST differs).
- METEOR 1.5 (English, with its paraphrase table), coco-caption's ROUGE-L (β = 1.2, best precision and best recall
  over the references) and coco-caption's CIDEr (the CIDEr-D formula, idf from the scored references), on text
  lower-cased and tokenised by the Stanford PTB tokenizer with punctuation tokens dropped. These come from the
  `pycocoevalcap` package, which ships the METEOR and tokenizer jars; they need a Java runtime. Nothing is
  downloaded at run time (pycocoevalcap's SPICE, which would download, is never imported).

Install with `pip install 'hf-plugin[e2e]'` and a Java runtime (e.g. OpenJDK 17). `hf_plugin.metrics` keeps the
fast, Java-free metrics; its METEOR is a different variant and is never reported as plain "METEOR".
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .metrics import check_scoring_inputs, max_counts, ngrams, nist_length_penalty, reference_ngram_counts


E2E_METRIC_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr")

_INSTALL = "pip install 'hf-plugin[e2e]'"
# Perl's \s on Unicode strings (Python's \s also matches \x1c-\x1f, which mteval would keep inside a word).
_PERL_SPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_MTEVAL_SYMBOL = re.compile(r"([{-~\[-` -&(-+:-@/])")  # mteval-v13a's punctuation class, range for range
# Tokens coco-caption's tokenizer wrapper drops after PTB tokenisation (its bracket names are upper-case, so the
# lower-cased "-lrb-" the tokenizer writes stays, as in the challenge's scores).
_PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                              "--", "...", ";"])


def e2e_challenge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The five E2E challenge metrics of `predictions`, each judged against all of its references.

    Reproduces the challenge's `measure_scores.py` (its default Perl mteval for BLEU and NIST). Corpus-level
    statistics make the scores depend on the whole set scored together (CIDEr's idf, NIST's information weights).

    Args:
        predictions (`Sequence[str]`): one generated text per input (an empty text is scored as empty).
        references (`Sequence[Sequence[str]]`): for each input, one or more non-blank reference texts.

    Returns:
        `dict[str, float]`: keyed by `E2E_METRIC_NAMES`; BLEU, METEOR and ROUGE-L on 0-100 (the script prints
        fractions), NIST and CIDEr on their own scales.

    Raises:
        `ImportError`: pycocoevalcap is not installed. `RuntimeError`: no `java` on PATH, or a Java tool failed.
        `ValueError`/`TypeError`: inputs that do not pair up, or an empty or blank reference.

    Examples:

    ```python
    >>> from hf_plugin.e2e_metrics import e2e_challenge_scores
    >>> scores = e2e_challenge_scores(  # doctest: +SKIP
    ...     ["The Eagle is a pub.", "Zizzi is cheap."], [["The Eagle is a pub."], ["Zizzi is a cheap pub."]])
    >>> sorted(scores)  # doctest: +SKIP
    ['BLEU', 'CIDEr', 'METEOR', 'NIST', 'ROUGE-L']

    ```
    """
    _check_references(predictions, references)
    package = _pycocoevalcap_folder()
    java = _java()
    with _Meteor(java, package) as meteor:  # the jar loads its paraphrase table while the rest runs
        bleu, nist = mteval_bleu_nist(predictions, references)
        # Two tokenizer runs, references first, as coco-caption does (the tokenizer keeps state across lines).
        flat = _ptb_tokenize(java, package, [r for group in references for r in group])
        tokenized_references, start = {}, 0
        for i, group in enumerate(references):
            tokenized_references[i], start = flat[start : start + len(group)], start + len(group)
        tokenized_predictions = {i: [text] for i, text in enumerate(_ptb_tokenize(java, package, predictions))}
        rouge = importlib.import_module("pycocoevalcap.rouge.rouge").Rouge()
        cider = importlib.import_module("pycocoevalcap.cider.cider").Cider()
        return {
            "BLEU": 100 * bleu,
            "NIST": nist,
            "METEOR": 100 * meteor.corpus_score(tokenized_references, tokenized_predictions),
            "ROUGE-L": 100 * float(rouge.compute_score(tokenized_references, tokenized_predictions)[0]),
            "CIDEr": float(cider.compute_score(tokenized_references, tokenized_predictions)[0]),
        }


def mteval_bleu_nist(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Corpus BLEU-4 (a fraction) and NIST-5 as the E2E challenge's mteval-v13a script computes them; pure Python.

    Args:
        predictions (`Sequence[str]`): one generated text per input.
        references (`Sequence[Sequence[str]]`): for each input, one or more non-blank reference texts.

    Returns:
        `tuple[float, float]`: BLEU on 0-1 and NIST on its own scale.

    Examples:

    ```python
    >>> from hf_plugin.e2e_metrics import mteval_bleu_nist
    >>> bleu, nist = mteval_bleu_nist(["The Eagle is a pub."], [["The Eagle is a pub.", "A pub: The Eagle."]])
    >>> round(bleu, 4)
    1.0

    ```
    """
    _check_references(predictions, references)
    hypotheses = [_mteval_tokens(p) for p in predictions]
    reference_tokens = [[_mteval_tokens(r) for r in group] for group in references]
    counts, reference_words = reference_ngram_counts(reference_tokens, 5)

    def information(ngram: tuple[str, ...]) -> float:
        # mteval tests the joined prefix for Perl truth, so a prefix that is the single token "0" counts as none.
        prefix = ngram[:-1]
        return -math.log2(counts[ngram] / (counts[prefix] if prefix and prefix != ("0",) else reference_words))

    matched, predicted, gained = [0] * 6, [0] * 6, [0.0] * 6
    closest_length = nonempty_references = 0
    for hypothesis, group in zip(hypotheses, reference_tokens):
        for n in range(1, 6):
            predicted[n] += max(0, len(hypothesis) - n + 1)
            most = max_counts(ngrams(tokens, n) for tokens in group)
            for ngram, count in ngrams(hypothesis, n).items():
                if ngram in most:
                    matched[n] += min(count, most[ngram])
                    gained[n] += information(ngram) * min(count, most[ngram])
        # The first reference starts the search even if empty; later empty ones are skipped.
        best = len(group[0])
        for tokens in group[1:]:
            if tokens and (abs(len(hypothesis) - len(tokens)), len(tokens)) < (abs(len(hypothesis) - best), best):
                best = len(tokens)
        closest_length += best
        nonempty_references += sum(1 for tokens in group if tokens)

    log_precision, smooth = 0.0, 1
    for n in range(1, 5):
        if predicted[n] and matched[n]:
            log_precision += math.log(matched[n] / predicted[n])
        elif predicted[n]:  # mteval's smoothing: 1 / 2^k for the k-th order without a match
            smooth *= 2
            log_precision -= math.log(smooth * predicted[n])
    brevity = math.exp(min(0.0, 1 - closest_length / predicted[1])) if predicted[1] else 0.0
    bleu = math.exp(log_precision / 4) * brevity

    mean_reference_words = reference_words / (nonempty_references / len(predictions))
    nist = sum(gained[n] / max(predicted[n], 1) for n in range(1, 6))
    return bleu, nist * nist_length_penalty(predicted[1] / mean_reference_words)


def _check_references(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    check_scoring_inputs(predictions, references)
    for i, group in enumerate(references):
        for j, reference in enumerate(group):
            if not isinstance(reference, str) or not reference.strip():
                raise ValueError(f"reference {j} of input {i} is empty or not a string: {reference!r}")


def _mteval_tokens(text: str) -> list[str]:
    """mteval-v13a's default normalisation and tokenisation of one segment (after its SGML reader joins lines)."""
    text = _PERL_SPACE.sub(" ", text).replace("<skipped>", "")
    for entity, character in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, character)
    text = f" {text} ".translate(_ASCII_LOWER)
    text = _MTEVAL_SYMBOL.sub(r" \1 ", text)
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)
    text = re.sub(r"([.,])([^0-9])", r" \1 \2", text)
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)
    return [token for token in _PERL_SPACE.split(text) if token]


def _pycocoevalcap_folder() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "meteor" / "meteor-1.5.jar").is_file():
        raise ImportError(f"the E2E challenge's scores need pycocoevalcap (METEOR 1.5, the PTB tokenizer): {_INSTALL}")
    return folder


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("the E2E challenge's METEOR and PTB tokenizer run in Java: install a Java runtime "
                           "(e.g. OpenJDK 17) so that `java` is on PATH")
    return java


def _ptb_tokenize(java: str, package: Path, texts: Sequence[str]) -> list[str]:
    """Lower-cased Stanford PTB tokens of each text, punctuation dropped, one Java run for all texts."""
    jar = package / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "texts.txt"
        # One line per text: any line break inside a text would shift every later text.
        path.write_text("\n".join(" ".join(text.splitlines()) for text in texts), encoding="utf-8")
        result = subprocess.run([java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                                 "-lowerCase", str(path)], capture_output=True)
    lines = result.stdout.decode("utf-8").split("\n")
    if lines[len(texts):] not in ([], [""]) or len(lines) < len(texts) or result.returncode:
        raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(texts)} texts "
                           f"(exit status {result.returncode}): {result.stderr.decode(errors='replace')[-300:]}")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _PTB_PUNCTUATION) for line in lines[:len(texts)]]


class _Meteor:
    """One METEOR 1.5 jar process for a whole corpus: statistics per input, then one aggregate over all inputs."""

    def __init__(self, java: str, package: Path):
        self._errors = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [java, "-Xmx2G", "-jar", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=package / "meteor", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._errors)

    def __enter__(self) -> "_Meteor":
        return self

    def __exit__(self, *exc_info) -> None:
        self._process.stdin.close()
        self._process.kill()
        self._process.wait()
        self._process.stdout.close()
        self._errors.close()

    def corpus_score(self, references: dict[int, list[str]], predictions: dict[int, list[str]]) -> float:
        """Corpus METEOR (a fraction) of tokenised predictions against tokenised references, keyed alike."""
        statistics = []
        for i, group in references.items():
            # The hypothesis is cleaned as coco-caption does; "|||" separates fields in METEOR's protocol.
            hypothesis = predictions[i][0].replace("|||", "").replace("  ", " ")
            statistics.append(self._ask(" ||| ".join(["SCORE", *group, hypothesis])))
        self._ask(" ||| ".join(["EVAL", *statistics]))  # answered by one score per input, then the corpus score
        for _ in range(len(statistics) - 1):
            self._read()
        return float(self._read())

    def _ask(self, line: str) -> str:
        self._process.stdin.write(line.encode("utf-8") + b"\n")
        self._process.stdin.flush()
        return self._read()

    def _read(self) -> str:
        answer = self._process.stdout.readline().decode("utf-8").strip()
        if not answer:
            self._errors.seek(0)
            raise RuntimeError(f"METEOR 1.5 stopped answering: {self._errors.read().decode(errors='replace')[-300:]}")
        return answer
