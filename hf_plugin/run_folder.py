"""The folders of a training run: `output_dir` (what gets shared) and `checkpoint_dir` (what only resuming needs).

`hf_plugin.training.train` uses these to lock the folders against a second run, refuse to overwrite another run's
outputs, check that a checkpoint belongs to the run resuming from it, and clear what a run leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from .completions import examples_fingerprint
from .data import EncodedExample
from .hub import WEIGHTS_FILE, WEIGHTS_INDEX_FILE, saved_files


if TYPE_CHECKING:
    from .training import PluginTrainingArguments

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
BEST_DIR = "best"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
CHECKPOINT_DIR_SUFFIX = ".checkpoints"
# Files a training run writes in `output_dir` besides the saved reweighter.
TRAINING_OUTPUTS = ("training_args.json", "metrics.json", "log.jsonl", "loss_curve.png")
# Config fields that do not describe the reweighter (versions, names, defaults of `PreTrainedConfig`).
_VOLATILE_CONFIG_FIELDS = ("hf_plugin_version", "transformers_version", "_name_or_path", "architectures", "dtype")


def complete_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """The complete checkpoints in `checkpoint_dir`, oldest first (temporary, unfinished ones are ignored)."""
    candidates = [p for p in Path(checkpoint_dir).glob(f"{CHECKPOINT_PREFIX}*")
                  if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(candidates, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `checkpoint_dir` (temporary, unfinished ones are ignored)."""
    return (complete_checkpoints(checkpoint_dir) or [None])[-1]


def replace_folder(temporary: Path, final: Path) -> None:
    """Puts the finished `temporary` folder in place of `final`: a save killed before this is never taken for a
    complete one."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)


def run_record(args: PluginTrainingArguments, train_examples: Sequence[EncodedExample],
               validation_examples: Sequence[EncodedExample], config=None, num_processes: int = 1) -> dict:
    """What defines a run, saved with each checkpoint: the arguments that decide the weights, the number of
    processes, the fingerprints of both splits and the reweighter's config (flattened one level, as `a.b`)."""
    record = {**args.run_defining(), "processes": num_processes,
              "training data": examples_fingerprint(train_examples),
              "validation data": examples_fingerprint(validation_examples)}
    if config is not None:
        for key, value in json.loads(config.to_json_string(use_diff=False)).items():
            if key in _VOLATILE_CONFIG_FIELDS:
                continue
            if isinstance(value, dict):
                record.update({f"reweighter {key}.{k}": v for k, v in value.items() if k not in _VOLATILE_CONFIG_FIELDS})
            else:
                record[f"reweighter {key}"] = value
    return record


def check_resume(args: PluginTrainingArguments, train_examples: Sequence[EncodedExample],
                 validation_examples: Sequence[EncodedExample], config=None, num_processes: int = 1) -> Path:
    """The checkpoint to resume from, after checking that it belongs to this run.

    Args:
        args (`PluginTrainingArguments`): this run's arguments; the checkpoints are looked for in `args.checkpoint_dir`.
        train_examples, validation_examples (`Sequence[EncodedExample]`): this run's data.
        config (`PluginConfig`, *optional*): this run's reweighter config, compared when given.
        num_processes (`int`, *optional*, defaults to 1): this run's number of processes.

    Raises:
        `FileNotFoundError`: there is no checkpoint to resume from.
        `ValueError`: the checkpoint was written by a run with other arguments, data or architecture; the message
            names what differs.
    """
    checkpoint = latest_checkpoint(args.checkpoint_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"Cannot resume: {args.checkpoint_dir} holds no checkpoint.")
    recorded_path = checkpoint / RUN_FILE
    if not recorded_path.is_file():
        raise ValueError(f"Cannot resume from {checkpoint}: it does not record the run it belongs to ({RUN_FILE}).")
    recorded = json.loads(recorded_path.read_text())
    current = run_record(args, train_examples, validation_examples, config, num_processes)
    if config is None:  # only what can be compared before the reweighter exists
        recorded = {key: value for key, value in recorded.items() if not key.startswith("reweighter ")}
    differences = [f"{key} {recorded.get(key)} in the checkpoint, {current.get(key)} now"
                   for key in dict.fromkeys([*recorded, *current]) if recorded.get(key) != current.get(key)]
    if differences:
        raise ValueError(f"Cannot resume from {checkpoint}, it belongs to another run: {'; '.join(differences)}.")
    return checkpoint


