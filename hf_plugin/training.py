"""Training a reweighter against a frozen base model with Accelerate: one CPU or many processes."""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup
from transformers.utils import logging

from .base_logits import LossSource
from .combine import check_alpha
from .compatibility import renamed_keyword
from .completions import loss_positions
from .data import EncodedExample, collate
from .modeling_plugin import CompletionLogits, PluginModel
from .run_folder import (BEST_DIR, CHECKPOINT_DIR_SUFFIX, CHECKPOINT_PREFIX, RUN_FILE, STATE_FILE, check_output_dir,
                         check_resume, complete_checkpoints, remove_checkpoints, remove_old_outputs, replace_folder,
                         run_lock, run_record)
# Imported from here before the run-folder helpers had their own module.
from .run_folder import latest_checkpoint  # noqa: F401


logger = logging.get_logger(__name__)

# Arguments that do not change the trained weights: a resumed run may change them.
BOOKKEEPING_ARGUMENTS = ("output_dir", "checkpoint_dir", "overwrite_output_dir", "log_with", "save_steps",
                         "eval_batch_size", "keep_checkpoints", "keep_checkpoints_after_run")
MIXED_PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class PluginTrainingArguments:
    """Hyper-parameters and bookkeeping of `train` (formerly `TrainingArguments`, still importable as a deprecated
    alias). `hf-plugin train` and `unlearn` take the plain options among them as flags of the same names
    (`batch_size` -> `--batch-size`), with these defaults and the entries below as help (see
    `hf_plugin.commands.arguments.add_dataclass_arguments`).

    Args:
        output_dir (`str`): where the final reweighter, its card and the logs go. Only what `save_pretrained` writes
            there is ever pushed (`hf_plugin.hub.push_folder`); training state lives in `checkpoint_dir`.
        checkpoint_dir (`str`, *optional*): where checkpoints and the best epoch's weights (`best/`) go while
            training; defaults to `<output_dir>.checkpoints`, beside `output_dir` and never inside it.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`): allow a new run where `output_dir` already
            holds a reweighter or `checkpoint_dir` holds checkpoints; their old outputs are removed first.
        epochs (`int`, *optional*, defaults to 4): passes over the training data.
        batch_size (`int`, *optional*, defaults to 16): examples per process per micro-batch.
        gradient_accumulation_steps (`int`, *optional*, defaults to 1): micro-batches per optimizer step.
        learning_rate (`float`, *optional*, defaults to 1e-3): peak AdamW learning rate.
        weight_decay (`float`, *optional*, defaults to 0.0): AdamW weight decay (never on norms and biases).
        warmup_ratio (`float`, *optional*, defaults to 0.06): share of the optimizer steps spent warming up.
        max_grad_norm (`float`, *optional*, defaults to 1.0): gradient-norm clipping (0 turns it off).
        patience (`int`, *optional*, defaults to 2): epochs without a better validation NLL before stopping;
            0 turns early stopping off.
        save_steps (`int`, *optional*, defaults to 0): also checkpoint every this many optimizer steps (0: only
            at the end of each epoch).
        eval_batch_size (`int`, *optional*, defaults to 32): validation batch size.
        seed (`int`, *optional*, defaults to 0): seed of the training data order. The reweighter's initial weights
            are whatever `train` is given: seed torch before building it (the CLI does, with the same seed).
        mixed_precision (`str`, *optional*, defaults to `"no"`): `"no"`, `"fp16"` or `"bf16"`.
        log_with (`str`, *optional*): an Accelerate tracker (e.g. `"tensorboard"`), besides the JSON-lines log.
        alpha (`float`, *optional*): strength used in the loss, a finite number >= 0 as everywhere; defaults to the
            reweighter's `config.alpha`.
        keep_checkpoints (`int`, *optional*, defaults to 1): how many of the newest checkpoints to keep while
            training; at least 1, since resuming needs the latest.
        keep_checkpoints_after_run (`bool`, *optional*, defaults to `False`): keep `checkpoint_dir` after a run that
            finished; by default it is removed (a checkpoint holds the optimizer state, about 3x the weights).
    """

    output_dir: str
    checkpoint_dir: str | None = None
    overwrite_output_dir: bool = False
    epochs: int = 4
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    patience: int = 2
    save_steps: int = 0
    eval_batch_size: int = 32
    seed: int = 0
    mixed_precision: str = field(default="no", metadata={"choices": MIXED_PRECISIONS})
    log_with: str | None = None
    alpha: float | None = None
    keep_checkpoints: int = 1
    keep_checkpoints_after_run: bool = False

    def __post_init__(self):
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "eval_batch_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        for name in ("weight_decay", "max_grad_norm", "patience", "save_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be at least 0, got {getattr(self, name)}.")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ValueError(f"`learning_rate` must be a positive number, got {self.learning_rate}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio}.")
        if self.alpha is not None:
            check_alpha(self.alpha)
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"`mixed_precision` must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        output = Path(self.output_dir)
        if self.checkpoint_dir is None:
            # Beside the output folder, never inside it (resolved, so that "." or "runs/" get a sibling too).
            resolved = output.resolve()
            self.checkpoint_dir = str(resolved.with_name(resolved.name + CHECKPOINT_DIR_SUFFIX))
        if Path(self.checkpoint_dir).resolve().is_relative_to(output.resolve()):
            raise ValueError(f"`checkpoint_dir` {self.checkpoint_dir} is inside `output_dir` {self.output_dir}: training "
                             "state must stay out of the folder that gets shared.")
        if output.resolve().is_relative_to(Path(self.checkpoint_dir).resolve()):
            raise ValueError(f"`output_dir` {self.output_dir} is inside `checkpoint_dir` {self.checkpoint_dir}, which is "
                             "removed after the run: put them side by side.")

    def run_defining(self) -> dict:
        """The arguments that decide the trained weights (not paths, logging or checkpoint bookkeeping)."""
        return {key: value for key, value in asdict(self).items() if key not in BOOKKEEPING_ARGUMENTS}


