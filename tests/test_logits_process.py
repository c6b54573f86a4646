"""PluginLogitsProcessor is exact (equal to an offline forward) and incremental in every decoding mode."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_plugin import PluginLogitsProcessor, PluginModel, binding_kwargs, score_with_reweighters

from conftest import EOS, PAD, VOCAB, Recorder, full_mask, make_base, make_plugin, make_tokenizer, prompts


ARCHS = [("llama", "llama"), ("gpt2", "gpt2"), ("llama", "gpt2")]


def count_reweighter_tokens(plugin: PluginModel) -> list[int]:
    """Records how many new tokens per row each reweighter forward is run on."""
    seen = []

    def hook(module, args, kwargs):
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        seen.append(input_ids.shape[1])

    plugin.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def offline(plugin, input_ids, mask, base_scores_at, prompt_length=None):
    """Runs PluginModel once over whole sequences, with the recorded base scores at the positions given (and where
    the prompts end, for a reweighter that copies from its prompt)."""
    base_logits = torch.zeros(*input_ids.shape, base_scores_at[0][1].shape[-1])
    for position, scores in base_scores_at:
        base_logits[:, position] = scores
    prompt_lengths = None if prompt_length is None else torch.full((input_ids.shape[0],), prompt_length)
    with torch.no_grad():
        return plugin(input_ids, attention_mask=mask, base_logits=base_logits, prompt_lengths=prompt_lengths).logits


def assert_every_call_exact(plugin, calls, prompt_mask):
    """Each step's output equals an offline forward over that step's sequences."""
    assert calls, "the processor was never called"
    for input_ids, scores, out in calls:
        length = input_ids.shape[1]
        expected = offline(plugin, input_ids, full_mask(input_ids, prompt_mask), [(length - 1, scores)],
                           prompt_mask.shape[1])[:, -1]
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def assert_finished_sequences_exact(plugin, sequences, calls, prompt_mask):
    """One offline forward over the generated sequences reproduces the processor's output at every step."""
    prompt_length = prompt_mask.shape[1]
    positions = [(prompt_length - 1 + step, scores) for step, (_, scores, _) in enumerate(calls)]
    combined = offline(plugin, sequences[:, : prompt_length + len(calls) - 1],
                       full_mask(sequences, prompt_mask)[:, : prompt_length + len(calls) - 1], positions, prompt_length)
    for step, (_, _, out) in enumerate(calls):
        torch.testing.assert_close(out, combined[:, prompt_length - 1 + step], atol=1e-4, rtol=0)


MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
    "sampling_multiple_returns": dict(do_sample=True, temperature=1.3, num_return_sequences=3),
    "beam": dict(do_sample=False, num_beams=4),
    "beam_multiple_returns": dict(do_sample=False, num_beams=4, num_return_sequences=2),
}


def generate_left_padded_and_check(base, plugin, tokenizer, mode):
    """Generates for a left-padded batch through a recorded processor; checks that the reweighter ran incrementally
    and that every step equals an offline forward (and, without beams, one forward over the finished sequences)."""
    input_ids, mask = prompts(tokenizer, ["w1 w2 w3 w4 w5", "w6 w7", "w8 w9 w10"])
    recorder = Recorder(PluginLogitsProcessor(plugin, pad_token_id=PAD))
    tokens = count_reweighter_tokens(plugin)
    torch.manual_seed(0)
    out = base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=8,
                        min_new_tokens=8, **MODES[mode])
    assert tokens == [input_ids.shape[1]] + [1] * (len(recorder.calls) - 1), "not incremental"
    assert_every_call_exact(plugin, recorder.calls, mask)
    if "beam" not in mode:
        assert_finished_sequences_exact(plugin, out, recorder.calls, mask)
    return recorder


@pytest.mark.parametrize("base_arch,plugin_arch", ARCHS)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_processor_matches_offline_forward_on_left_padded_batch(base_arch, plugin_arch, mode, tokenizer):
    recorder = generate_left_padded_and_check(make_base(base_arch), make_plugin(plugin_arch), tokenizer, mode)
    if "beam" in mode:
        # Beam search must actually have reordered rows between steps for this test to mean anything.
        reordered = [not torch.equal(b[:, :-1], a) for (a, _, _), (b, _, _) in zip(recorder.calls, recorder.calls[1:])]
        assert any(reordered)


