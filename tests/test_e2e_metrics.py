"""The E2E challenge's official scores (`hf_plugin.e2e_metrics`) against numbers printed by the challenge's own script.

The expected values below were printed by the real `measure_scores.py` of github.com/tuetschek/e2e-metrics (commit
1b9c4d8, its default Perl mteval-v13a for BLEU/NIST, METEOR 1.5 and the PTB tokenizer under OpenJDK 17), run as
`./measure_scores.py refs.txt outputs.txt` on `SAMPLE` written as its plain-text formats (references in blocks
separated by a blank line, one output per line). It prints fractions with 4 decimals, hence the tolerances.
"""

import math
import shutil
import sys

import pytest

from hf_plugin import e2e_metrics
from hf_plugin.e2e_metrics import E2E_METRIC_NAMES, _mteval_tokens, e2e_challenge_scores, mteval_bleu_nist


SAMPLE_PREDICTIONS = [
    "The Eagle is a cheap coffee shop near Burger King, in the riverside area.",
    "Zizzi is a family-friendly pub serving Italian food for £20-25.",
    "",
    "Blue Spice is rated 5 out of 5 and isn't family friendly. It's near the \"Rice Boat\".",
]
SAMPLE_REFERENCES = [
    ["The Eagle is a low-priced coffee shop near Burger King by the riverside.",
     "Near Burger King in riverside is The Eagle, a cheap coffee shop."],
    ["Zizzi is a kid friendly pub with Italian food costing £20-25.",
     "Italian pub Zizzi is family-friendly; prices are £20-25.",
     "For £20-25 you can eat Italian at Zizzi, a family-friendly pub."],
    ["Cotto serves French food in the city centre."],
    ["Blue Spice, near The Rice Boat, has a 5 out of 5 rating but is not family-friendly.",
     "Rated 5 out of 5, Blue Spice is an adult-only venue near The Rice Boat."],
]
# Printed by measure_scores.py: BLEU 0.3845, NIST 4.4007, METEOR 0.3727, ROUGE_L 0.5279, CIDEr 2.8471.
OFFICIAL = {"BLEU": 38.45, "NIST": 4.4007, "METEOR": 37.27, "ROUGE-L": 52.79, "CIDEr": 2.8471}
# Half of the last printed digit, on our scales (0-100 for BLEU, METEOR, ROUGE-L).
TOLERANCE = {"BLEU": 0.005, "NIST": 0.00005, "METEOR": 0.005, "ROUGE-L": 0.005, "CIDEr": 0.00005}

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the E2E challenge's METEOR and tokenizer need Java")


@pytest.fixture(scope="module")
def official_sample_scores():
    pytest.importorskip("pycocoevalcap", reason="the E2E challenge's scores need pip install 'hf-plugin[e2e]'")
    return e2e_challenge_scores(SAMPLE_PREDICTIONS, SAMPLE_REFERENCES)  # the one Java run of this file (~10 s)


@needs_java
def test_reproduces_the_challenge_script(official_sample_scores):
    assert tuple(official_sample_scores) == E2E_METRIC_NAMES
    for name in E2E_METRIC_NAMES:
        assert official_sample_scores[name] == pytest.approx(OFFICIAL[name], abs=TOLERANCE[name]), name


def test_mteval_bleu_and_nist_match_the_perl_script_without_java():
    bleu, nist = mteval_bleu_nist(SAMPLE_PREDICTIONS, SAMPLE_REFERENCES)
    assert 100 * bleu == pytest.approx(OFFICIAL["BLEU"], abs=TOLERANCE["BLEU"])
    assert nist == pytest.approx(OFFICIAL["NIST"], abs=TOLERANCE["NIST"])
    # Printed by mteval-v13a-sig.pl on these two single-input sets (NIST 2.9049 and 2.0443, BLEU 1.0000 and 0.2078):
    # the first holds a bigram after the token "0", which the script weighs against the reference word count.
    assert mteval_bleu_nist(["0 a b"], [["0 a b 0 c", "a b"]]) == pytest.approx((1.0, 2.9049), abs=0.00005)
    assert mteval_bleu_nist(["Café, £20-25. It's 5.5 &amp; (OK)!"], [["CAFÉ costs £20-25, it's 5.5 & ok"]]) == \
        pytest.approx((0.2078, 2.0443), abs=0.00005)