@dataclass
class PluginTrainerState:
    """Where a run is; saved with every checkpoint so `resume` continues exactly (formerly `TrainerState`)."""

    epoch: int = 0
    batches_done_in_epoch: int = 0
    global_step: int = 0
    best_validation_nll: float = math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    base_validation_nll: float | None = None
    history: list[dict] = field(default_factory=list)


def _renamed(new: type, old_name: str) -> type:
    """`new` under the name it had before, warning when built: code written against the old name keeps working."""

    def __init__(self, *args, **kwargs):
        warnings.warn(f"`hf_plugin.training.{old_name}` is renamed `{new.__name__}` (the old name is a transformers "
                      "class too) and will be removed in a future version.", FutureWarning, stacklevel=2)
        new.__init__(self, *args, **kwargs)

    return type(old_name, (new,), {"__init__": __init__, "__module__": __name__,
                                   "__doc__": f"Deprecated alias of `{new.__name__}`."})


# Deprecated: the names of transformers classes that the same users import.
TrainingArguments = _renamed(PluginTrainingArguments, "TrainingArguments")
TrainerState = _renamed(PluginTrainerState, "TrainerState")


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Trainer:
    """The training loop of one run of `train`, once its folders are locked and checked: optimizer steps, validation
    after every epoch, the best epoch's weights in `checkpoint_dir/best` and resumable checkpoints.

    `train` builds it and owns what surrounds the loop (checking and clearing the folders, saving the final
    reweighter); `run` trains and returns the state a checkpoint records.

    Args:
        reweighter (`PluginModel`): the model to train, in place.
        train_examples, validation_examples (`Sequence[EncodedExample]`): tokenised data (`hf_plugin.data`).
        train_source (`LossSource`): the training loss.
        validation_source (`LossSource`): the validation loss (the NLL that picks the best epoch).
        args (`PluginTrainingArguments`): hyper-parameters and folders.
        pad_token_id (`int`): padding id for batching.
        accelerator (`Accelerator`): the processes sharing the run.
        run_record (`dict`): what defines the run (`hf_plugin.run_folder.run_record`), saved with each checkpoint.
        export (`Callable[[PluginModel], PluginModel]`, *optional*): the form of the model saved as the best
            weights; defaults to the model itself.
    """

    def __init__(
        self,
        *,
        reweighter: PluginModel,
        train_examples: Sequence[EncodedExample],
        validation_examples: Sequence[EncodedExample],
        train_source: LossSource,
        validation_source: LossSource,
        args: PluginTrainingArguments,
        pad_token_id: int,
        accelerator: Accelerator,
        run_record: dict,
        export: Callable[[PluginModel], PluginModel] | None = None,
    ):
        self.args = args
        self.export = export or (lambda model: model)
        self.accelerator = accelerator
        self.train_source = train_source
        self.validation_source = validation_source
        self.alpha = reweighter.config.alpha if args.alpha is None else args.alpha
        self.pad_token_id = pad_token_id
        self.output_dir, self.checkpoint_dir = Path(args.output_dir), Path(args.checkpoint_dir)
        self.run_record = run_record
        self.generator = torch.Generator()
        sampler = RandomSampler(train_examples, generator=self.generator)
        loader = DataLoader(list(train_examples), batch_size=args.batch_size, sampler=sampler,
                            collate_fn=partial(collate, pad_token_id=pad_token_id))
        # The fused kernel updates all parameters in one pass: a large share of a step for a reweighter whose
        # embedding and output layers dominate its size.
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in reweighter.parameters())
        optimizer = torch.optim.AdamW(_parameter_groups(reweighter, args.weight_decay), lr=args.learning_rate,
                                      fused=fused)
        self.model, self.optimizer, self.loader = accelerator.prepare(CompletionLogits(reweighter), optimizer, loader)
        # Validation is split by hand (every process takes a stride) so that no example is counted twice.
        rank, world = accelerator.process_index, accelerator.num_processes
        self.validation = list(validation_examples)[rank::world]
        self.steps_per_epoch = math.ceil(len(self.loader) / args.gradient_accumulation_steps)
        self.total_steps = self.steps_per_epoch * args.epochs
        # The schedule counts true optimizer steps (accumulation and processes included). It is not given to
        # `prepare`, which would step it once per process.
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, round(args.warmup_ratio * self.total_steps), self.total_steps
        )
        accelerator.register_for_checkpointing(self.scheduler)
        self.state = PluginTrainerState()

    def run(self, checkpoint: Path | None) -> PluginTrainerState:
        """Trains from the start, or from `checkpoint` (checked by `check_resume`)."""
        args, accelerator = self.args, self.accelerator
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))
            self.state = PluginTrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))
            logger.info(f"Resumed from {checkpoint} (step {self.state.global_step}).")
        if self.state.base_validation_nll is None:  # once per run: what the validation NLL is to be compared with
            self.state.base_validation_nll = self.evaluate(alpha=0.0)
        progress = tqdm(total=self.total_steps, initial=self.state.global_step, disable=not accelerator.is_main_process,
                        desc="training")
        while self.state.epoch < args.epochs:
            self._train_epoch(progress)
            if self._end_epoch():
                break
        progress.close()
        return self.state

    def _micro_batch_groups(self):
        self.generator.manual_seed(self.args.seed + self.state.epoch)  # the same order on every process and resume
        loader = self.accelerator.skip_first_batches(self.loader, self.state.batches_done_in_epoch)
        group = []
        for batch in loader:
            group.append(batch)
            if len(group) == self.args.gradient_accumulation_steps:
                yield group
                group = []
        if group:
            yield group

    def _train_epoch(self, progress) -> None:
        args, accelerator = self.args, self.accelerator
        self.model.train()
        started, tokens_seen = time.perf_counter(), 0
        self.epoch_started = started
        for group in self._micro_batch_groups():
            local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
            total_tokens = accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum").item()
            loss_sum = torch.zeros((), device=accelerator.device)
            for position, batch in enumerate(group):
                # Gradients are averaged over processes, so each process scales its token sum by their number:
                # the step then minimises the mean NLL over all tokens of all processes, as one process would.
                sync = position == len(group) - 1
                with (nullcontext() if sync else accelerator.no_sync(self.model)), accelerator.autocast():
                    logits = self.model(batch["input_ids"], batch["attention_mask"], loss_positions(batch["labels"]))
                    nll = self.train_source.nll(logits, batch, self.alpha)
                    loss = nll.sum() * accelerator.num_processes / total_tokens
                accelerator.backward(loss)
                loss_sum += nll.detach().sum()
            step_loss = accelerator.reduce(loss_sum, "sum").item() / total_tokens
            if not math.isfinite(step_loss):  # every process sees the same reduced loss, so all stop here together
                raise FloatingPointError(
                    f"The training loss is {step_loss} at optimizer step {self.state.global_step + 1} (epoch "
                    f"{self.state.epoch + 1}): the run diverged (try a lower learning rate); no model was saved."
                )
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            self.state.global_step += 1
            self.state.batches_done_in_epoch += len(group)
            tokens_seen += total_tokens
            record = {"step": self.state.global_step, "epoch": self.state.epoch, "loss": step_loss,
                      "learning_rate": self.scheduler.get_last_lr()[0],
                      "tokens_per_second": tokens_seen / (time.perf_counter() - started)}
            self._log(record)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
            if args.save_steps and self.state.global_step % args.save_steps == 0:
                self._checkpoint()

    def _end_epoch(self) -> bool:
        """Validates, keeps the best weights, checkpoints; returns True when early stopping ends the run."""
        train_seconds = time.perf_counter() - self.epoch_started
        nll = self.evaluate()
        state = self.state
        if not math.isfinite(nll):
            raise FloatingPointError(f"The validation NLL is {nll} after epoch {state.epoch + 1}: the run diverged (try a "
                                     "lower learning rate); no model was saved.")
        improved = nll < state.best_validation_nll
        if improved:
            state.best_validation_nll, state.best_epoch, state.epochs_without_improvement = nll, state.epoch, 0
            self._save_best()
        else:
            state.epochs_without_improvement += 1
        entry = {"epoch": state.epoch, "step": state.global_step, "validation_nll": nll,
                 "validation_perplexity": math.exp(min(nll, 50.0)), "base_validation_nll": state.base_validation_nll,
                 "best": improved, "train_seconds": train_seconds}
        state.history.append(entry)
        self._log(entry)
        if self.accelerator.is_main_process:
            # A loss that is not the combination with a base (e.g. `UnlearningLoss`) names what alpha=0 gives instead.
            reference = getattr(self.validation_source, "reference_name", "base model alone")
            tqdm.write(f"epoch {state.epoch + 1}/{self.args.epochs}: validation NLL/token {nll:.4f} ({reference} "
                       f"{state.base_validation_nll:.4f}){', best so far' if improved else ''}")
        state.epoch += 1
        state.batches_done_in_epoch = 0
        self._checkpoint()
        return bool(self.args.patience) and state.epochs_without_improvement >= self.args.patience

    def evaluate(self, alpha: float | None = None) -> float:
        """Mean NLL per completion token on the validation examples, over all processes (`alpha=0.0`: the base's)."""
        self.model.eval()
        alpha = self.alpha if alpha is None else alpha
        total, count = completion_nll(self.model, self.validation, self.validation_source, alpha,
                                      self.pad_token_id, self.args.eval_batch_size, self.accelerator.device)
        self.model.train()
        sums = self.accelerator.reduce(torch.tensor([total, count], dtype=torch.float64, device=self.accelerator.device))
        return (sums[0] / sums[1]).item()

    def _save_best(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            final, temporary = self.checkpoint_dir / BEST_DIR, self.checkpoint_dir / (BEST_DIR + ".tmp")
            shutil.rmtree(temporary, ignore_errors=True)
            self.export(self.accelerator.unwrap_model(self.model).plugin).save_pretrained(temporary)
            replace_folder(temporary, final)
        self.accelerator.wait_for_everyone()

    def _checkpoint(self) -> None:
        """Writes the full training state under a temporary name, then renames it: a killed save is never taken
        for a complete checkpoint."""
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.state.global_step:08d}"
        temporary = final.with_name(final.name + ".tmp")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(temporary))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (temporary / STATE_FILE).write_text(json.dumps(asdict(self.state), indent=2))
            (temporary / RUN_FILE).write_text(json.dumps(self.run_record, indent=2))
            replace_folder(temporary, final)
            for old in complete_checkpoints(self.checkpoint_dir)[: -self.args.keep_checkpoints]:  # keep_checkpoints >= 1
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.output_dir / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                             step=self.state.global_step)


