"""The `generate` and `evaluate` commands: inputs as in training, stop strings, batches, JSON lines, and errors
that come before the base model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hf_plugin.commands.common
from hf_plugin.cli import main
from hf_plugin.commands.generate import cut
from hf_plugin.data import read_examples

from conftest import make_base, make_plugin, make_tokenizer, task_rows, write_csv


TEMPLATE = r"Data: {mr}\nSentence:"
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_base("llama").save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    make_plugin("llama").save_pretrained(root / "plugin")  # 128 positions
    write_csv(root / "train.csv", task_rows(16, references=2))
    write_csv(root / "test.csv", task_rows(5, offset=100, references=3))
    return root


@pytest.fixture
def no_base(monkeypatch):
    """Fails the test if the base model is loaded."""
    def load_base_model(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(hf_plugin.commands.common, "load_base_model", load_base_model)


def generate(setup: Path, *extra: str) -> list[str]:
    return ["generate", "--base", str(setup / "base"), "--reweighter", str(setup / "plugin"), "--max-new-tokens", "3",
            *extra]


def printed_records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_documented_flow_train_generate_evaluate(setup, tmp_path, capsys):
    """The README's flow: train with --template, generate from the same data and template with --stop and --output,
    score with evaluate --predictions/--references."""
    out = tmp_path / "reweighter"
    main(["train", "--base", str(setup / "base"), "--data", str(setup / "train.csv"), "--template", TEMPLATE,
          "--completion-column", "ref", "--validation-fraction", "0.25", "--output-dir", str(out), "--epochs", "2",
          "--batch-size", "8", "--hidden-size", "32", "--intermediate-size", "64", "--num-heads", "2",
          "--max-length", "32", "--cpu"])
    predictions = tmp_path / "preds.jsonl"
    main(["generate", "--base", str(setup / "base"), "--reweighter", str(out), "--data", str(setup / "test.csv"),
          "--template", TEMPLATE, "--completion-column", "ref", "--stop", r"\n", "--max-new-tokens", "4",
          "--batch-size", "2", "--output", str(predictions)])
    assert "Wrote 5 completions" in capsys.readouterr().out
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    # one record per distinct prompt, built exactly as training builds it, with all of that prompt's references
    pairs, _ = read_examples(setup / "test.csv", completion_column="ref", template="Data: {mr}\nSentence:")
    assert [r["prompt"] for r in records] == list(dict.fromkeys(p.prompt for p in pairs))
    assert records[0]["prompt"] == f"Data: {task_rows(1, offset=100)[0][0]}\nSentence:"
    assert [r["row"] for r in records] == [0, 3, 6, 9, 12]
    assert [r["references"] for r in records] == [[ref for _, ref in task_rows(1, offset=100 + i, references=3)]
                                                  for i in range(5)]
    assert all(isinstance(r["completion"], str) and "\n" not in r["completion"] for r in records)

    main(["evaluate", "--predictions", str(predictions), "--references", str(predictions), "--output",
          str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["inputs"] == 5 and "BLEU" in scores["scores"]


def test_prompts_are_unescaped_batched_and_printed_as_json_lines(setup, tmp_path, capsys, monkeypatch):
    batches = []
    real_load = hf_plugin.commands.common.load_base_model

    def load_base_model(*args, **kwargs):
        base, tokenizer = real_load(*args, **kwargs)
        real_generate = base.generate

        def counted(**inputs):
            batches.append(inputs["input_ids"].shape[0])
            return real_generate(**inputs)

        base.generate = counted
        return base, tokenizer

    monkeypatch.setattr(hf_plugin.commands.common, "load_base_model", load_base_model)
    prompts = [r"w1\nw2", "w3", "w4 w5", "w6", "w7"]
    main(generate(setup, *[arg for p in prompts for arg in ("--prompt", p)], "--batch-size", "2"))
    records = printed_records(capsys)
    assert batches == [2, 2, 1]
    assert [r["prompt"] for r in records] == ["w1\nw2", "w3", "w4 w5", "w6", "w7"]
    assert all(set(r) == {"prompt", "completion"} and r["completion"] for r in records)

    # JSON-lines prompts may span lines; the same prompts in one batch give the same greedy completions
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p.replace(r"\n", "\n")}) + "\n" for p in prompts))
    main(generate(setup, "--prompts-file", str(tmp_path / "prompts.jsonl"), "--batch-size", "5"))
    assert batches[-1] == 5 and printed_records(capsys) == records


def test_stop_strings_cut_completions(setup, capsys):
    main(generate(setup, "--prompt", "w1 w2", "--max-new-tokens", "6"))
    whole = printed_records(capsys)[0]["completion"]
    words = whole.split()
    assert len(words) >= 3
    main(generate(setup, "--prompt", "w1 w2", "--max-new-tokens", "6", "--stop", words[2], "--stop", "absent"))
    assert printed_records(capsys)[0]["completion"] == whole[: whole.index(words[2])].strip()
    assert cut("\n a b\nc", ["\n"]) == "a b" and cut(" a b ", []) == "a b" and cut("a;b|c", ["|", ";"]) == "a"


@pytest.mark.parametrize("extra, message", [
    (["--reweighter", "{tmp}/absent", "--prompt", "w1"], r"--reweighter .*absent: no such directory"),
    (["--reweighter", "{tmp}", "--prompt", "w1"], r"--reweighter .*: .*config"),
    (["--prompts-file", "{tmp}/absent.txt"], r"--prompts-file .*absent\.txt not found"),
    (["--data", "{tmp}/absent.csv", "--template", TEMPLATE], r"Data file not found: .*absent\.csv"),
    (["--data", "{setup}/test.csv", "--template", "{missing}"], r"Template field\(s\) \['missing'\]"),
    (["--prompts-file", "{tmp}/empty.txt"], "no prompts"),
    (["--prompt", "w1", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--prompt", "w1", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--prompt", "w1", "--num-beams", "0"], "--num-beams must be at least 1, got 0"),
    (["--prompt", "w1", "--prompts-file", "{tmp}/empty.txt"], "give prompts one way"),
    (["--prompt", "w1", "--output", "{tmp}/absent/preds.jsonl"], "--output: folder .*absent does not exist"),
    (["--data", "{setup}/test.csv", "--template", TEMPLATE, "--output", "{setup}/test.csv"], "is the input file"),
    (["--prompt", "w1", "--prompt", " ".join(["w2"] * 126)],
     r"prompt 2 \('w2 w2 .*'\) has 126 tokens; with --max-new-tokens 3 that passes the reweighter's 128 positions"),
])
def test_generate_errors_come_before_the_base_is_loaded(setup, tmp_path, no_base, extra, message):
    (tmp_path / "empty.txt").write_text("\n \n")
    argv = [a.format(tmp=tmp_path, setup=setup) if "{tmp}" in a or "{setup}" in a else a for a in extra]
    if "--reweighter" in argv:
        argv = ["generate", "--base", str(setup / "base"), "--max-new-tokens", "3", *argv]
    else:
        argv = generate(setup, *argv)
    with pytest.raises(SystemExit, match=message) as caught:
        main(argv)
    assert str(caught.value).startswith("error: ") and "\n" not in str(caught.value)


def test_a_too_long_data_row_is_named(setup, tmp_path, no_base):
    write_csv(tmp_path / "long.csv", [("w1", "w2"), (" ".join(["w3"] * 130), "w4")])
    with pytest.raises(SystemExit, match=r"prompt 2 \(row 1 of .*long\.csv\) has 13\d tokens"):
        main(generate(setup, "--data", str(tmp_path / "long.csv"), "--prompt-column", "mr"))


def test_evaluate_errors_come_before_the_base_is_loaded(setup, tmp_path, no_base):
    evaluate = ["evaluate", "--base", str(setup / "base"), "--data", str(setup / "test.csv"), "--prompt-column", "mr",
                "--completion-column", "ref"]
    with pytest.raises(SystemExit, match="no such directory"):
        main(evaluate + ["--reweighter", str(tmp_path / "absent")])
    with pytest.raises(SystemExit, match=r"evaluation split: No pair of .*test\.csv fits in max_length=3 tokens .*"
                                         r"Raise --max-length \(now 3\)"):
        main(evaluate + ["--reweighter", str(setup / "plugin"), "--max-length", "3"])
    with pytest.raises(SystemExit, match="--max-length must be at least 1"):
        main(evaluate + ["--reweighter", str(setup / "plugin"), "--max-length", "0"])


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_a_missing_base_is_one_line(setup, tmp_path, command):
    argv = [command, "--base", str(tmp_path / "nothing"), "--reweighter", str(setup / "plugin")]
    argv += ["--prompt", "w1"] if command == "generate" else ["--data", str(setup / "test.csv"), "--prompt-column", "mr"]
    with pytest.raises(SystemExit, match=r"^error: cannot load base model .*nothing") as caught:
        main(argv)
    assert "\n" not in str(caught.value)


def test_train_names_the_split_that_does_not_fit(setup, tmp_path):
    with pytest.raises(SystemExit, match=r"error: training split: No pair of .*train\.csv fits in max_length=4 tokens"):
        main(["train", "--base", str(setup / "base"), "--data", str(setup / "train.csv"), "--template", TEMPLATE,
              "--completion-column", "ref", "--output-dir", str(tmp_path / "o"), "--max-length", "4", "--cpu"])


def test_library_errors_become_one_line(setup, tmp_path):
    """A reweighter for another vocabulary: the library's ValueError ends the command with its message."""
    make_plugin("llama", vocab_size=80).save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match=r"^error: .*80") as caught:
        main(["generate", "--base", str(setup / "base"), "--reweighter", str(tmp_path / "other"), "--prompt", "w1"])
    assert isinstance(caught.value.__cause__, ValueError)