def test_mteval_tokens_lower_case_ascii_only_and_split_punctuation_unless_numeric():
    assert _mteval_tokens("CAFÉ, £20-25. It's 5.5 &amp; (OK)!") == \
        ["cafÉ", ",", "£20", "-", "25", ".", "it's", "5.5", "&", "(", "ok", ")", "!"]


def test_bleu_takes_the_closest_reference_length_and_the_shorter_on_a_tie():
    # Lengths 5 and 3 are both 1 away from 4: the shorter wins, so no brevity penalty and every n-gram matches.
    assert mteval_bleu_nist(["a b c d"], [["a b c d e", "x y z"]])[0] == pytest.approx(1.0)
    # 5 is closer than 6: brevity penalty exp(1 - 5/4).
    assert mteval_bleu_nist(["a b c d"], [["a b c d e", "x y z w v u"]])[0] == pytest.approx(math.exp(-0.25))
    # No bigram match: mteval smooths that precision to 1/2 (orders with no predicted n-gram count as 1).
    assert mteval_bleu_nist(["a b"], [["a c"]])[0] == pytest.approx((0.5 * 0.5) ** 0.25)


def test_nist_length_penalty_uses_reference_words_over_the_mean_reference_count():
    # 10 reference words, 3 references over 2 inputs: the reference length is 10 / 1.5; 4 output words give 0.6.
    # Information: a, b = log2(10 / 1), c, d = log2(10 / 2); the bigrams carry none. The penalty is 0.5 at 2/3.
    beta = math.log(2) / math.log(1.5) ** 2
    expected = (2 * math.log2(10) + 2 * math.log2(5)) / 4 * math.exp(-beta * math.log(0.6) ** 2)
    assert mteval_bleu_nist(["a b", "c d"], [["a b"], ["c d", "c d e f g h"]])[1] == pytest.approx(expected)


@pytest.mark.parametrize("predictions, references, message", [
    ([], [], "no predictions"),
    (["a", "b"], [["a"]], "2 predictions but 1 reference groups"),
    (["a"], [[]], "at least one reference"),
    (["a"], [["a", "  "]], "reference 1 of input 0 is empty"),
])
def test_bad_input_is_one_clear_error_before_any_java(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        e2e_challenge_scores(predictions, references)


def test_missing_pycocoevalcap_or_java_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # how Python marks a package as not importable
    with pytest.raises(ImportError, match=r"pip install 'hf-plugin\[e2e\]'"):
        e2e_challenge_scores(["a"], [["a"]])
    monkeypatch.setattr(e2e_metrics, "_pycocoevalcap_folder", lambda: tmp_path)
    monkeypatch.setattr(e2e_metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="install a Java runtime"):
        e2e_challenge_scores(["a"], [["a"]])


@needs_java
def test_evaluate_command_scores_as_the_challenge(tmp_path, capsys):
    pytest.importorskip("pycocoevalcap", reason="the E2E challenge's scores need pip install 'hf-plugin[e2e]'")
    import json

    from hf_plugin.cli import main

    (tmp_path / "predictions.json").write_text(json.dumps(SAMPLE_PREDICTIONS))
    (tmp_path / "references.json").write_text(json.dumps(SAMPLE_REFERENCES))
    main(["evaluate", "--e2e-challenge", "--predictions", str(tmp_path / "predictions.json"), "--references",
          str(tmp_path / "references.json"), "--output", str(tmp_path / "scores.json")])
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "| system | " + " | ".join(E2E_METRIC_NAMES) + " |"
    saved = json.loads((tmp_path / "scores.json").read_text())["scores"]
    for name in E2E_METRIC_NAMES:
        assert saved[name] == pytest.approx(OFFICIAL[name], abs=TOLERANCE[name]), name