@torch.no_grad()
def completion_nll(
    model: torch.nn.Module,
    examples: Sequence[EncodedExample],
    source: LossSource,
    alpha: float,
    pad_token_id: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> tuple[float, int]:
    """Summed NLL of the completion tokens of `examples` under the combination, and the number of tokens.

    Args:
        model (`PluginModel`, or a `CompletionLogits` holding one, possibly prepared by Accelerate): the reweighter.
        examples (`Sequence[EncodedExample]`): tokenised pairs.
        source (`LossSource`): e.g. `LiveBaseModel` (full logits) or `CachedBaseLogits` (the top-k bound).
        alpha (`float`): strength of the reweighter.
        pad_token_id (`int`): padding id for batching.
        batch_size (`int`, *optional*, defaults to 32): examples per forward pass.
        device (*optional*): where to put the batches; defaults to the model's device.
    """
    device = device or next(model.parameters()).device
    scorer = CompletionLogits(model) if isinstance(model, PluginModel) else model
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_token_id).items()}
        logits = scorer(batch["input_ids"], batch["attention_mask"], loss_positions(batch["labels"]))
        nll = source.nll(logits, batch, alpha)
        total, count = total + nll.double().sum().item(), count + nll.numel()
    return total, count


@renamed_keyword("plugin", "reweighter")
def train(
    reweighter: PluginModel,
    train_examples: Sequence[EncodedExample],
    validation_examples: Sequence[EncodedExample],
    train_source: LossSource,
    args: PluginTrainingArguments,
    validation_source: LossSource | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    resume: bool = False,
    model_card: dict | None = None,
    accelerator: Accelerator | None = None,
    export: Callable[[PluginModel], PluginModel] | None = None,
) -> PluginModel:
    """Trains `reweighter` so that base × reweighter fits the completions; saves the best epoch's reweighter.

    Args:
        reweighter (`PluginModel`): the reweighter to train (its initial weights are the starting point; a parameter
            formerly named `plugin`).
        train_examples, validation_examples (`Sequence[EncodedExample]`): tokenised data (`hf_plugin.data`).
        train_source (`LossSource`): the loss: where base log-probs come from (`LiveBaseModel` or
            `CachedBaseLogits`), or any object whose `nll(logits, batch, alpha)` returns a loss per completion
            position from the model's logits there (e.g. `hf_plugin.unlearning.UnlearningLoss`); the step minimises
            its mean over all positions.
        args (`PluginTrainingArguments`): hyper-parameters.
        validation_source (`LossSource`, *optional*): the same for validation; defaults to `train_source`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): saved next to the reweighter.
        resume (`bool`, *optional*, defaults to `False`): continue from the latest checkpoint in
            `args.checkpoint_dir`; it must belong to this run (same arguments, data and architecture, see
            `hf_plugin.run_folder.check_resume`). Without it, an `output_dir` holding a reweighter or a
            `checkpoint_dir` holding checkpoints is refused unless `args.overwrite_output_dir`, and their old outputs
            are then removed.
        model_card (`dict`, *optional*): extra model-card sections (e.g. `datasets`, `license`).
        accelerator (`Accelerator`, *optional*): defaults to one built from `args`.
        export (`Callable`, *optional*): the form of the model that is saved (e.g. LoRA adapters merged,
            `hf_plugin.unlearning.merge_adapters`); it must load with `PluginModel.from_pretrained`. Default: the
            model itself.

    Returns:
        `PluginModel`: the best reweighter (lowest validation NLL), also saved in `args.output_dir` with its
        tokenizer, card, `training_args.json`, `metrics.json` (with the base model's own validation NLL),
        `log.jsonl` and `loss_curve.png`. The checkpoints are then removed unless `args.keep_checkpoints_after_run`.

    Raises:
        `FloatingPointError`: the training loss or the validation NLL is not finite; nothing is saved.
    """
    if not validation_examples:
        raise ValueError("A validation split is needed: early stopping and the saved model are chosen on it.")
    if reweighter.config.copy_word_starts and not bool((reweighter.copy_aliases >= 0).any()):
        raise ValueError("The reweighter has copy_word_starts=True but an empty word-start table: call "
                         "`reweighter.set_copy_aliases(tokenizer)` first (or use copy_word_starts=False for a vocabulary "
                         "without word-start markers).")
    # Recorded before the run record, so that a resumed run records the same.
    longest = max(len(example.input_ids) for example in train_examples)
    reweighter.config.trained_max_length = max(longest, reweighter.config.trained_max_length or 0)
    output_dir, checkpoint_dir = Path(args.output_dir), Path(args.checkpoint_dir)
    accelerator = accelerator or Accelerator(mixed_precision=args.mixed_precision, log_with=args.log_with,
                                             project_dir=str(output_dir))
    # One run at a time in these folders: the lock is taken before the folders are checked or cleared.
    with run_lock(checkpoint_dir) if accelerator.is_main_process else nullcontext():
        check_output_dir(args, resume)
        record = run_record(args, train_examples, validation_examples, reweighter.config, accelerator.num_processes)
        checkpoint = (check_resume(args, train_examples, validation_examples, reweighter.config,
                                   accelerator.num_processes)
                      if resume else None)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if not resume:  # a new run: nothing of an earlier one is reported, nor appended to
                remove_old_outputs(args)
            output_dir.mkdir(parents=True, exist_ok=True)
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        if args.log_with:
            accelerator.init_trackers("hf-plugin", config={k: v for k, v in asdict(args).items() if v is not None})
        pad_token_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        trainer = _Trainer(reweighter=reweighter, train_examples=train_examples, validation_examples=validation_examples,
                           train_source=train_source, validation_source=validation_source or train_source, args=args,
                           pad_token_id=pad_token_id, accelerator=accelerator, run_record=record, export=export)
        state = trainer.run(checkpoint)
        accelerator.wait_for_everyone()
        best = PluginModel.from_pretrained(checkpoint_dir / BEST_DIR)
        if accelerator.is_main_process:
            metrics = {"validation NLL/token": state.best_validation_nll,
                       "validation perplexity": math.exp(min(state.best_validation_nll, 50.0)),
                       "base validation NLL/token": state.base_validation_nll,
                       "best epoch": state.best_epoch + 1, "epochs run": state.epoch, "optimizer steps": state.global_step}
            training = {k: v for k, v in args.run_defining().items() if v is not None}
            training.update({"training examples": len(train_examples), "validation examples": len(validation_examples),
                             "processes": accelerator.num_processes})
            card = {**(model_card or {}), "training": {**training, **(model_card or {}).get("training", {})}}
            best.save_pretrained(output_dir, tokenizer=tokenizer, model_card={"metrics": metrics, **card})
            (output_dir / "training_args.json").write_text(json.dumps(asdict(args), indent=2))
            (output_dir / "metrics.json").write_text(json.dumps({**metrics, "history": state.history}, indent=2))
            plot_loss_curve(output_dir / "log.jsonl", output_dir / "loss_curve.png")
        accelerator.wait_for_everyone()  # every process has loaded `best/`
        if accelerator.is_main_process and not args.keep_checkpoints_after_run:
            remove_checkpoints(checkpoint_dir)  # the run finished: what only resuming needed goes
    accelerator.end_training()
    return best


def plot_loss_curve(log_path: Path, image_path: Path) -> None:
    """Training loss per step and validation NLL per epoch, from the JSON-lines log (last value per step wins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, validation, base = {}, {}, None
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps[record["step"]] = record["loss"]
        elif "validation_nll" in record:
            validation[record["step"]] = record["validation_nll"]
            base = record.get("base_validation_nll", base)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(list(steps), list(steps.values()), label="training loss (NLL/token)", linewidth=1)
    axis.plot(list(validation), list(validation.values()), "o-", label="validation NLL/token")
    if base is not None:
        axis.axhline(base, color="grey", linestyle="--", label="base model alone, validation")
    axis.set_xlabel("optimizer step")
    axis.legend()
    figure.tight_layout()
    figure.savefig(image_path, dpi=100)
    plt.close(figure)
