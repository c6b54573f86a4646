"""Training through the CLI on a tiny saved base: outputs, cache, schedule, resume after SIGKILL, two processes."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_plugin import PluginConfig, PluginModel
from hf_plugin.base_logits import LiveBaseModel
from hf_plugin.cli import main
from hf_plugin.commands.arguments import documented_fields, option
from hf_plugin.commands.train import TRAINING_FIELDS, add_training_arguments, training_options
from hf_plugin.data import Example, encode_examples
from hf_plugin.training import PluginTrainerState, PluginTrainingArguments, TrainerState, TrainingArguments, train

from conftest import make_base, make_plugin, make_tokenizer, task_folder, task_rows, write_csv


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return task_folder(tmp_path_factory.mktemp("training"), 32, 8)


def common(setup: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--base", str(setup / "base"), "--data", str(setup / "train.csv"),
            "--validation-data", str(setup / "validation.csv"), "--prompt-column", "mr", "--completion-column", "ref",
            "--output-dir", str(output), "--hidden-size", "32", "--intermediate-size", "64", "--num-heads", "2",
            "--max-length", "32", "--learning-rate", "3e-3", "--cpu", *extra]


def log_of(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def test_train_live_saves_the_best_reweighter(setup, tmp_path):
    out = tmp_path / "run"
    main(common(setup, out, "--epochs", "4", "--batch-size", "4", "--patience", "0"))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "training_args.json", "metrics.json",
            "log.jsonl", "loss_curve.png"} <= names
    metrics = json.loads((out / "metrics.json").read_text())
    history = [h["validation_nll"] for h in metrics["history"]]
    assert len(history) == 4 and min(history) < history[0] - 0.5, history  # it learns the task
    assert metrics["validation NLL/token"] == min(history)
    plugin = PluginModel.from_pretrained(out)
    assert plugin.config.base_vocab_size == 96 and plugin.config.tokenizer_fingerprint
    # The trained length is recorded; RoPE leaves room for longer (few-shot) prompts, which then warn.
    assert 0 < plugin.config.trained_max_length <= 32 and plugin.config.max_position_embeddings == 2048
    readme = (out / "README.md").read_text()
    assert "| learning_rate | 0.003 |" in readme and "validation NLL/token" in readme


def test_warmup_and_decay_follow_the_true_number_of_optimizer_steps(setup, tmp_path):
    out = tmp_path / "run"
    # 32 examples, batch 4 → 8 micro-batches an epoch; accumulation 3 → 3 optimizer steps an epoch (3 + 3 + 2)
    main(common(setup, out, "--epochs", "2", "--batch-size", "4", "--gradient-accumulation-steps", "3",
                "--warmup-ratio", "0.34", "--patience", "0"))
    steps = [r for r in log_of(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    rates = [r["learning_rate"] for r in steps]
    # 6 steps, 2 of warm-up: the rate rises to the peak, then falls linearly to 0 at the last step
    assert rates[0] == pytest.approx(3e-3 / 2) and rates[1] == pytest.approx(3e-3)
    assert rates[-1] == pytest.approx(0.0) and all(a > b for a, b in zip(rates[1:], rates[2:]))


def test_early_stopping_stops_and_keeps_the_best_epoch(setup, tmp_path):
    out = tmp_path / "run"
    main(common(setup, out, "--epochs", "30", "--batch-size", "4", "--patience", "1", "--learning-rate", "5e-2"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs run"] < 30
    best = min(metrics["history"], key=lambda h: h["validation_nll"])
    assert metrics["best epoch"] == best["epoch"] + 1 and metrics["history"][-1]["epoch"] == best["epoch"] + 1


def test_training_from_the_cache_never_loads_the_base(setup, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    main(["cache", "--base", str(setup / "base"), "--data", str(setup / "train.csv"), "--validation-data",
          str(setup / "validation.csv"), "--prompt-column", "mr", "--completion-column", "ref", "--cache",
          str(cache_dir), "--top-k", "16", "--max-length", "32", "--cpu"])
    assert (cache_dir / "train" / "index.json").exists() and (cache_dir / "validation" / "index.json").exists()

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr("hf_plugin.commands.common.load_base_model", refuse)
    out = tmp_path / "run"
    main(common(setup, out, "--epochs", "2", "--batch-size", "4", "--cache", str(cache_dir)))
    plugin = PluginModel.from_pretrained(out)
    assert plugin.config.base_vocab_size == 96


def run_cli(args: list[str], launcher: list[str] | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = (launcher or [sys.executable]) + ["-m", "hf_plugin", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "model.safetensors"))


def test_resume_after_sigkill_ends_with_the_same_weights(setup, tmp_path):
    write_csv(tmp_path / "long.csv", task_rows(400))  # 100 steps an epoch: time to kill it mid-epoch
    arguments = ["--data", str(tmp_path / "long.csv"), "--epochs", "2", "--batch-size", "4", "--patience", "0",
                 "--save-steps", "5"]
    reference = run_cli(common(setup, tmp_path / "straight", *arguments))
    killed_dir = tmp_path / "killed"
    victim = run_cli(common(setup, killed_dir, *arguments))
    deadline = time.time() + 120
    checkpoints = tmp_path / "killed.checkpoints"  # beside the output folder, never inside it
    while not any(int(p.name.split("-")[1]) >= 120 for p in checkpoints.glob("checkpoint-*[0-9]")):
        assert victim.poll() is None, victim.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed_dir / "model.safetensors").exists(), "the run finished before it was killed"
    resumed = run_cli(common(setup, killed_dir, *arguments, "--resume"))
    for process in (reference, resumed):
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
    expected, actual = weights(tmp_path / "straight"), weights(killed_dir)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not found")
def test_two_processes_match_one_process_with_twice_the_batch(setup, tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    arguments = ["--epochs", "2", "--patience", "0", "--gradient-accumulation-steps", "2"]
    single = run_cli(common(setup, tmp_path / "one", *arguments, "--batch-size", "4"))
    output, _ = single.communicate(timeout=300)
    assert single.returncode == 0, output[-3000:]
    double = run_cli(common(setup, tmp_path / "two", *arguments, "--batch-size", "2"),
                     launcher=[torchrun, "--nproc_per_node", "2", "--master_port", "29517"])
    output, _ = double.communicate(timeout=300)
    assert double.returncode == 0, output[-3000:]
    one, two = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert len(one) == len(two)
    for a, b in zip(one, two):
        for key in ("loss", "validation_nll"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5)
    expected, actual = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4)


def test_evaluate_and_generate_commands(setup, tmp_path, capsys):
    out = tmp_path / "run"
    main(common(setup, out, "--epochs", "3", "--batch-size", "4", "--patience", "0"))
    capsys.readouterr()
    main(["evaluate", "--base", str(setup / "base"), "--reweighter", str(out), "--data", str(setup / "validation.csv"),
          "--prompt-column", "mr", "--completion-column", "ref", "--max-length", "32", "--output", str(tmp_path / "e.json")])
    results = json.loads((tmp_path / "e.json").read_text())
    trained, alone = results["base + reweighter"]["NLL/token"], results["base alone"]["NLL/token"]
    assert trained < alone - 0.5  # the trained reweighter fits the held-out task better than the base alone
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert trained == pytest.approx(min(h["validation_nll"] for h in history), rel=1e-4)

    (tmp_path / "prompts.txt").write_text("w1 w7\nw2 w14\n")
    capsys.readouterr()
    generate = ["generate", "--base", str(setup / "base"), "--prompts-file", str(tmp_path / "prompts.txt"),
                "--max-new-tokens", "3"]
    main(generate + ["--reweighter", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split() for line in lines)
    main(generate + ["--plugin", str(out)])  # the flag's former name still works, hidden and deprecated
    printed = capsys.readouterr()
    assert printed.out.strip().splitlines() == lines and "--plugin is deprecated, use --reweighter" in printed.err
    with pytest.raises(SystemExit, match="pass exactly one of --reweighter DIR, --no-reweighter"):
        main(["generate", "--base", str(setup / "base"), "--prompt", "w1"])


def test_cli_errors_are_clear(setup, tmp_path):
    base = ["train", "--base", str(setup / "base"), "--output-dir", str(tmp_path / "o"), "--completion-column", "ref"]
    with pytest.raises(SystemExit, match="Data file not found"):
        main(base + ["--data", str(tmp_path / "missing.csv")])
    with pytest.raises(SystemExit, match=r"no column\(s\) \['prompt'\]"):
        main(base + ["--data", str(setup / "train.csv")])
    with pytest.raises(SystemExit, match=r"--reweighter .*: The reweighter's config"):  # checked before the base
        main(["evaluate", "--base", str(tmp_path / "nothing"), "--reweighter", str(tmp_path),
              "--data", str(setup / "train.csv")])


def refuse_to_load(monkeypatch, *names: str) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the arguments were checked")

    for name in names:
        monkeypatch.setattr(f"hf_plugin.commands.common.{name}", refuse)


@pytest.mark.parametrize("argument, message", [
    (["--epochs", "0"], "`epochs` must be at least 1, got 0"),
    (["--batch-size", "0"], "`batch_size` must be at least 1, got 0"),
    (["--learning-rate", "-1"], "`learning_rate` must be a positive number, got -1.0"),
    (["--weight-decay", "-0.1"], "`weight_decay` must be at least 0, got -0.1"),
    (["--patience", "-1"], "`patience` must be at least 0, got -1"),
    (["--save-steps", "-5"], "`save_steps` must be at least 0, got -5"),
    (["--warmup-ratio", "1"], "`warmup_ratio` must be in"),
])
def test_bad_training_arguments_fail_before_anything_is_loaded(setup, tmp_path, monkeypatch, argument, message):
    refuse_to_load(monkeypatch, "load_base_model", "load_tokenizer")
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        main(common(setup, tmp_path / "run", *argument))
    assert not (tmp_path / "run").exists()


def test_training_arguments_checkpoint_dir_and_keep_checkpoints(tmp_path):
    args = PluginTrainingArguments(output_dir=str(tmp_path / "run"))
    assert Path(args.checkpoint_dir) == (tmp_path / "run.checkpoints").resolve() and args.keep_checkpoints == 1
    assert "checkpoint_dir" not in args.run_defining() and args.run_defining()["learning_rate"] == 1e-3
    with pytest.raises(ValueError, match="`keep_checkpoints` must be at least 1, got 0"):  # resume needs one
        PluginTrainingArguments(output_dir=str(tmp_path / "run"), keep_checkpoints=0)
    with pytest.raises(ValueError, match="is inside `output_dir`"):
        PluginTrainingArguments(output_dir=str(tmp_path / "run"), checkpoint_dir=str(tmp_path / "run" / "checkpoints"))
    with pytest.raises(ValueError, match="is inside `checkpoint_dir`"):  # removed after the run, with the model
        PluginTrainingArguments(output_dir=str(tmp_path / "runs" / "best-model"), checkpoint_dir=str(tmp_path / "runs"))


@pytest.mark.parametrize("alpha", [-0.5, float("inf"), float("nan")])
def test_training_takes_alpha_by_the_rule_of_the_config_and_the_processor(tmp_path, alpha):
    with pytest.raises(ValueError, match="`alpha` must be a non-negative finite number"):
        PluginTrainingArguments(output_dir=str(tmp_path / "run"), alpha=alpha)
    with pytest.raises(ValueError, match="`alpha` must be a non-negative finite number"):
        PluginConfig(alpha=alpha)
    assert PluginTrainingArguments(output_dir=str(tmp_path / "run"), alpha=0).alpha == 0  # the base alone


def test_the_names_shared_with_transformers_still_work_and_warn(tmp_path):
    with pytest.warns(FutureWarning, match="`hf_plugin.training.TrainingArguments` is renamed `PluginTrainingArguments`"):
        args = TrainingArguments(output_dir=str(tmp_path / "run"), epochs=2)
    assert isinstance(args, PluginTrainingArguments)
    assert args.run_defining() == PluginTrainingArguments(output_dir=str(tmp_path / "run"), epochs=2).run_defining()
    with pytest.warns(FutureWarning, match="renamed `PluginTrainerState`"):
        state = TrainerState(global_step=3)
    assert isinstance(state, PluginTrainerState) and state.global_step == 3


def test_a_folder_holding_files_a_run_writes_needs_overwrite(setup, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# My project")
    refuse_to_load(monkeypatch, "load_base_model", "load_tokenizer")
    with pytest.raises(SystemExit, match=r"project already holds README.md, which a run writes; pass --overwrite"):
        main(common(setup, project, "--epochs", "1"))
    assert (project / "README.md").read_text() == "# My project"


def test_a_finished_run_removes_only_its_own_checkpoints(setup, tmp_path):
    shared = tmp_path / "shared"
    (shared / "checkpoint-notes").mkdir(parents=True)
    (shared / "best_model.pt").write_text("the user's")
    main(common(setup, tmp_path / "run", "--checkpoint-dir", str(shared), "--epochs", "1", "--batch-size", "8"))
    assert sorted(p.name for p in shared.iterdir()) == ["best_model.pt", "checkpoint-notes"]
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_training_flags_take_the_default_and_the_documentation_of_their_field(tmp_path):
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    actions = {action.dest: action for action in parser._actions}
    fields = {field.name: field for field in dataclasses.fields(PluginTrainingArguments)}
    documented = documented_fields(PluginTrainingArguments)
    assert documented.keys() == fields.keys()  # every field has its `Args:` entry
    for name in TRAINING_FIELDS:
        action = actions[name]
        assert action.option_strings == [option(name)] and action.default == fields[name].default
        assert action.help.startswith(documented[name][1]), name
    assert actions["batch_size"].help == "examples per process per micro-batch. (default: %(default)s)"
    assert actions["mixed_precision"].choices == ("no", "fp16", "bf16")
    assert actions["keep_checkpoints_after_run"].help.startswith("keep `checkpoint_dir` after a run that finished;")
    for name, (kind, _) in documented.items():  # the docstring's "defaults to" is the field's default
        if "defaults to " in kind:
            assert ast.literal_eval(kind.split("defaults to ")[1].strip("`")) == fields[name].default, name
    # no flag given: the arguments of the dataclass's own defaults
    args = parser.parse_args(["--output-dir", str(tmp_path / "run")])
    built = PluginTrainingArguments(output_dir=str(tmp_path / "run"), **training_options(args))
    assert built == PluginTrainingArguments(output_dir=str(tmp_path / "run"))
    assert training_options(parser.parse_args(["--output-dir", "run", "--keep-checkpoints", "3"]))[
        "keep_checkpoints"] == 3


def test_keep_checkpoints_counts_and_the_bare_flag_still_keeps_the_folder(setup, tmp_path, capsys):
    arguments = ["--epochs", "1", "--batch-size", "8", "--save-steps", "1"]  # 4 steps, a checkpoint at each
    main(common(setup, tmp_path / "count", *arguments, "--keep-checkpoints", "3", "--keep-checkpoints-after-run"))
    names = sorted(p.name for p in (tmp_path / "count.checkpoints").iterdir())
    assert names == ["best"] + [f"checkpoint-{step:08d}" for step in (2, 3, 4)], names
    assert "warning" not in capsys.readouterr().err
    main(common(setup, tmp_path / "removed", *arguments, "--keep-checkpoints", "3"))
    assert not (tmp_path / "removed.checkpoints").exists()  # a count alone: removed after the run, as by default
    assert "warning" not in capsys.readouterr().err
    # The switch it was before: it keeps the folder (and the newest checkpoint while training), with a warning; a
    # flag after it is not taken for its count.
    main(common(setup, tmp_path / "bare", "--keep-checkpoints", *arguments))
    names = sorted(p.name for p in (tmp_path / "bare.checkpoints").iterdir())
    assert names == ["best", "checkpoint-00000004"], names
    assert "warning: --keep-checkpoints without a count is deprecated, use --keep-checkpoints-after-run" in \
        capsys.readouterr().err


def test_keep_checkpoints_keeps_the_newest_ones(tmp_path):
    tokenizer = make_tokenizer()
    examples = encode_examples(tokenizer, [Example(p, c, row) for row, (p, c) in enumerate(task_rows(16))], max_length=32)
    source = LiveBaseModel(make_base("llama"))
    common_args = dict(epochs=2, batch_size=4, save_steps=1, patience=0, keep_checkpoints_after_run=True)
    for keep in (1, 3):
        args = PluginTrainingArguments(output_dir=str(tmp_path / f"keep{keep}"), keep_checkpoints=keep, **common_args)
        train(make_plugin("llama"), examples[:12], examples[12:], source, args, tokenizer=tokenizer)
        names = sorted(p.name for p in Path(args.checkpoint_dir).iterdir())
        # 3 steps an epoch, 2 epochs: checkpoints at every step, the newest `keep` of them stay, and `best/`
        assert names == ["best"] + [f"checkpoint-{step:08d}" for step in range(7 - keep, 7)], names


def test_finished_run_reports_base_nll_removes_checkpoints_and_a_used_folder_needs_overwrite(
        setup, tmp_path, monkeypatch, capsys):
    out, checkpoints = tmp_path / "run", tmp_path / "run.checkpoints"
    main(common(setup, out, "--epochs", "2", "--batch-size", "4", "--patience", "0"))
    assert not checkpoints.exists() and not any(p.is_dir() for p in out.iterdir())  # nothing left but the outputs
    printed = capsys.readouterr().out
    assert "epoch 1/2: validation NLL/token" in printed and "epoch 2/2: validation NLL/token" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    base_nll = metrics["base validation NLL/token"]
    assert base_nll > metrics["validation NLL/token"] + 0.5 and f"(base model alone {base_nll:.4f})" in printed
    assert all(r["base_validation_nll"] == base_nll for r in log_of(out) if "validation_nll" in r)
    assert "| base validation NLL/token |" in (out / "README.md").read_text()

    refuse_to_load(monkeypatch, "load_base_model", "load_tokenizer")
    with pytest.raises(SystemExit, match=r"run already holds a reweighter \(model.safetensors\); pass --overwrite"):
        main(common(setup, out, "--epochs", "1", "--batch-size", "4"))
    (tmp_path / "killed.checkpoints" / "checkpoint-00000005").mkdir(parents=True)  # what a killed run leaves
    with pytest.raises(SystemExit, match=r"killed.checkpoints holds the checkpoints of another run; pass --resume"):
        main(common(setup, tmp_path / "killed", "--epochs", "1", "--batch-size", "4"))
    monkeypatch.undo()

    main(common(setup, out, "--epochs", "1", "--batch-size", "4", "--overwrite", "--keep-checkpoints-after-run"))
    assert [r["epoch"] for r in log_of(out) if "validation_nll" in r] == [0]  # a new log, not appended to
    assert json.loads((out / "metrics.json").read_text())["epochs run"] == 1
    # kept on request; while training only the newest checkpoint (what resume needs) and `best/` exist
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "checkpoint-00000008"]


def test_a_second_run_into_the_same_folders_is_refused_while_the_first_runs(setup, tmp_path):
    out, checkpoints = tmp_path / "run", tmp_path / "run.checkpoints"
    checkpoints.mkdir()
    with open(checkpoints / ".lock", "w") as handle:  # what a run in progress holds
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match=r"Another training run is using .*run.checkpoints"):
            main(common(setup, out, "--epochs", "1", "--batch-size", "4"))
        assert not out.exists()
    # once it is released (the holder ended or was killed) a run goes ahead and leaves no lock behind
    main(common(setup, out, "--epochs", "1", "--batch-size", "4", "--keep-checkpoints-after-run"))
    assert (out / "model.safetensors").exists() and not (checkpoints / ".lock").exists()


def test_resume_refuses_a_checkpoint_of_another_run(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    arguments = ["--epochs", "1", "--batch-size", "4"]
    with pytest.raises(SystemExit, match=r"--resume given but .*run.checkpoints holds no checkpoint"):
        main(common(setup, out, *arguments, "--resume"))
    main(common(setup, out, *arguments, "--keep-checkpoints-after-run"))
    write_csv(tmp_path / "other.csv", task_rows(32, offset=50))

    refuse_to_load(monkeypatch, "load_base_model")  # arguments and data are compared before the base model loads
    with pytest.raises(SystemExit, match=r"learning_rate 0.003 in the checkpoint, 0.001 now\.$"):
        main(common(setup, out, *arguments, "--resume", "--learning-rate", "1e-3"))
    with pytest.raises(SystemExit, match=r"training data sha256:\w+ in the checkpoint, sha256:\w+ now\.$"):
        main(common(setup, out, *arguments, "--resume", "--data", str(tmp_path / "other.csv")))
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"reweighter hidden_size 32 in the checkpoint, 16 now") as error:
        main(common(setup, out, *arguments, "--resume", "--hidden-size", "16"))
    assert "\n" not in str(error.value) and "intermediate_size" not in str(error.value)
    main(common(setup, out, *arguments, "--resume"))  # the same run resumes


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_leaves_no_model(setup, tmp_path):
    out = tmp_path / "run"
    main(common(setup, out, "--epochs", "1", "--batch-size", "4"))  # an earlier model in the folder
    with pytest.raises(SystemExit, match=r"training loss is nan at optimizer step \d+ \(epoch 1\): the run diverged"):
        main(common(setup, out, "--epochs", "3", "--batch-size", "4", "--learning-rate", "1e30", "--overwrite"))
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert not any("validation_nll" in r for r in log_of(out))  # the earlier run's log was not appended to


def test_demonstrations_with_a_cache_and_pairs_skipped_for_length(tmp_path, capsys):
    # Used to fail at the first validation pass (an IndexError in the cache's offsets, or "The batch does not match
    # the cache's completion positions"): skipped pairs shifted every later example onto another's cache rows.
    folder = task_folder(tmp_path, 4, 2)
    rows = [(" ".join([f"w{i + 20}"] + [f"w{j}" for j in range(i % 6)]), f"w{i % 7} w{i % 3} w{i % 5}") for i in range(48)]
    write_csv(tmp_path / "varied.csv", rows)
    argv = ["train", "--base", str(folder / "base"), "--data", str(tmp_path / "varied.csv"), "--prompt-column", "mr",
            "--completion-column", "ref", "--validation-fraction", "0.25", "--demonstrations", "3", "--cache",
            str(tmp_path / "cache"), "--hidden-size", "32", "--intermediate-size", "64", "--num-heads", "2",
            "--epochs", "1", "--cpu", "--output-dir", str(tmp_path / "out"), "--max-length", "29"]
    main(argv)
    err = capsys.readouterr().err
    assert "training pairs (42%) are longer than --max-length 29 and are skipped; --max-length 33 keeps 95% of them, " \
           "33 all" in err, err
    assert PluginModel.from_pretrained(tmp_path / "out").config.trained_max_length <= 29
