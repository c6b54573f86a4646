"""ULD's assistant: built from the target's first layers with LoRA, trained with its loss through the library's loop,
saved and loaded like a reweighter, and used by LogitDifferenceLogitsProcessor."""

from __future__ import annotations

import json

import pytest
import torch

from hf_plugin import LogitDifferenceLogitsProcessor, PluginModel, first_layers, uniform_start_
from hf_plugin.cli import main
from hf_plugin.data import Example, encode_examples
from hf_plugin.methods import logit_difference_scores
from hf_plugin.training import PluginTrainingArguments
from hf_plugin.unlearning import UnlearningLoss, build_assistant, kl_from_uniform, merge_adapters, train_assistant

from conftest import make_base, make_plugin, make_tokenizer, task_rows, write_csv

pytest.importorskip("peft")


def test_unlearning_loss_by_hand():
    torch.manual_seed(0)
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 2]])
    batch = {"labels": labels, "index": torch.tensor([3, 10])}
    logits = torch.randn(6, 12)  # the completion positions in row-major order: 2 of row 0, then 4 of row 1
    loss = UnlearningLoss(forget_indices=[3], beta=2.0).nll(logits, batch, alpha=1.0)
    log_q = logits.log_softmax(-1)
    expected = [-log_q[0, 5], -log_q[1, 6]]  # the forget row: NLL of its next tokens
    uniform = torch.full((12,), 1 / 12)
    expected += [2.0 * (uniform * (uniform.log() - log_q[i])).sum() for i in range(2, 6)]  # retain: 2 KL(u || q)
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, torch.stack(expected))
    with pytest.raises(ValueError, match="`beta` must be a non-negative number"):
        UnlearningLoss([0], beta=-1.0)


def test_kl_from_uniform_is_zero_for_a_flat_model_only(tokenizer):
    examples = encode_examples(tokenizer, [Example("w1 w2", "w3 w4", 0)], max_length=16)
    flat = uniform_start_(make_plugin("llama"))
    assert kl_from_uniform(flat, examples) == pytest.approx(0.0, abs=1e-6)
    assert kl_from_uniform(make_plugin("llama"), examples) > 0.1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_assistant_starts_as_the_first_layers_and_merges_exactly(arch):
    target = make_base(arch)
    assistant = build_assistant(target, num_layers=1, lora_rank=4)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(assistant(ids).logits, first_layers(target, 1)(ids).logits)
        trainable = [name for name, p in assistant.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in name for name in trainable)
        for name, parameter in assistant.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
        adapted = assistant(ids).logits
        merged = merge_adapters(assistant)
        assert not any("lora" in name for name in merged.state_dict())
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=0)
        assert not torch.allclose(adapted, first_layers(target, 1)(ids).logits, atol=1e-3)
    with pytest.raises(ValueError, match="`lora_rank` must be a positive integer"):
        build_assistant(target, num_layers=1, lora_rank=0)
    with pytest.raises(ValueError, match="num_layers must be an integer from 1 to 2"):
        build_assistant(target, num_layers=3)


def completion_log_probs(scores_of, examples):
    """Mean log-probability of the completion tokens of `examples` under `scores_of(ids) -> (1, length, vocab)`."""
    total, count = 0.0, 0
    for example in examples:
        ids = torch.tensor([example.input_ids])
        log_probs = scores_of(ids)[0, :-1]
        for position, label in enumerate(example.labels[1:]):
            if label != -100:
                total, count = total + float(log_probs[position, label]), count + 1
    return total / count