@pytest.mark.parametrize("base_arch,plugin_arch", ARCHS[:2])
def test_reweighter_changes_greedy_output(base_arch, plugin_arch, tokenizer):
    base, plugin = make_base(base_arch), make_plugin(plugin_arch)
    input_ids, mask = prompts(tokenizer, ["w1 w2 w3", "w4 w5 w6"])
    plain = base.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    steered = base.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            logits_processor=[PluginLogitsProcessor(plugin, pad_token_id=PAD)])
    assert not torch.equal(plain, steered)
    base_alone = base.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                               logits_processor=[PluginLogitsProcessor(plugin, pad_token_id=PAD, alpha=0.0)])
    assert torch.equal(plain, base_alone)


@pytest.mark.parametrize("base_arch,plugin_arch", ARCHS[:2])
def test_explicit_attention_mask_and_pad_equal_to_eos(base_arch, plugin_arch, tokenizer):
    base, plugin = make_base(base_arch, pad_token_id=EOS), make_plugin(plugin_arch)
    input_ids, mask = prompts(tokenizer, ["w1 w2 w3 w4", "w5"])
    input_ids = input_ids.masked_fill(mask == 0, EOS)  # left padding with the EOS token
    recorder = Recorder(PluginLogitsProcessor(plugin, attention_mask=mask, pad_token_id=EOS))
    out = base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=10,
                        do_sample=True, pad_token_id=EOS, eos_token_id=EOS)
    assert_every_call_exact(plugin, recorder.calls, mask)
    assert_finished_sequences_exact(plugin, out, recorder.calls, mask)


def test_consecutive_generate_calls_reset_state(tokenizer):
    base, plugin = make_base("llama"), make_plugin("llama")
    processor = PluginLogitsProcessor(plugin, pad_token_id=PAD)
    recorder = Recorder(processor)
    tokens = count_reweighter_tokens(plugin)
    batches = [["w1 w2 w3", "w4"], ["w9 w8", "w7 w6 w5 w4 w3"], ["w1 w2 w3", "w4"]]
    outputs, counted = [], []
    for texts in batches:
        input_ids, mask = prompts(tokenizer, texts)
        recorder.calls.clear()
        outputs.append(base.generate(input_ids, attention_mask=mask, logits_processor=[recorder],
                                     max_new_tokens=6, min_new_tokens=6, do_sample=False))
        counted.append(list(tokens))
        tokens.clear()
        assert_every_call_exact(plugin, recorder.calls, mask)
        tokens.clear()
    # the same prompts give the same output, whatever the processor saw in between
    assert torch.equal(outputs[0], outputs[2])
    # each generation reads its prompt once (no prefix is shared between these batches), then one token a step
    assert counted == [[3] + [1] * 5, [5] + [1] * 5, [3] + [1] * 5]


def test_new_batch_size_and_single_row_batch(tokenizer):
    base, plugin = make_base("llama"), make_plugin("llama")
    recorder = Recorder(PluginLogitsProcessor(plugin, pad_token_id=PAD))
    for texts, beams in ((["w1 w2", "w3 w4 w5"], 1), (["w7"], 2), (["w1 w2", "w3", "w4 w5 w6"], 3)):
        input_ids, mask = prompts(tokenizer, texts)
        recorder.calls.clear()
        base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=4,
                      num_beams=beams, do_sample=False)
        assert_every_call_exact(plugin, recorder.calls, mask)


