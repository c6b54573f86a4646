"""PluginConfig and PluginModel: forward semantics, padding, architectures, saving and Auto classes."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig, AutoModel, Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, GraniteConfig,
    GraniteForCausalLM,
)

from hf_plugin import PluginConfig, PluginModel, binding_kwargs, tokenizer_fingerprint
from hf_plugin.base_logits import LiveBaseModel
from hf_plugin.completions import loss_positions
from hf_plugin.modeling_plugin import CompletionLogits

from conftest import PAD, VOCAB, make_base, make_plugin, make_tokenizer


ARCHS = ["llama", "gpt2"]


def test_default_config_is_the_papers_reweighter():
    config = PluginConfig()
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) == (1, 256, 1, 1024)
    assert config.alpha == 1.0 and config.model_type == "plugin"
    backbone = config.backbone_config()
    assert backbone.model_type == "llama" and backbone.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(hidden_size=30, num_attention_heads=4), "multiple of `num_attention_heads`"),
        (dict(vocab_size=0), "`vocab_size` must be a positive integer"),
        (dict(alpha=-0.5), "`alpha` must be a non-negative"),
        (dict(alpha=float("nan")), "`alpha` must be a non-negative"),
        (dict(base_vocab_size=-3), "`base_vocab_size`"),
        (dict(backbone={"n_embd": 8}), "model_type"),
    ],
)
def test_config_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PluginConfig(**kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_returns_own_logits_or_combined_log_probs(arch):
    plugin = make_plugin(arch)
    input_ids = torch.randint(3, VOCAB, (2, 6))
    own = plugin(input_ids).logits
    assert own.shape == (2, 6, VOCAB)
    base_logits = torch.randn(2, 6, VOCAB)
    out = plugin(input_ids, base_logits=base_logits, labels=input_ids)
    expected = torch.log_softmax(base_logits.log_softmax(-1) + own.log_softmax(-1), -1)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    nll = -expected[:, :-1].gather(-1, input_ids[:, 1:, None]).mean()
    torch.testing.assert_close(out.loss, nll)
    # log-probabilities as base_logits give the same combination as raw logits
    torch.testing.assert_close(plugin(input_ids, base_logits=base_logits.log_softmax(-1)).logits, out.logits)


def test_labels_minus_100_are_ignored_and_loss_trains_only_the_reweighter():
    plugin = make_plugin("llama")
    input_ids = torch.randint(3, VOCAB, (1, 8))
    labels = input_ids.clone()
    labels[:, :5] = -100
    base_logits = torch.randn(1, 8, VOCAB, requires_grad=True)
    out = plugin(input_ids, base_logits=base_logits, labels=labels)
    combined = out.logits.detach()
    expected = F.nll_loss(combined[0, 4:7], input_ids[0, 5:])
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert plugin.get_output_embeddings().weight.grad is not None
    # labels alone (no base): the reweighter's own language-model loss
    own = plugin(input_ids, labels=labels)
    torch.testing.assert_close(own.loss, F.cross_entropy(own.logits[0, 4:7], input_ids[0, 5:]))


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_unpadded_rows(arch, tokenizer):
    plugin = make_plugin(arch)
    texts = ["w1 w2 w3 w4 w5 w6", "w7 w8", "w9 w10 w11"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    base_logits = torch.randn(*batch["input_ids"].shape, VOCAB)
    padded = plugin(**batch, base_logits=base_logits).logits
    for row, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        alone = plugin(ids, base_logits=base_logits[row : row + 1, -n:]).logits
        torch.testing.assert_close(padded[row, -n:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_forward_with_cache_equals_full_forward(arch):
    plugin = make_plugin(arch)
    input_ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    full = plugin(input_ids, attention_mask=mask).logits
    first = plugin(input_ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
    rest = plugin(input_ids[:, 6:], attention_mask=mask, past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(rest.logits, full[:, 6:], atol=1e-5, rtol=0)


def test_sequences_longer_than_max_positions_raise():
    plugin = make_plugin("llama")  # max_position_embeddings=128
    with pytest.raises(ValueError, match="has 130 tokens .* max_position_embeddings=128"):
        plugin(torch.randint(3, VOCAB, (1, 130)))
    ids = torch.randint(3, VOCAB, (1, 200))
    mask = torch.zeros_like(ids)
    mask[:, -128:] = 1
    assert plugin(ids, attention_mask=mask).logits.shape == (1, 200, VOCAB)


def test_base_logits_shape_and_width_are_checked():
    plugin = make_plugin("llama")
    ids = torch.randint(3, VOCAB, (1, 4))
    with pytest.raises(ValueError, match="matching input_ids"):
        plugin(ids, base_logits=torch.randn(1, 3, VOCAB))
    with pytest.raises(ValueError, match=f"scores have 50 entries but the reweighter has {VOCAB}"):
        plugin(ids, base_logits=torch.randn(1, 4, 50))
    padded = make_plugin("llama", base_vocab_size=128)
    out = padded(ids, base_logits=torch.randn(1, 4, 128)).logits
    assert out.shape == (1, 4, 128) and torch.isneginf(out[..., VOCAB:]).all()


def test_from_causal_lm_copies_a_pretrained_gpt2_and_leaves_it_untouched():
    torch.manual_seed(3)
    source = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    plugin = PluginModel.from_causal_lm(source, alpha=0.7).eval()
    assert plugin.config.backbone["model_type"] == "gpt2"
    assert (plugin.config.hidden_size, plugin.config.num_hidden_layers, plugin.config.max_position_embeddings) == (32, 2, 64)
    ids = torch.randint(3, VOCAB, (2, 7))
    torch.testing.assert_close(plugin(ids).logits, source(ids).logits)
    with torch.no_grad():
        plugin.get_output_embeddings().weight.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip_with_auto_classes(arch, tokenizer, tmp_path):
    base = make_base("llama")
    plugin = make_plugin(arch, alpha=0.5, **binding_kwargs(base, tokenizer, revision="abc123"))
    plugin.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "plugin" and saved["alpha"] == 0.5
    assert saved["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert saved["base_vocab_size"] == VOCAB and saved["base_model_revision"] == "abc123"
    assert saved["hf_plugin_version"]
    ids = torch.randint(3, VOCAB, (2, 5))
    for loaded in (PluginModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, PluginModel)
        torch.testing.assert_close(loaded(ids).logits, plugin(ids).logits)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PluginConfig)


def test_tokenizer_fingerprint_is_stable_and_discriminating(tokenizer):
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(make_tokenizer())
    assert tokenizer_fingerprint(tokenizer).startswith("sha256:")
    swapped = make_tokenizer(["w1", "w0"] + [f"w{i}" for i in range(2, VOCAB - 4)])
    assert tokenizer_fingerprint(swapped) != tokenizer_fingerprint(tokenizer)
    other_pad = make_tokenizer()
    other_pad.pad_token = "[EOS]"
    assert tokenizer_fingerprint(other_pad) != tokenizer_fingerprint(tokenizer)


def test_binding_records_padded_base_width(tokenizer):
    kwargs = binding_kwargs(make_base("llama", vocab_size=128), tokenizer)
    assert kwargs["base_vocab_size"] == 128 and kwargs["tokenizer_vocab_size"] == VOCAB
    assert PAD == tokenizer.pad_token_id


def test_logits_to_keep_returns_last_positions_only():
    plugin = make_plugin("llama")
    ids = torch.randint(3, VOCAB, (2, 6))
    last = plugin(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last[:, 0], plugin(ids).logits[:, -1])
    with pytest.raises(ValueError, match="logits_to_keep"):
        plugin(ids, logits_to_keep=1, base_logits=torch.randn(2, 6, VOCAB))


def make_postprocessing_plugin(arch: str) -> PluginModel:
    """A tiny reweighter whose backbone post-processes its logits: Gemma-2 soft-caps them, Granite scales them."""
    torch.manual_seed(2)
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=128)
    if arch == "gemma2":
        backbone = Gemma2ForCausalLM(Gemma2Config(**sizes, head_dim=16, final_logit_softcapping=5.0,
                                                  attn_implementation="eager"))
    else:
        backbone = GraniteForCausalLM(GraniteConfig(**sizes, logits_scaling=4.0))
    plugin = PluginModel.from_causal_lm(backbone)
    with torch.no_grad():  # logits large enough for the head's post-processing to matter
        plugin.get_output_embeddings().weight.mul_(20.0)
    return plugin.eval()


def padded_batch_and_positions():
    """Right-padded rows of different lengths, and an irregular set of positions to score in each."""
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 9))
    attention = torch.ones_like(ids)
    attention[0, 6:] = 0
    attention[2, 4:] = 0
    positions = (torch.rand(3, 9) > 0.4) & attention.bool()
    positions[1, :5] = False
    return ids, attention, positions


@pytest.mark.parametrize("arch", [*ARCHS, "gemma2", "granite"])
def test_completion_logits_equal_the_forward_at_the_selected_positions(arch):
    plugin = make_plugin(arch) if arch in ARCHS else make_postprocessing_plugin(arch)
    ids, attention, positions = padded_batch_and_positions()
    with torch.no_grad():
        selected = plugin.completion_logits(ids, attention, positions)
        full = plugin(ids, attention_mask=attention).logits
    assert selected.shape == (int(positions.sum()), VOCAB)
    torch.testing.assert_close(selected, full[positions], atol=1e-5, rtol=0)
    torch.testing.assert_close(CompletionLogits(plugin)(ids, attention, positions), selected)
    with pytest.raises(ValueError, match="logits_mask"):
        plugin.completion_logits(ids, attention, positions[:, :-1])


@pytest.mark.parametrize("arch", ["llama", "gemma2", "granite"])
def test_training_loss_equals_the_generation_path_for_post_processing_backbones(arch):
    plugin = make_plugin(arch) if arch == "llama" else make_postprocessing_plugin(arch)
    base = make_base("llama")
    ids, attention, positions = padded_batch_and_positions()
    labels = ids.masked_fill(~torch.nn.functional.pad(positions[:, :-1], (1, 0)), -100)
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    with torch.no_grad():
        trained = LiveBaseModel(base).nll(plugin.completion_logits(ids, attention, loss_positions(labels)), batch, 0.7)
        combined = plugin(ids, attention_mask=attention, base_logits=base(ids, attention_mask=attention).logits,
                          alpha=0.7).logits
    targets = labels[:, 1:][labels[:, 1:] != -100]
    generated = -combined[:, :-1][labels[:, 1:] != -100].gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(trained, generated, atol=1e-4, rtol=0)


def test_from_pretrained_passes_attention_and_dtype_to_the_backbone(tmp_path):
    make_plugin("llama").save_pretrained(tmp_path)
    loaded = PluginModel.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.bfloat16)
    assert loaded.backbone.config._attn_implementation == "eager"
    assert {p.dtype for p in loaded.backbone.parameters()} == {torch.bfloat16}
    built = PluginModel(PluginConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, attn_implementation="eager"))
    assert built.backbone.config._attn_implementation == "eager"


def test_rope_parameters_are_written_and_legacy_rope_theta_is_read(tmp_path):
    torch.manual_seed(0)
    plugin = PluginModel(PluginConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500.0})).eval()
    plugin.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_parameters"]["rope_theta"] == 500.0 and "rope_theta" not in written
    # A config written by hf-plugin 0.1 carries the legacy key instead.
    del written["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps({**written, "rope_theta": 500.0}))
    old = PluginModel.from_pretrained(tmp_path)
    assert old.backbone.config.rope_parameters["rope_theta"] == 500.0
    ids = torch.randint(3, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(old(ids).logits, plugin(ids).logits, atol=0, rtol=0)


def test_sequences_past_the_trained_length_run_with_one_warning(caplog):
    plugin = make_plugin("llama", trained_max_length=4)
    with caplog.at_level(logging.WARNING, logger="hf_plugin.modeling_plugin"):
        plugin(torch.tensor([[5, 6, 7, 8]]))
        assert "longer than any the reweighter was trained on" not in caplog.text
        plugin(torch.tensor([[5, 6, 7, 8, 9, 10]]))
        plugin(torch.tensor([[5, 6, 7, 8, 9, 10, 11]]))
    # one warning, not one per sequence length (generation grows the sequence at every step)
    assert caplog.text.count("longer than any the reweighter was trained on (4 tokens)") == 1
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        plugin(torch.arange(130)[None] % 90 + 4)
