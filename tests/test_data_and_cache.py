"""Reading task data, masking prompts, splitting by prompt, and the base-logit cache."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_plugin.base_cache
import hf_plugin.base_logits
import hf_plugin.completions
from hf_plugin.base_logits import (
    CachedBaseLogits, LiveBaseModel, LossSource, ShardSource, cached_base_sources, loss_positions, open_base_caches,
    plan_base_caches, task_vocabulary, write_base_cache,
)
from hf_plugin.data import collate, encode_examples, read_examples, split_by_prompt
from hf_plugin.remote.cache import RemoteCacheSource
from hf_plugin.unlearning import UnlearningLoss

from conftest import EOS, PAD, VOCAB, make_base, make_plugin, write_csv


ROWS = [(f"w{i % 7} w{i % 5}", f"w{i % 11} w{(i * 3) % 13} w{i % 4}") for i in range(40)]


def test_read_csv_with_template_and_report_bad_rows(tmp_path, caplog):
    rows = ROWS[:5] + [("w1", ""), ("", "w2")] + ROWS[5:8]
    examples, report = read_examples(write_csv(tmp_path / "d.csv", rows), completion_column="ref", template="Data: {mr} =")
    assert len(examples) == 8 and examples[0].prompt == f"Data: {ROWS[0][0]} ="
    assert report.skipped == {"empty completion": [5], "empty prompt": [6]}
    assert "8 usable rows" in report.summary() and "rows 5" in report.summary()


def test_read_jsonl_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in ROWS[:3]))
    examples, _ = read_examples(path)
    assert [e.completion for e in examples] == [c for _, c in ROWS[:3]]
    with pytest.raises(ValueError, match=r"no column\(s\) \['answer'\]"):
        read_examples(path, completion_column="answer")
    with pytest.raises(ValueError, match=r"Template field\(s\) \['missing'\]"):
        read_examples(path, template="{missing}")
    with pytest.raises(FileNotFoundError):
        read_examples(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="No usable row"):
        read_examples(write_csv(tmp_path / "empty.csv", [("a", ""), ("b", " ")]), completion_column="ref",
                      prompt_column="mr")


def test_split_by_prompt_keeps_each_prompt_on_one_side(tmp_path):
    examples, _ = read_examples(write_csv(tmp_path / "d.csv", ROWS), prompt_column="mr", completion_column="ref")
    train, validation = split_by_prompt(examples, 0.3, seed=1)
    assert len(train) + len(validation) == len(examples)
    assert not {e.prompt for e in train} & {e.prompt for e in validation}
    distinct = len({e.prompt for e in examples})
    assert len({e.prompt for e in validation}) == round(0.3 * distinct)
    assert split_by_prompt(examples, 0.3, seed=1) == (train, validation)


def test_encoding_masks_the_prompt_and_ends_with_eos(tokenizer, tmp_path):
    examples, report = read_examples(write_csv(tmp_path / "d.csv", ROWS[:3] + [("w1 " * 30, "w2")]),
                                     prompt_column="mr", completion_column="ref")
    encoded = encode_examples(tokenizer, examples, max_length=20, report=report)
    assert len(encoded) == 3 and report.skipped == {"longer than 20 tokens": [3]}
    first = encoded[0]
    prompt_length = len(tokenizer(examples[0].prompt)["input_ids"])
    assert first.labels[:prompt_length] == [-100] * prompt_length
    assert first.labels[prompt_length:] == first.input_ids[prompt_length:] and first.input_ids[-1] == EOS
    assert tokenizer.decode(first.input_ids[prompt_length:-1]) == examples[0].completion
    batch = collate(encoded, PAD)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@pytest.fixture
def encoded(tokenizer, tmp_path):
    examples, _ = read_examples(write_csv(tmp_path / "d.csv", ROWS), prompt_column="mr", completion_column="ref")
    return encode_examples(tokenizer, examples, max_length=32)


def test_cache_with_whole_vocabulary_equals_live_and_resumes(encoded, tmp_path):
    base, plugin = make_base("llama"), make_plugin("llama")
    cache_dir = write_base_cache(base, encoded, tmp_path / "cache", k=96, batch_size=6, examples_per_shard=16, pad_token_id=PAD)
    cached, live = CachedBaseLogits(cache_dir, encoded), LiveBaseModel(base)
    batch = collate(encoded[10:18], PAD)
    logits = plugin.completion_logits(batch["input_ids"], batch["attention_mask"], loss_positions(batch["labels"]))
    torch.testing.assert_close(cached.nll(logits, batch, 1.0), live.nll(logits, batch, 1.0), atol=5e-3, rtol=0)

    # resuming rewrites only what is missing
    shards = sorted(cache_dir.glob("shard-*.safetensors"))
    assert len(shards) == 3
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    (cache_dir / "index.json").unlink()
    write_base_cache(base, encoded, cache_dir, k=96, batch_size=6, examples_per_shard=16, pad_token_id=PAD)
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in (shards[0], shards[2]))
    torch.testing.assert_close(CachedBaseLogits(cache_dir, encoded).nll(logits, batch, 1.0), cached.nll(logits, batch, 1.0))


def test_the_sources_meet_the_contracts_training_and_the_cache_check(encoded, tmp_path):
    base = make_base("llama")
    cache_dir = write_base_cache(base, encoded, tmp_path / "cache", k=8, pad_token_id=PAD, progress=False)
    for source in (LiveBaseModel(base), CachedBaseLogits(cache_dir, encoded), UnlearningLoss([0])):
        assert isinstance(source, LossSource)
    remote = type("StandIn", (), {"vocab_size": VOCAB})()
    assert isinstance(RemoteCacheSource(remote), ShardSource)
    assert not isinstance(base, ShardSource)  # an in-process base is run by `write_base_cache` itself


def test_the_cache_and_completion_names_are_still_importable_from_base_logits():
    # They lived in hf_plugin.base_logits before hf_plugin.base_cache and hf_plugin.completions split off.
    moved = {
        hf_plugin.base_cache: ["BaseCachePlan", "CachedBaseLogits", "IDENTITY_FIELDS", "INDEX_FILE", "LOGPROB_TOLERANCE",
                               "MANIFEST_FILE", "SHARD_PATTERN", "ShardSource", "cached_base_sources", "check_top_k",
                               "open_base_caches", "plan_base_caches", "write_base_cache"],
        hf_plugin.completions: ["DEFAULT_TASK_VOCAB_SIZE", "completion_positions", "examples_fingerprint", "loss_positions",
                                "task_vocabulary"],
    }
    for module, names in moved.items():
        for name in names:
            assert getattr(hf_plugin.base_logits, name) is getattr(module, name), name


def test_a_pair_skipped_for_length_does_not_shift_the_cache(tokenizer, tmp_path):
    # Pairs skipped before others (too long, e.g. with demonstrations in front) used to shift every later example
    # onto another example's cache rows: an IndexError or "does not match" error, or the wrong log-probs.
    rows = ROWS[:6] + [("w1 " * 30, "w2")] + ROWS[6:20] + [("w3 " * 30, "w4")] + ROWS[20:30]
    examples, _ = read_examples(write_csv(tmp_path / "d.csv", rows), prompt_column="mr", completion_column="ref")
    encoded = encode_examples(tokenizer, examples, max_length=20)
    assert len(encoded) == 30 and encoded[-1].index == 31
    base, plugin = make_base("llama"), make_plugin("llama")
    cache_dir = write_base_cache(base, encoded, tmp_path / "cache", k=96, examples_per_shard=8, pad_token_id=PAD,
                                 progress=False)
    batch = collate(encoded[20:], PAD)
    logits = plugin.completion_logits(batch["input_ids"], batch["attention_mask"], loss_positions(batch["labels"]))
    cache = CachedBaseLogits(cache_dir, encoded)
    torch.testing.assert_close(cache.nll(logits, batch, 1.0), LiveBaseModel(base).nll(logits, batch, 1.0), atol=5e-3,
                               rtol=0)
    with pytest.raises(ValueError, match="Example 6 is not among the examples the cache was checked against"):
        cache.rows([6])


def test_task_vocabulary_cache_is_exact_where_the_task_lives(encoded, tmp_path):
    base, plugin = make_base("llama"), make_plugin("llama")
    task = task_vocabulary(encoded)
    assert EOS in task and len(task) < VOCAB
    # Every label is in the task vocabulary, so with it the loss knows each label's competitors among task tokens.
    cache_dir = write_base_cache(base, encoded, tmp_path / "c", k=4, examples_per_shard=16, pad_token_id=PAD,
                                 task_vocab=task)
    batch = collate(encoded[:12], PAD)
    logits = plugin.completion_logits(batch["input_ids"], batch["attention_mask"], loss_positions(batch["labels"]))
    live = LiveBaseModel(base).nll(logits, batch, 1.0)
    with_task = CachedBaseLogits(cache_dir, encoded).nll(logits, batch, 1.0)
    top_only = CachedBaseLogits(cache_dir, encoded, task_vocab_size=0).nll(logits, batch, 1.0)
    assert (with_task >= live - 5e-3).all() and (with_task <= top_only + 5e-3).all()
    assert (with_task - live).mean() < 0.9 * (top_only - live).mean()  # a random base spreads its mass widely
    # all ids as the "task vocabulary": the cache knows the whole distribution
    everything = write_base_cache(base, encoded, tmp_path / "all", k=4, examples_per_shard=16, pad_token_id=PAD,
                                  task_vocab=list(range(VOCAB)))
    torch.testing.assert_close(CachedBaseLogits(everything, encoded).nll(logits, batch, 1.0), live, atol=5e-3, rtol=0)
    with pytest.raises(ValueError, match="task_vocab_size must be 0 to"):
        CachedBaseLogits(cache_dir, encoded, task_vocab_size=len(task) + 1)
    for bad in ([], [1, 1], [VOCAB]):
        with pytest.raises(ValueError, match="task_vocab must"):
            write_base_cache(base, encoded, tmp_path / "bad", k=4, pad_token_id=PAD, task_vocab=bad)
    with pytest.raises(ValueError, match="positive integer"):
        task_vocabulary(encoded, 0)
    assert task_vocabulary(encoded, 3) == task[:3]


def test_cached_base_sources_shares_the_training_task_vocabulary(encoded, tokenizer, tmp_path):
    splits = {"train": encoded[:30], "validation": encoded[30:]}
    sources, _ = cached_base_sources(lambda: make_base("llama"), tokenizer, splits, tmp_path / "cache", k=8)
    assert sources["validation"].task_ids.tolist() == sources["train"].task_ids.tolist() == task_vocabulary(encoded[:30])
    # a cache without the task vocabulary is another cache: refused, naming the difference, before loading the base
    cached_base_sources(lambda: make_base("llama"), tokenizer, splits, tmp_path / "plain", k=8, task_vocab_size=0)
    with pytest.raises(ValueError, match="task_vocab_size 0 != "):
        cached_base_sources(lambda: pytest.fail("loaded the base"), tokenizer, splits, tmp_path / "plain", k=8)
    with pytest.raises(ValueError, match="0 \\(off\\) or positive"):
        cached_base_sources(lambda: make_base("llama"), tokenizer, splits, tmp_path / "x", task_vocab_size=-1)


class ThreadProcesses:
    """An `accelerate.PartialState` stand-in for one of `n` processes played by threads of this process."""

    def __init__(self, index: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.barrier = index, barrier.parties, barrier
        self.is_main_process = index == 0

    def wait_for_everyone(self):
        self.barrier.wait()


def test_cache_split_between_processes_in_one_call_and_checked_against_data(encoded, tmp_path, capsys):
    base, barrier, errors = make_base("gpt2"), threading.Barrier(2, timeout=60), []

    def write(index):
        try:
            write_base_cache(base, encoded, tmp_path / "c", k=8, examples_per_shard=10, pad_token_id=PAD,
                             accelerator=ThreadProcesses(index, barrier))
            # every process returns after the main one wrote the index, which needs the other's shards
            assert (tmp_path / "c" / "index.json").exists()
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=write, args=(index,)) for index in (1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert "pos/s" in capsys.readouterr().err  # a progress bar in positions per second
    cache = CachedBaseLogits(tmp_path / "c", encoded)
    assert cache.topk_ids.shape[1] == 8 and len(cache.offsets) == len(encoded) + 1
    with pytest.raises(ValueError, match="other data or another tokenization.*fresh directory.*--overwrite-cache"):
        CachedBaseLogits(tmp_path / "c", encoded[:-1])
    with pytest.raises(FileNotFoundError, match="no complete base-logit cache"):
        CachedBaseLogits(tmp_path / "absent", encoded)


@pytest.mark.parametrize("interrupted", [False, True], ids=["complete", "interrupted"])
def test_cache_of_other_data_is_refused_not_restamped(encoded, tmp_path, interrupted):
    base, other = make_base("llama"), encoded[::-1]  # same examples in another order: other log-probs per index
    cache_dir = write_base_cache(base, encoded, tmp_path / "cache", k=8, examples_per_shard=16, pad_token_id=PAD)
    if interrupted:  # a killed run: the index and one shard missing
        (cache_dir / "index.json").unlink()
        (cache_dir / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match=f"{cache_dir}.*examples_fingerprint.*fresh directory"):
        write_base_cache(base, other, cache_dir, k=8, examples_per_shard=16, pad_token_id=PAD)
    with pytest.raises(ValueError, match=f"{cache_dir}.*k 8 != 16"):
        write_base_cache(base, encoded, cache_dir, k=16, examples_per_shard=16, pad_token_id=PAD)
    assert not (interrupted and (cache_dir / "index.json").exists())

    # replacing it is explicit, and gives what a fresh directory gives
    write_base_cache(base, other, cache_dir, k=8, examples_per_shard=16, pad_token_id=PAD, overwrite=True)
    fresh = write_base_cache(base, other, tmp_path / "fresh", k=8, examples_per_shard=16, pad_token_id=PAD)
    torch.testing.assert_close(CachedBaseLogits(cache_dir, other).label_logprobs,
                               CachedBaseLogits(fresh, other).label_logprobs)


def test_a_manifest_alone_from_a_pass_killed_before_its_first_shard_is_claimed_anew(encoded, tmp_path):
    base, other = make_base("llama"), encoded[::-1]
    cache_dir = write_base_cache(base, other, tmp_path / "cache", k=8, examples_per_shard=16, pad_token_id=PAD)
    for written in [cache_dir / "index.json", *cache_dir.glob("shard-*")]:  # as a kill before any shard leaves it
        written.unlink()
    assert (cache_dir / "manifest.json").exists()
    write_base_cache(base, encoded, cache_dir, k=8, examples_per_shard=16, pad_token_id=PAD)  # no --overwrite needed
    fresh = write_base_cache(base, encoded, tmp_path / "fresh", k=8, examples_per_shard=16, pad_token_id=PAD)
    torch.testing.assert_close(CachedBaseLogits(cache_dir, encoded).label_logprobs,
                               CachedBaseLogits(fresh, encoded).label_logprobs)


def test_cached_base_sources_loads_the_base_only_to_write(encoded, tokenizer, tmp_path):
    loads = []

    def load_base():
        loads.append(1)
        return make_base("llama")

    splits = {"train": encoded[:30], "validation": encoded[30:]}
    sources, binding = cached_base_sources(load_base, tokenizer, splits, tmp_path / "cache", k=8)
    assert len(loads) == 1 and set(sources) == {"train", "validation"}
    assert binding["base_vocab_size"] == 96 and binding["tokenizer_vocab_size"] == len(tokenizer)
    again, binding_again = cached_base_sources(load_base, tokenizer, splits, tmp_path / "cache", k=32)
    assert len(loads) == 1 and binding_again == binding  # a complete cache is read with its own k
    torch.testing.assert_close(again["train"].topk_logprobs, sources["train"].topk_logprobs)

    # other data: refused before the base model is loaded
    with pytest.raises(ValueError, match="validation.*other data"):
        cached_base_sources(load_base, tokenizer, {**splits, "validation": encoded[29:]}, tmp_path / "cache")
    # another base model than the one the cache was written from: refused, not bound to the cache's base
    with pytest.raises(ValueError, match="train.*another base.*base_model_name_or_path None != 'org/other-model'"):
        cached_base_sources(load_base, tokenizer, splits, tmp_path / "cache", base_name_or_path="org/other-model")
    for k in (0, len(tokenizer) + 1):
        with pytest.raises(ValueError, match=f"between 1 and the vocabulary size {len(tokenizer)}, got {k}"):
            cached_base_sources(load_base, tokenizer, splits, tmp_path / f"k{k}", k=k)
        assert not (tmp_path / f"k{k}").exists()
    assert len(loads) == 1


def test_the_two_steps_plan_without_the_base_then_write_and_read(encoded, tokenizer, tmp_path):
    splits = {"train": encoded[:30], "validation": encoded[30:]}
    plan = plan_base_caches(tokenizer, splits, tmp_path / "cache", k=8)
    assert plan.to_write == ["train", "validation"] and not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="train, validation in .* are still to be written: pass the base model"):
        open_base_caches(plan)
    sources, binding = open_base_caches(plan, make_base("llama"))
    assert set(sources) == {"train", "validation"} and binding["base_vocab_size"] == 96
    again = plan_base_caches(tokenizer, splits, tmp_path / "cache", k=8)
    assert again.to_write == []  # complete: read without the base model
    assert open_base_caches(again)[1] == binding


@pytest.mark.parametrize("k", [0, VOCAB + 1])
def test_top_k_outside_the_vocabulary_is_refused_before_writing(encoded, tmp_path, k):
    with pytest.raises(ValueError, match=f"got {k}"):
        write_base_cache(make_base("gpt2"), encoded, tmp_path / "c", k=k, pad_token_id=PAD)
    assert not (tmp_path / "c").exists()


def _tamper_positive(tensors):
    tensors["topk_logprobs"][3, 0] = 0.5


def _tamper_nan(tensors):
    tensors["label_logprobs"][2] = float("nan")


def _tamper_unsorted(tensors):
    tensors["topk_logprobs"][1] = tensors["topk_logprobs"][1].flip(0)


def _tamper_task(tensors):
    tensors["task_logprobs"][0, 1] = 0.7


def _tamper_offsets(tensors):
    tensors["offsets"][1:-1] = tensors["offsets"][2:].clone()[: len(tensors["offsets"]) - 2]


@pytest.mark.parametrize("tamper, problem", [
    (_tamper_positive, "positive log-probs"), (_tamper_nan, "non-finite log-probs"),
    (_tamper_unsorted, "not sorted"), (_tamper_offsets, "offsets that do not match"),
    (_tamper_task, "positive task-vocabulary log-probs"),
])
def test_corrupt_shard_is_named(encoded, tmp_path, tamper, problem):
    cache_dir = write_base_cache(make_base("llama"), encoded, tmp_path / "c", k=8, examples_per_shard=16, pad_token_id=PAD,
                                 task_vocab=task_vocabulary(encoded))
    shard = cache_dir / "shard-00001.safetensors"
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(shard))
    tamper(tensors)
    save_file(tensors, str(shard), metadata=metadata)
    with pytest.raises(ValueError, match=f"shard {shard}: .*{problem}"):
        CachedBaseLogits(cache_dir, encoded)


def test_shard_of_other_data_is_refused(encoded, tmp_path):
    first = write_base_cache(make_base("llama"), encoded, tmp_path / "a", k=8, examples_per_shard=16, pad_token_id=PAD)
    second = write_base_cache(make_base("llama"), encoded[::-1], tmp_path / "b", k=8, examples_per_shard=16, pad_token_id=PAD)
    shutil.copyfile(second / "shard-00000.safetensors", first / "shard-00000.safetensors")
    with pytest.raises(ValueError, match="shard-00000.safetensors was written for other data"):
        CachedBaseLogits(first, encoded)


def test_cli_refuses_top_k_outside_the_vocabulary_before_the_base(tokenizer, tmp_path, monkeypatch):
    from hf_plugin.cli import main

    make_base("llama").save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    monkeypatch.setattr("hf_plugin.commands.common.load_base_model", lambda *a, **k: pytest.fail("the base model was loaded"))
    for k in ("0", str(len(tokenizer) + 1)):
        with pytest.raises(SystemExit, match=f"--top-k must be between 1 and the vocabulary size {len(tokenizer)}, got {k}"):
            main(["cache", "--base", str(tmp_path / "base"), "--data", str(write_csv(tmp_path / "d.csv", ROWS)),
                  "--prompt-column", "mr", "--completion-column", "ref", "--cache", str(tmp_path / "c"), "--top-k", k])
    with pytest.raises(SystemExit, match="--task-vocab-size. must be 0 .off. or positive, got -3"):
        main(["cache", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "d.csv"), "--prompt-column", "mr",
              "--completion-column", "ref", "--cache", str(tmp_path / "c"), "--task-vocab-size", "-3"])
    assert not (tmp_path / "c").exists()


def test_chat_formatted_rows_use_the_chat_template(tmp_path):
    tokenizer = make_chat_tokenizer()
    rows = [{"messages": [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"},
                          {"role": "assistant", "content": "w4 w5"}]},
            {"messages": [{"role": "user", "content": "w6"}]},  # no answer: reported, not used
            {"messages": [{"role": "user", "content": "w7"}, {"role": "assistant", "content": "w8"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    examples, report = read_examples(path, messages_column="messages")
    assert [e.completion for e in examples] == ["w4 w5", "w8"] and report.skipped == {"no final assistant message": [1]}
    encoded = encode_examples(tokenizer, examples, max_length=64, chat=True)
    rendered = tokenizer.decode(encoded[0].input_ids)
    assert rendered.startswith("[BOS] system w1 [EOS] [BOS] user w2 w3 [EOS] [BOS] assistant w4 w5")
    learned = [t for t, label in zip(encoded[0].input_ids, encoded[0].labels) if label != -100]
    assert tokenizer.decode(learned) == "w4 w5 [EOS]"
    with pytest.raises(ValueError, match="chat=True"):
        encode_examples(tokenizer, examples, max_length=64)


def make_chat_tokenizer():
    from conftest import make_tokenizer

    tokenizer = make_tokenizer(["system", "user", "assistant"] + [f"w{i}" for i in range(20)])
    tokenizer.chat_template = (
        "{% for m in messages %}[BOS] {{ m['role'] }} {{ m['content'] }} [EOS] {% endfor %}"
        "{% if add_generation_prompt %}[BOS] assistant{% endif %}"
    )
    return tokenizer


def test_csv_cells_stay_text(tmp_path):
    """pandas would read these as missing values or numbers, and the rows would be skipped as empty."""
    words = ["None", "NA", "null", "N/A", "nan", "", "007"]
    path = write_csv(tmp_path / "d.csv", [(w, w) for w in words] + [("1", "2")])
    examples, report = read_examples(path, prompt_column="mr", completion_column="ref")
    assert [(e.prompt, e.completion, e.row) for e in examples] == [(w, w, i) for i, w in enumerate(words) if w] + [("1", "2", 7)]
    assert report.skipped == {"empty prompt": [5]}
    tsv = tmp_path / "d.tsv"
    tsv.write_text("mr\tref\nnull\t12\n")
    examples, _ = read_examples(tsv, prompt_column="mr", completion_column="ref", template="Data: {mr}")
    assert (examples[0].prompt, examples[0].completion) == ("Data: null", "12")


def test_json_numbers_are_text_and_prompts_can_be_read_alone(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": 42}\n\n{"prompt": 3.5, "completion": null}\n')
    examples, report = read_examples(path)
    assert [(e.prompt, e.completion) for e in examples] == [("a", "42")] and report.skipped == {"empty completion": [1]}
    examples, _ = read_examples(path, completion_column=None)
    assert [(e.prompt, e.completion) for e in examples] == [("a", ""), ("3.5", "")]
    listed = tmp_path / "d.json"
    listed.write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": "c"}]')
    examples, report = read_examples(listed)
    assert [e.completion for e in examples] == ["b"] and report.skipped == {"empty completion": [1]}


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", b"", r"empty\.csv is empty"),
    ("blank.jsonl", b"\n \n", r"blank\.jsonl is empty"),
    ("header.csv", b"mr,ref\n", r"header\.csv has a header \(mr, ref\) but no rows"),
    ("bad.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', r"bad\.jsonl, line 2: not valid JSON"),
    ("list.jsonl", b'{"prompt": "a", "completion": "b"}\n["a", "b"]\n', r"list\.jsonl, line 2: expected a JSON object"),
    ("bad.json", b'[{"prompt": "a"},\n {"prompt": }]', r"bad\.json, line 2: not valid JSON"),
    ("latin1.csv", "mr,ref\na,b\ncaf\xe9,c\n".encode("latin-1"), r"latin1\.csv, line 3: not UTF-8 text \(byte 0xe9\)"),
    ("fields.csv", b"mr,ref\na,b\na,b,c\n", r"fields\.csv, line 3: 3 fields, but the header has 2"),
    ("data.txt", b"mr,ref\na,b\n", r"data\.txt: unknown file type '\.txt'"),
    ("noext", b"mr,ref\na,b\n", r"noext: unknown file type '\(no extension\)'"),
])
def test_unreadable_files_give_one_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as caught:
        read_examples(tmp_path / name, prompt_column="mr", completion_column="ref")
    assert "\n" not in str(caught.value)


def test_missing_paths_are_not_found_and_never_reach_the_hub(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("reached datasets.load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for missing in (tmp_path / "absent", tmp_path / "absent.csv", "./absent", "../data/absent", "absent.jsonl"):
        with pytest.raises(FileNotFoundError, match="Data file not found"):
            read_examples(missing)


def test_no_pair_fits_names_the_source_and_the_limit(tokenizer, tmp_path):
    examples, report = read_examples(write_csv(tmp_path / "long.csv", [("w1 " * 30, "w2")]), prompt_column="mr",
                                     completion_column="ref")
    with pytest.raises(ValueError, match=r"No pair of .*long\.csv fits in max_length=20 tokens \(the shortest has 3\d\)"):
        encode_examples(tokenizer, examples, max_length=20, report=report)