def test_explicit_mask_of_other_prompts_is_rejected_without_pad_token(tokenizer):
    base, plugin = make_base("llama"), make_plugin("llama")
    first_ids, first_mask = prompts(tokenizer, ["w1 w2 w3", "w4"])
    processor = PluginLogitsProcessor(plugin, attention_mask=first_mask)
    base.generate(first_ids, attention_mask=first_mask, logits_processor=[processor], max_new_tokens=2)
    other_ids, other_mask = prompts(tokenizer, ["w5 w6 w7", "w8"])
    with pytest.raises(ValueError, match="attention_mask of other prompts"):
        base.generate(other_ids, attention_mask=other_mask, logits_processor=[processor], max_new_tokens=2)
    wrong_shape = PluginLogitsProcessor(plugin, attention_mask=torch.ones(3, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"has shape \(3, 9\)"):
        base.generate(first_ids, attention_mask=first_mask, logits_processor=[wrong_shape], max_new_tokens=2)


@pytest.mark.parametrize("base_arch,plugin_arch", ARCHS[:2])
def test_assisted_decoding_is_exact(base_arch, plugin_arch, tokenizer):
    base, plugin = make_base(base_arch), make_plugin(plugin_arch)
    assistant = make_base(base_arch, seed=5)
    input_ids, mask = prompts(tokenizer, ["w1 w2 w3 w4"])
    recorder = Recorder(PluginLogitsProcessor(plugin, pad_token_id=PAD))
    assisted = base.generate(input_ids, attention_mask=mask, assistant_model=assistant, logits_processor=[recorder],
                             max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert_every_call_exact(plugin, recorder.calls, mask)
    lengths = [ids.shape[1] for ids, _, _ in recorder.calls]
    assert any(b <= a for a, b in zip(lengths, lengths[1:])), "no rolled-back call: assisted path not exercised"
    plain = base.generate(input_ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          logits_processor=[PluginLogitsProcessor(plugin, pad_token_id=PAD)])
    assert torch.equal(assisted, plain)


def test_direct_calls_with_rolled_back_and_jumping_lengths():
    plugin = make_plugin("llama")
    processor = PluginLogitsProcessor(plugin)
    tokens = count_reweighter_tokens(plugin)
    torch.manual_seed(0)
    sequence = torch.randint(3, VOCAB, (2, 20))
    counted = []
    for length in (6, 7, 8, 12, 9, 10, 10, 15, 3, 4):
        ids = sequence[:, :length]
        scores = torch.randn(2, VOCAB)
        out = processor(ids, scores)
        counted.append(tokens[-1])
        expected = offline(plugin, ids, torch.ones_like(ids), [(length - 1, scores)])[:, -1]
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    # 6 read once; +1 steps; jumps and roll-backs reuse the shared prefix and re-run only what is new
    assert counted == [6, 1, 1, 4, 1, 1, 1, 5, 1, 1]


def test_scores_untouched_new_tensor_no_grad_and_other_dtype():
    plugin = make_plugin("llama").to(torch.float64)
    processor = PluginLogitsProcessor(plugin)
    ids = torch.randint(3, VOCAB, (2, 5))
    scores = torch.randn(2, VOCAB)
    before = scores.clone()
    out = processor(ids, scores)
    assert torch.equal(scores, before)
    assert out.data_ptr() != scores.data_ptr()
    assert out.dtype == torch.float32 and not out.requires_grad
    assert PluginLogitsProcessor.supports_continuous_batching is False
    expected = offline(plugin, ids, torch.ones_like(ids), [(4, scores.double())])[:, -1]
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=0)
    half = PluginLogitsProcessor(make_plugin("llama").to(torch.bfloat16))
    out = half(ids, scores.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_masked_base_tokens_stay_masked():
    processor = PluginLogitsProcessor(make_plugin("llama"))
    scores = torch.randn(1, VOCAB)
    scores[0, 10:20] = float("-inf")
    out = processor(torch.tensor([[5, 6, 7]]), scores)
    assert torch.isneginf(out[0, 10:20]).all() and torch.isfinite(out[0, 20:]).all()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(1))


def test_nan_reweighter_raises():
    plugin = make_plugin("llama")
    with torch.no_grad():
        plugin.get_output_embeddings().weight[3].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        PluginLogitsProcessor(plugin)(torch.tensor([[5, 6]]), torch.randn(1, VOCAB))


def test_padded_vocabulary_rows_are_handled(tokenizer):
    # The base pads its output layer to 128 rows; the reweighter covers the tokenizer's 96 tokens.
    base = make_base("llama", vocab_size=128)
    plugin = make_plugin("llama", **binding_kwargs(base, tokenizer))
    recorder = Recorder(PluginLogitsProcessor(plugin, tokenizer=tokenizer))
    input_ids, mask = prompts(tokenizer, ["w1 w2", "w3"])
    base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=4)
    for input_ids, scores, out in recorder.calls:
        assert out.shape[-1] == 128 and torch.isneginf(out[:, VOCAB:]).all()
        with torch.no_grad():
            own = plugin(input_ids, attention_mask=full_mask(input_ids, mask)).logits[:, -1]
        expected = torch.log_softmax(torch.log_softmax(scores[:, :VOCAB], -1) + torch.log_softmax(own, -1), -1)
        torch.testing.assert_close(out[:, :VOCAB], expected, atol=1e-4, rtol=0)


def test_other_vocabulary_width_raises_naming_both():
    processor = PluginLogitsProcessor(make_plugin("llama", base_vocab_size=VOCAB, tokenizer_vocab_size=VOCAB))
    with pytest.raises(ValueError, match=rf"scores have 80 entries but the reweighter has {VOCAB}"):
        processor(torch.tensor([[5, 6]]), torch.randn(1, 80))
    unbound = PluginLogitsProcessor(make_plugin("llama"))
    with pytest.raises(ValueError, match=rf"scores have 128 entries but the reweighter has {VOCAB}"):
        unbound(torch.tensor([[5, 6]]), torch.randn(1, 128))


