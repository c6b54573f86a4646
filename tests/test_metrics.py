"""Each metric against small cases worked out by hand, plus the `hf-plugin evaluate` text mode."""

import json
import math

import pytest

from hf_plugin.cli import main
from hf_plugin.metrics import (
    METRIC_NAMES, bleu, cider_d, corpus_metrics, meteor_exact_stem, nist, read_predictions, read_references, rouge_l,
)


def test_bleu_by_hand():
    # Clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(expected, abs=1e-6)
    # A second reference holding the prediction makes every n-gram match.
    assert bleu(["the cat sat on the mat"], [["the cat sat on a mat", "the cat sat on the mat"]]) == pytest.approx(100)


def test_bleu_accepts_a_different_number_of_references_per_input():
    one = bleu(["the cat sat on the mat", "a dog"], [["the cat sat on a mat"], ["a dog", "one dog"]])
    assert 0 < one < 100


def test_rouge_l_by_hand_takes_the_best_reference():
    # LCS "the sat here" = 3 words: P = 3/4, R = 3/5, F = 2/3; against "cat": P = 1/4, R = 1, F = 0.4.
    assert rouge_l(["the cat sat here"], [["the dog sat here now"]]) == pytest.approx(100 * 2 / 3)
    assert rouge_l(["the cat sat here"], [["cat", "the dog sat here now"]]) == pytest.approx(100 * 2 / 3)
    assert rouge_l(["the cat sat here", "x"], [["cat"], ["y"]]) == pytest.approx(100 * 0.4 / 2)


def test_nist_by_hand():
    # Reference "a b c": info(a) = info(b) = log2(3 words / 1), info(a b) = log2(count(a) / count(a b)) = 0.
    # Unigrams: (2 log2 3) / 2; bigrams 0; no longer n-grams. Length 2 vs 3: the penalty is 0.5 at ratio 2/3.
    assert nist(["a b"], [["a b c"]]) == pytest.approx(math.log2(3) * 0.5)
    # References "a b" and "a a c" (5 words, a three times): unigram "a" earns log2(5/3) twice (clipped to the 2
    # of the second reference) over 2 predicted; bigram "a a" earns log2(3/1) over 1. Mean reference length 2.5.
    beta = math.log(2) / math.log(1.5) ** 2
    penalty = math.exp(-beta * math.log(2 / 2.5) ** 2)
    assert nist(["a a"], [["a b", "a a c"]]) == pytest.approx((math.log2(5 / 3) + math.log2(3)) * penalty)


def test_meteor_exact_then_stem_by_hand():
    # "the sat on mat" match exactly, "cats" matches "cat" by stem: m = 5 of 5 predicted and 6 reference words,
    # two chunks ("the cats sat on" | "mat"). Fmean = 10·1·(5/6) / (5/6 + 9), penalty 0.5·(2/5)³.
    f_mean = 10 * (5 / 6) / (5 / 6 + 9)
    expected = 100 * f_mean * (1 - 0.5 * (2 / 5) ** 3)
    assert meteor_exact_stem(["the cats sat on mat"], [["the cat sat on the mat"]]) == pytest.approx(expected)
    # Without any match the score is 0; the corpus score is the mean over inputs.
    assert meteor_exact_stem(["the cats sat on mat", "x"], [["the cat sat on the mat"], ["y"]]) == pytest.approx(
        expected / 2)


def test_cider_d_by_hand():
    # Two inputs, so idf = log(2 / df): every reference n-gram has df 1 and weight log 2.
    # Input 1: "a b c" vs "a b": unigram cosine 2 / sqrt(6), bigram 1 / sqrt(2), trigrams 0 (no reference
    # trigram), 4-grams 0; Gaussian length penalty exp(-1 / 72). Input 2: no overlap.
    first = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert cider_d(["a b c", "c"], [["a b"], ["d"]]) == pytest.approx(first / 2)
    # An exact copy scores 10 · (1 + 1 + 0 + 0) / 4 on two-word texts.
    assert cider_d(["a b", "c"], [["a b"], ["d"]]) == pytest.approx(5.0 / 2)


def test_corpus_metrics_reports_every_metric_and_checks_its_input():
    scores = corpus_metrics(["The Eagle is a pub."], [["The Eagle is a pub."]])
    assert tuple(scores) == METRIC_NAMES
    with pytest.raises(ValueError, match="pair up"):
        corpus_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_metrics(["a"], [[]])
    with pytest.raises(TypeError):
        corpus_metrics(["a"], ["a"])


def test_reference_files(tmp_path):
    (tmp_path / "refs.txt").write_text("a b\na c\n\nd e\n")
    assert read_references(tmp_path / "refs.txt") == [["a b", "a c"], ["d e"]]
    (tmp_path / "refs.jsonl").write_text('["a b", "a c"]\n["d e"]\n')
    assert read_references(tmp_path / "refs.jsonl") == [["a b", "a c"], ["d e"]]
    (tmp_path / "bad.json").write_text('[["a"], []]')
    with pytest.raises(ValueError, match="non-empty list"):
        read_references(tmp_path / "bad.json")
    (tmp_path / "preds.json").write_text('["x", "y"]')
    assert read_predictions(tmp_path / "preds.json") == ["x", "y"]
    (tmp_path / "preds.txt").write_text("x\n\n\n")  # empty outputs are predictions too
    assert read_predictions(tmp_path / "preds.txt") == ["x", "", ""]


def test_evaluate_command_writes_a_table_and_json(tmp_path, capsys):
    (tmp_path / "predictions.txt").write_text("the cats sat on mat\nthe dog barked\n")
    (tmp_path / "references.txt").write_text("the cat sat on the mat\n\nthe dog barked\na dog barked loudly\n")
    main(["evaluate", "--predictions", str(tmp_path / "predictions.txt"), "--references",
          str(tmp_path / "references.txt"), "--output", str(tmp_path / "scores.json")])
    table = capsys.readouterr().out
    assert "METEOR (exact+stem)" in table and "predictions.txt" in table
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["inputs"] == 2
    assert saved["scores"] == pytest.approx(corpus_metrics(
        ["the cats sat on mat", "the dog barked"], [["the cat sat on the mat"], ["the dog barked", "a dog barked loudly"]]))


def test_evaluate_command_rejects_mixed_or_mismatched_inputs(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\n")
    (tmp_path / "r.txt").write_text("a\n")
    with pytest.raises(SystemExit, match="pair up"):
        main(["evaluate", "--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "r.txt")])
    with pytest.raises(SystemExit, match="either --predictions and --references"):
        main(["evaluate", "--predictions", str(tmp_path / "p.txt")])
    with pytest.raises(SystemExit, match="either"):
        main(["evaluate", "--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "r.txt"),
              "--data", str(tmp_path / "p.txt")])
