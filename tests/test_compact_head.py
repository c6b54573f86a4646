"""The compact output layer: one row per task token, one shared logit for the rest; exact, saved, trained."""

from __future__ import annotations

import pytest
import torch

from hf_plugin import PluginConfig, PluginLogitsProcessor, PluginModel
from hf_plugin.base_cache import CachedBaseLogits, write_base_cache
from hf_plugin.base_logits import LiveBaseModel
from hf_plugin.cli import main
from hf_plugin.completions import loss_positions, task_vocabulary
from hf_plugin.data import collate, encode_examples, read_examples

from conftest import PAD, VOCAB, Recorder, make_base, make_plugin, prompts, task_folder, write_csv
from test_logits_process import MODES, assert_every_call_exact, assert_finished_sequences_exact


HEAD = [2, 5, 6, 7, 9, 11, 20, 30, 31, 40]


def compact_plugin(**kwargs) -> PluginModel:
    """`make_plugin("llama")`'s reweighter with a compact output layer, sharpened as that one is."""
    torch.manual_seed(1)
    plugin = PluginModel(PluginConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                      max_position_embeddings=128, head_ids=HEAD, **kwargs)).eval()
    torch.manual_seed(4)
    with torch.no_grad():
        plugin.backbone.lm_head.proj.weight.normal_(std=3.0)
    return plugin


def test_other_ids_share_one_logit_and_the_layer_is_small(tmp_path):
    plugin, full = compact_plugin(), make_plugin("llama")
    assert full.num_parameters() - plugin.num_parameters() == 32 * (VOCAB - len(HEAD) - 1)
    ids = torch.tensor([[4, 8, 15, 16]])
    with torch.no_grad():
        logits = plugin(ids).logits
    others = [i for i in range(VOCAB) if i not in HEAD]
    assert (logits[..., others] == logits[..., others[:1]]).all()
    assert not (logits[..., HEAD] == logits[..., others[:1]]).any()
    plugin.save_pretrained(tmp_path / "r")
    loaded = PluginModel.from_pretrained(tmp_path / "r")
    assert loaded.config.head_ids == HEAD
    torch.testing.assert_close(loaded(ids).logits, logits)
    selected = torch.tensor([[False, True, True, False]])
    torch.testing.assert_close(plugin.completion_logits(ids, None, selected), logits[selected], atol=1e-5, rtol=0)


def test_bad_head_ids_are_refused():
    for bad in ([], [1, 1], [VOCAB], [-1], ["3"]):
        with pytest.raises(ValueError, match="`head_ids` must be a non-empty list of distinct ids"):
            PluginConfig(vocab_size=VOCAB, head_ids=bad)
    with pytest.raises(ValueError, match="not a `backbone`"):
        PluginConfig(backbone=make_plugin("gpt2").config.backbone, head_ids=HEAD)


@pytest.mark.parametrize("decoding", ["greedy", "sampling_multiple_returns", "beam_multiple_returns"])
@pytest.mark.parametrize("copy_mode", [None, "shared"])
def test_processor_matches_offline_forward(decoding, copy_mode, tokenizer):
    base, plugin = make_base("gpt2"), compact_plugin(copy_mode=copy_mode)
    input_ids, mask = prompts(tokenizer, ["w1 w2 w3 w4 w5", "w6 w7", "w8 w9 w10"])
    recorder = Recorder(PluginLogitsProcessor(plugin, pad_token_id=PAD))
    torch.manual_seed(0)
    out = base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=6, min_new_tokens=6,
                        **MODES[decoding])
    assert_every_call_exact(plugin, recorder.calls, mask)
    if "beam" not in decoding:
        assert_finished_sequences_exact(plugin, out, recorder.calls, mask)


def test_cached_loss_equals_the_live_loss(tokenizer, tmp_path):
    rows = [(f"w{i} w{i + 1}", f"w{i + 2} w40 w{i}") for i in range(4, 28)]
    examples, _ = read_examples(write_csv(tmp_path / "d.csv", rows), prompt_column="mr", completion_column="ref")
    encoded = encode_examples(tokenizer, examples, max_length=32)
    base = make_base("llama")
    plugin = compact_plugin()
    cache_dir = write_base_cache(base, encoded, tmp_path / "cache", k=VOCAB, pad_token_id=PAD, progress=False)
    batch = collate(encoded[:8], PAD)
    logits = plugin.completion_logits(batch["input_ids"], batch["attention_mask"], loss_positions(batch["labels"]))
    live = LiveBaseModel(base).nll(logits, batch, 1.0)
    torch.testing.assert_close(CachedBaseLogits(cache_dir, encoded).nll(logits, batch, 1.0), live, atol=5e-3, rtol=0)
    live.mean().backward()
    assert plugin.backbone.lm_head.proj.weight.grad.abs().sum() > 0


def test_train_command_covers_the_task_vocabulary(tmp_path):
    setup = task_folder(tmp_path, 16, 4)
    out = tmp_path / "run"
    common = ["train", "--base", str(setup / "base"), "--data", str(setup / "train.csv"), "--validation-data",
              str(setup / "validation.csv"), "--prompt-column", "mr", "--completion-column", "ref", "--hidden-size",
              "32", "--intermediate-size", "64", "--num-heads", "2", "--max-length", "32", "--epochs", "1", "--cpu"]
    main(common + ["--output-dir", str(out), "--compact-head", "--task-vocab-size", "12"])
    plugin = PluginModel.from_pretrained(out)
    assert len(plugin.config.head_ids) <= 12 and plugin.backbone.lm_head.proj.weight.shape[0] == len(plugin.config.head_ids) + 1
    with pytest.raises(SystemExit, match="--compact-head covers the task vocabulary"):
        main(common + ["--output-dir", str(tmp_path / "x"), "--compact-head", "--task-vocab-size", "0"])
    with pytest.raises(SystemExit, match="drop --init-from"):
        main(common + ["--output-dir", str(tmp_path / "y"), "--compact-head", "--init-from-base-layers", "1"])