def check_output_dir(args: PluginTrainingArguments, resume: bool = False) -> None:
    """Refuses to start a new run over the outputs of another unless `args.overwrite_output_dir` is set.

    Raises:
        `ValueError`: `output_dir` holds a reweighter or `checkpoint_dir` holds checkpoints, and neither `resume`
            nor `args.overwrite_output_dir` was given.
    """
    if resume or args.overwrite_output_dir:
        return
    reweighter = [name for name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE, "config.json")
                  if (Path(args.output_dir) / name).exists()]
    if reweighter:
        raise ValueError(f"{args.output_dir} already holds a reweighter ({reweighter[0]}); pass "
                         "`overwrite_output_dir=True` to replace it, or choose another output directory.")
    if complete_checkpoints(args.checkpoint_dir) or (Path(args.checkpoint_dir) / BEST_DIR).exists():
        raise ValueError(f"{args.checkpoint_dir} holds the checkpoints of another run; pass `resume=True` to continue "
                         "it or `overwrite_output_dir=True` to start again.")
    output_dir = Path(args.output_dir)
    replaced = [name for name in TRAINING_OUTPUTS if (output_dir / name).exists()]
    replaced = (saved_files(output_dir) if output_dir.is_dir() else []) + replaced
    if replaced:  # e.g. output_dir="." in a project: its README.md would become the model card
        raise ValueError(f"{args.output_dir} already holds {', '.join(replaced)}, which a run writes; pass "
                         "`overwrite_output_dir=True` to replace them, or choose another output directory.")


def remove_old_outputs(args: PluginTrainingArguments) -> None:
    """Removes what an earlier run wrote in `output_dir` and `checkpoint_dir` (and nothing else)."""
    output_dir = Path(args.output_dir)
    if output_dir.is_dir():
        for name in [*saved_files(output_dir), *TRAINING_OUTPUTS]:
            (output_dir / name).unlink(missing_ok=True)
    remove_checkpoints(Path(args.checkpoint_dir))


@contextmanager
def run_lock(checkpoint_dir: Path):
    """Holds an exclusive lock on `checkpoint_dir` while a run uses it: a second run into the same folders fails at
    once instead of mixing its checkpoints, best weights and log with the first one's. The lock dies with the
    process, so a killed run never blocks a resumed one."""
    if fcntl is None:  # no POSIX locks (Windows): runs are not guarded against each other
        yield
        return
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with open(checkpoint_dir / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"Another training run is using {checkpoint_dir}; wait for it to end or choose another "
                             "output_dir / checkpoint_dir.") from None
        try:
            yield
        finally:  # still held: no other run can have taken it; an emptied folder goes too
            (checkpoint_dir / LOCK_FILE).unlink(missing_ok=True)
            if not any(checkpoint_dir.iterdir()):
                checkpoint_dir.rmdir()


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """Removes the checkpoints and `best/` (finished or not), then `checkpoint_dir` itself if nothing else is left."""
    # Only the names `train` writes: a shared --checkpoint-dir may hold a user's `best_model.pt` or `checkpoint-old/`.
    ours = [path for path in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*")
            if path.name.removeprefix(CHECKPOINT_PREFIX).removesuffix(".tmp").isdigit()]
    ours += [checkpoint_dir / BEST_DIR, checkpoint_dir / (BEST_DIR + ".tmp")]
    for path in ours:
        if path.is_dir():
            shutil.rmtree(path)
    if checkpoint_dir.is_dir() and not any(checkpoint_dir.iterdir()):
        checkpoint_dir.rmdir()