def test_tokenizer_fingerprint_mismatch(tokenizer, caplog):
    plugin = make_plugin("llama", **binding_kwargs(tokenizer=tokenizer))
    PluginLogitsProcessor(plugin, tokenizer=tokenizer)  # same tokenizer: fine
    other = make_tokenizer([f"v{i}" for i in range(VOCAB - 4)])
    with pytest.raises(ValueError, match=r"trained with tokenizer sha256:\w+ .* fingerprint sha256:\w+"):
        PluginLogitsProcessor(plugin, tokenizer=other)
    with caplog.at_level(logging.WARNING):
        PluginLogitsProcessor(plugin, tokenizer=other, strict=False)
    assert "Tokenizer mismatch" in caplog.text


def test_prompt_longer_than_reweighter_positions_raises(tokenizer):
    base, plugin = make_base("llama"), make_plugin("llama")  # reweighter accepts 128 positions
    processor = PluginLogitsProcessor(plugin, pad_token_id=PAD)
    long_prompt = torch.randint(3, VOCAB, (1, 129))
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        base.generate(long_prompt, logits_processor=[processor], max_new_tokens=2)
    # generating past the limit raises at the step that crosses it, not silently
    with pytest.raises(ValueError, match="has 129 tokens"):
        base.generate(long_prompt[:, :120], logits_processor=[processor], max_new_tokens=20, min_new_tokens=20)
    # padding does not count: 100 pads + 100 real tokens fit
    padded = torch.cat([torch.full((1, 100), PAD), long_prompt[:, :100]], dim=1)
    base.generate(padded, attention_mask=(padded != PAD).long(), logits_processor=[processor], max_new_tokens=3)


def test_constructor_validates_arguments():
    plugin = make_plugin("llama")
    with pytest.raises(TypeError, match="must be a PluginModel"):
        PluginLogitsProcessor(make_base("llama"))
    with pytest.raises(ValueError, match="alpha"):
        PluginLogitsProcessor(plugin, alpha=-1.0)
    with pytest.raises(ValueError, match="attention_mask"):
        PluginLogitsProcessor(plugin, attention_mask=torch.ones(4, dtype=torch.long))


@pytest.mark.parametrize("mode", ["greedy", "sampling", "beam"])
def test_stacked_reweighters_are_exact_and_each_incremental(mode, tokenizer):
    base, first, second = make_base("llama"), make_plugin("llama"), make_plugin("gpt2", seed=7)
    input_ids, mask = prompts(tokenizer, ["w1 w2 w3 w4", "w5 w6"])
    recorder = Recorder(PluginLogitsProcessor([first, second], alphas=[0.7, 1.5], pad_token_id=PAD))
    counts = count_reweighter_tokens(first), count_reweighter_tokens(second)
    torch.manual_seed(0)
    base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=6, min_new_tokens=6,
                  **MODES[mode])
    for count in counts:
        assert count == [input_ids.shape[1]] + [1] * (len(recorder.calls) - 1)
    for ids, scores, out in recorder.calls:
        base_logits = torch.zeros(*ids.shape, VOCAB)
        base_logits[:, -1] = scores
        with torch.no_grad():
            expected = score_with_reweighters([first, second], ids, base_logits, full_mask(ids, mask), alphas=[0.7, 1.5])
        torch.testing.assert_close(out, expected.logits[:, -1], atol=1e-4, rtol=0)
    # the stack is not the first reweighter alone
    alone = PluginLogitsProcessor(first, alpha=0.7)(recorder.calls[-1][0], recorder.calls[-1][1])
    assert not torch.allclose(alone, recorder.calls[-1][2], atol=1e-3)


def test_stacking_arguments_are_validated():
    first, second = make_plugin("llama"), make_plugin("llama", seed=2)
    with pytest.raises(ValueError, match="not both"):
        PluginLogitsProcessor([first, second], alpha=1.0, alphas=[1.0, 1.0])
    with pytest.raises(ValueError, match="1 alphas for 2 reweighters"):
        PluginLogitsProcessor([first, second], alphas=[1.0])
    with pytest.raises(ValueError, match="`alpha`/`alphas` must be a non-negative finite number, got inf"):
        PluginLogitsProcessor([first, second], alphas=[1.0, float("inf")])
    with pytest.raises(ValueError, match="`alphas` must be a non-negative finite number, got -1.0"):  # offline, the same
        score_with_reweighters([first], torch.tensor([[3]]), torch.zeros(1, 1, VOCAB), alphas=[-1.0])
    with pytest.raises(TypeError, match="non-empty sequence"):
        PluginLogitsProcessor([])
    # one `alpha` overrides every reweighter's own; 0 gives the base distribution back
    scores = torch.randn(1, VOCAB)
    out = PluginLogitsProcessor([first, second], alpha=0.0)(torch.tensor([[4, 5]]), scores)
    torch.testing.assert_close(out, scores.log_softmax(-1))