def test_train_assistant_saves_loads_and_unlearns(tmp_path, tokenizer):
    target = make_base("llama")
    with torch.no_grad():  # a random tiny model is nearly uniform: sharpen it, so that "flat on retain" is learned
        target.get_output_embeddings().weight.mul_(8.0)
    pairs = [Example(prompt, completion, row) for row, (prompt, completion) in enumerate(task_rows(24))]
    encoded = encode_examples(tokenizer, pairs, max_length=32)
    forget, retain = encoded[:8], encoded[8:]
    args = PluginTrainingArguments(output_dir=str(tmp_path / "assistant"), epochs=10, batch_size=8, learning_rate=3e-2,
                                   patience=0)
    torch.manual_seed(0)
    assistant = train_assistant(target, forget, retain, args, num_layers=1, beta=5.0, lora_rank=8,
                                tokenizer=tokenizer)
    loaded = PluginModel.from_pretrained(tmp_path / "assistant")
    assert (tmp_path / "assistant" / "model.safetensors").exists()
    assert loaded.config.tokenizer_fingerprint is not None and loaded.config.base_vocab_size == target.config.vocab_size
    card = (tmp_path / "assistant" / "README.md").read_text()
    assert "ULD assistant" in card and "LoRA rank" in card
    # Its own card: ULD's formula and usage, not the reweighter's.
    assert "LogitDifferenceLogitsProcessor(assistant" in card and "PluginLogitsProcessor" not in card
    metrics = json.loads((tmp_path / "assistant" / "metrics.json").read_text())
    assert metrics["epochs run"] == 10
    for name, tensor in assistant.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)

    untrained = first_layers(target, 1)
    with torch.no_grad():
        # The assistant learned the forget completions and moved towards uniform on the retain ones.
        before, after = (completion_log_probs(lambda ids: m(ids).logits.log_softmax(-1), forget) for m in (untrained, loaded))
        assert after > before + 0.1
        assert kl_from_uniform(loaded, retain) < kl_from_uniform(untrained, retain)
        # ULD decoding makes the forget completions less likely than the target alone does.
        target_alone = completion_log_probs(lambda ids: target(ids).logits.log_softmax(-1), forget)
        uld = completion_log_probs(lambda ids: logit_difference_scores(target(ids).logits, loaded(ids).logits,
                                                                        beta=0.75, relative_top=0.1), forget)
        assert uld < target_alone
    processor = LogitDifferenceLogitsProcessor(loaded, beta=0.75, tokenizer=tokenizer)
    prompt = tokenizer(["w1 w2", "w3"], return_tensors="pt", padding=True)
    assert target.generate(**prompt, logits_processor=[processor], max_new_tokens=3).shape[1] == 5

    with pytest.raises(ValueError, match="needs forget and retain examples; got 0 forget"):
        train_assistant(target, [], retain, args, num_layers=1)


def test_unlearn_command(tmp_path, capsys):
    make_base("llama").save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")
    rows = task_rows(12)
    write_csv(tmp_path / "forget.csv", rows[:4])
    write_csv(tmp_path / "retain.csv", rows[4:])
    common = ["unlearn", "--base", str(tmp_path / "base"), "--forget-data", str(tmp_path / "forget.csv"),
              "--retain-data", str(tmp_path / "retain.csv"), "--template", "{mr}", "--completion-column", "ref",
              "--max-length", "32", "--batch-size", "4"]
    main([*common, "--num-layers", "1", "--lora-rank", "4", "--epochs", "2", "--output-dir", str(tmp_path / "out")])
    assert "Saved ULD's assistant" in capsys.readouterr().out
    assert PluginModel.from_pretrained(tmp_path / "out").config.num_hidden_layers == 1
    with pytest.raises(SystemExit, match="already holds a reweighter"):
        main([*common, "--num-layers", "1", "--output-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--lora-rank must be at least 1"):
        main([*common, "--num-layers", "1", "--lora-rank", "0", "--output-dir", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="^error: 8 of the 8 retain examples are also forget examples"):
        main([*common[:4], str(tmp_path / "retain.csv"), *common[5:], "--num-layers", "1",
              "--output-dir", str(tmp_path / "same")])
    with pytest.raises(SystemExit, match="forget data: .*not found"):
        main([*common[:4], str(tmp_path / "missing.csv"), *common[5:], "--num-layers", "1",
              "--output-dir", str(tmp_path / "other")])
