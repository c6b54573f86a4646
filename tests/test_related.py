"""The related logit-level methods (proxy-tuning/DExperts, ULD, Dynamic Logit Fusion) are exact and incremental in
every decoding mode, with models on the base's prompts or on their own, and refuse bad inputs clearly."""

from __future__ import annotations

import math

import pytest
import torch

from hf_plugin import (DynamicLogitFusionLogitsProcessor, LogitDifferenceLogitsProcessor, PluginLogitsProcessor,
                       PromptedModel, ProxyTuningLogitsProcessor, binding_kwargs, combine_logits)
from hf_plugin.methods import (dynamic_fusion_scores, logit_difference_scores, proxy_tuning_scores,
                               relative_top_mask, top_p_mask)
from hf_plugin.modeling_plugin import position_ids_from_attention_mask

from conftest import PAD, VOCAB, Recorder, full_mask, make_base, make_plugin, make_tokenizer, prompts


def small(arch, seed, vocab_size=VOCAB):
    """A tiny random causal LM with a sharpened output, so that the methods visibly change decoding."""
    model = make_base(arch, seed=seed, vocab_size=vocab_size)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def count_tokens(model):
    """Records how many new tokens per row each forward of `model` is run on."""
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[1]), with_kwargs=True)
    return seen


def own_sequences(ids, prompt_mask, own):
    """A model's view of generate()'s sequences: its own prompts (or the base's), then the generated tokens."""
    if own is None:
        return ids, full_mask(ids, prompt_mask)
    own_ids, own_mask = own
    generated = ids[:, prompt_mask.shape[1]:]
    repeats = ids.shape[0] // own_ids.shape[0]
    sequence = torch.cat([own_ids.repeat_interleave(repeats, dim=0), generated], dim=1)
    return sequence, full_mask(sequence, own_mask)


def offline_logits(model, ids, mask):
    """One forward over whole sequences, without a cache, positions counted from the mask."""
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask)).logits.float()


# Each method: the models it combines (role -> model), its processor from (possibly prompted) models, and its offline
# formula from the base scores and the models' logits in the same order.
def proxy_method(arch, top_p=None, alpha=1.5):
    models = {"expert": small(arch, 1), "anti-expert": small(arch, 2)}
    build = lambda m, **kw: ProxyTuningLogitsProcessor(m["expert"], m["anti-expert"], alpha=alpha,
                                                       plausibility_top_p=top_p, **kw)
    formula = lambda scores, logits: proxy_tuning_scores(scores, *logits, alpha=alpha, plausibility_top_p=top_p)
    return models, build, formula


def uld_method(arch):
    models = {"assistant": small(arch, 3)}
    build = lambda m, **kw: LogitDifferenceLogitsProcessor(m["assistant"], beta=0.75, relative_top=0.1, **kw)
    formula = lambda scores, logits: logit_difference_scores(scores, logits[0], beta=0.75, relative_top=0.1)
    return models, build, formula


def fusion_method(arch):
    models = {"small base": small(arch, 4), "expert 0": small(arch, 5), "expert 1": small(arch, 6)}
    build = lambda m, **kw: DynamicLogitFusionLogitsProcessor([m["expert 0"], m["expert 1"]], m["small base"], **kw)
    formula = lambda scores, logits: dynamic_fusion_scores(scores, logits[0], logits[1:])
    return models, build, formula


METHODS = {
    "proxy_tuning": proxy_method,
    "dexperts": lambda arch: proxy_method(arch, top_p=0.9, alpha=2.0),
    "uld": uld_method,
    "dynamic_fusion": fusion_method,
}
MODES = {
    "greedy": dict(do_sample=False),
    "sampling_multiple_returns": dict(do_sample=True, temperature=1.3, top_k=30, num_return_sequences=3),
    "beam_multiple_returns": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}
TEXTS = ["w1 w2 w3 w4 w5", "w6 w7", "w8 w9 w10"]
# An auxiliary model's own rendering of the same prompts (say, a chat template): other tokens, other lengths.
OWN_TEXTS = ["w60 w61 w1 w2 w3 w4 w5 w62", "w60 w61 w6 w7 w62", "w60 w61 w63 w64 w65 w8 w9 w10 w62"]


def expected_outputs(formula, models, own, input_ids, scores, prompt_mask, position=-1):
    """The method's output at `position` of `input_ids`, from offline forwards of every model."""
    logits = []
    for role, model in models.items():
        sequence, mask = own_sequences(input_ids, prompt_mask, own.get(role))
        shift = sequence.shape[1] - input_ids.shape[1]
        index = position if position < 0 else position + shift
        logits.append(offline_logits(model, sequence, mask)[:, index])
    return formula(scores, logits)


@pytest.mark.parametrize("prompted", [False, True], ids=["shared_prompts", "own_prompts"])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_step_matches_offline_computation(method, arch, mode, prompted, tokenizer):
    base = small(arch, 0)
    models, build, formula = METHODS[method](arch)
    input_ids, mask = prompts(tokenizer, TEXTS)
    own = {}
    if prompted:  # the first model reads its own prompts, the others the base's
        own[next(iter(models))] = prompts(tokenizer, OWN_TEXTS)
    wrapped = {role: PromptedModel(model, *own[role]) if role in own else model for role, model in models.items()}
    recorder = Recorder(build(wrapped, pad_token_id=PAD))
    counts = {role: count_tokens(model) for role, model in models.items()}
    torch.manual_seed(0)
    out = base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=6,
                        min_new_tokens=6, **MODES[mode])

    steps = len(recorder.calls)
    assert steps == 6
    for role, count in counts.items():  # incremental: each model reads its prompt once, then one token per step
        prompt_length = own[role][0].shape[1] if role in own else input_ids.shape[1]
        assert count == [prompt_length] + [1] * (steps - 1), role
    for ids, scores, got in recorder.calls:
        expected = expected_outputs(formula, models, own, ids, scores, mask)
        expected = expected[0] if isinstance(expected, tuple) else expected
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    if "beam" in mode:  # beam search must have reordered rows for the test to mean anything
        assert any(not torch.equal(b[:, :-1], a) for (a, _, _), (b, _, _) in zip(recorder.calls, recorder.calls[1:]))
        return
    # One offline forward per model over the finished sequences reproduces every step.
    prompt_length = input_ids.shape[1]
    for step, (_, scores, got) in enumerate(recorder.calls):
        expected = expected_outputs(formula, models, own, out, scores, mask, position=prompt_length - 1 + step)
        if method == "dynamic_fusion":
            expected, chosen_expert, chosen_alpha = expected
            choice = recorder.processor.choices[step]
            assert torch.equal(choice["expert"], chosen_expert) and torch.equal(choice["alpha"], chosen_alpha)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_change_greedy_output_and_neutral_settings_give_the_base(method, tokenizer):
    base = small("llama", 0)
    models, build, _ = METHODS[method]("llama")
    input_ids, mask = prompts(tokenizer, TEXTS)
    plain = base.generate(input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    steered = base.generate(input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                            logits_processor=[build(models, pad_token_id=PAD)])
    assert not torch.equal(plain, steered)


def test_neutral_strengths_return_the_base_distribution():
    torch.manual_seed(0)
    scores, a, b = torch.randn(3, 5, VOCAB).unbind(0)
    torch.testing.assert_close(proxy_tuning_scores(scores, a, b, alpha=0.0), scores.log_softmax(-1))
    torch.testing.assert_close(logit_difference_scores(scores, a, beta=0.0, relative_top=1.0), scores.log_softmax(-1))
    fused, _, alpha = dynamic_fusion_scores(scores, a, [b], alpha_grid=[0.0])
    torch.testing.assert_close(fused, scores.log_softmax(-1))
    assert (alpha == 0).all()


def test_proxy_tuning_formula_and_dexperts_nucleus():
    torch.manual_seed(1)
    scores, expert, anti = torch.randn(3, 4, VOCAB).mul(3).unbind(0)
    scores[0, 5] = float("-inf")  # masked by an earlier processor: stays masked
    out = proxy_tuning_scores(scores, expert, anti, alpha=0.7)
    by_hand = scores.log_softmax(-1) + 0.7 * (expert.log_softmax(-1) - anti.log_softmax(-1))
    torch.testing.assert_close(out, by_hand.log_softmax(-1))
    assert torch.isneginf(out[0, 5])
    nucleus = proxy_tuning_scores(scores, expert, anti, alpha=2.0, plausibility_top_p=0.9)
    for row in range(4):  # the nucleus by hand: most probable first, until the mass before a token reaches 0.9
        probs = scores[row].softmax(-1)
        order = probs.argsort(descending=True).tolist()
        kept, mass = set(), 0.0
        for token in order:
            if mass >= 0.9:
                break
            kept.add(token)
            mass += float(probs[token])
        finite = set(torch.isfinite(nucleus[row]).nonzero().squeeze(1).tolist())
        assert finite == kept and 0 < len(kept) < VOCAB
    assert top_p_mask(scores.log_softmax(-1), 1.0).all()


def test_logit_difference_mask_and_no_greedy_quirk():
    torch.manual_seed(2)
    target, assistant = torch.randn(2, 6, VOCAB).mul(4).unbind(0)
    out = logit_difference_scores(target, assistant, beta=0.8, relative_top=0.05)
    log_p = target.log_softmax(-1)
    for row in range(6):  # the threshold by hand: min(max + log r, the log-prob ranked floor(r * V))
        ranked = sorted(log_p[row].tolist(), reverse=True)
        threshold = min(ranked[0] + math.log(0.05), ranked[int(0.05 * VOCAB) - 1])
        kept = log_p[row] >= threshold
        assert torch.equal(torch.isfinite(out[row]), kept)
        by_hand = (log_p[row] - 0.8 * assistant[row].log_softmax(-1))[kept].log_softmax(-1)
        torch.testing.assert_close(out[row][kept], by_hand)
    # All kept scores negative: a masked token must still never win (the reference code's greedy path lets it).
    target = torch.tensor([[0.0, -0.1, -20.0, -20.0]])
    assistant = torch.tensor([[5.0, 5.0, -20.0, -20.0]])
    scores = logit_difference_scores(target, assistant, beta=1.0, relative_top=0.5)
    assert int(scores.argmax()) in (0, 1) and torch.isneginf(scores[0, 2:]).all()
    assert relative_top_mask(torch.tensor([0.25] * 4).log(), 1e-2).all()


def test_dynamic_fusion_matches_a_brute_force_search():
    torch.manual_seed(3)
    large, small_base = torch.randn(2, 5, VOCAB).mul(3).unbind(0)
    experts = list(torch.randn(3, 5, VOCAB).mul(3).unbind(0))
    large[1, 7] = float("-inf")
    grid = [i / 10 for i in range(21)]
    fused, chosen_expert, chosen_alpha = dynamic_fusion_scores(large, small_base, experts, grid)

    def kl(log_a, log_b):
        a = log_a.exp()
        return float(torch.where(a > 0, a * (log_a - log_b), torch.zeros(())).sum())

    for row in range(5):
        log_p, log_q = large[row].log_softmax(-1), small_base[row].log_softmax(-1)
        best = None
        for t, expert in enumerate(experts):
            log_qt = expert[row].log_softmax(-1)
            for alpha in grid:
                log_tilde = (log_p + alpha * (log_qt - log_q)).log_softmax(-1)
                value = (kl(log_tilde, log_p) - kl(log_qt, log_q)) ** 2 + (kl(log_p, log_tilde) - kl(log_q, log_qt)) ** 2
                if best is None or value < best[0] - 1e-9:
                    best = (value, t, alpha, log_tilde)
        assert (int(chosen_expert[row]), float(chosen_alpha[row])) == pytest.approx((best[1], best[2]))
        torch.testing.assert_close(fused[row], best[3], atol=1e-5, rtol=0)
    assert len({(int(t), float(a)) for t, a in zip(chosen_expert, chosen_alpha)}) > 1
    assert torch.isneginf(fused[1, 7])


def test_two_generate_calls_and_own_prompts_bound_to_their_batch(tokenizer):
    base = small("llama", 0)
    models, build, formula = METHODS["proxy_tuning"]("llama")
    processor = build(models, pad_token_id=PAD)
    counts = count_tokens(models["expert"])
    for texts in (TEXTS, ["w9 w8", "w7 w6 w5 w4 w3"]):  # shared prompts: any batch, one after the other
        input_ids, mask = prompts(tokenizer, texts)
        recorder = Recorder(processor)
        counts.clear()
        base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=4,
                      min_new_tokens=4, do_sample=False)
        assert counts == [input_ids.shape[1], 1, 1, 1]
        for ids, scores, got in recorder.calls:
            torch.testing.assert_close(got, expected_outputs(formula, models, {}, ids, scores, mask), atol=1e-4, rtol=0)

    input_ids, mask = prompts(tokenizer, TEXTS)
    own = prompts(tokenizer, OWN_TEXTS)
    prompted = build({**models, "expert": PromptedModel(models["expert"], *own)}, pad_token_id=PAD)
    runs = [base.generate(input_ids, attention_mask=mask, logits_processor=[prompted], max_new_tokens=4,
                          do_sample=False) for _ in range(2)]
    assert torch.equal(*runs)  # the same prompts again: served from the same own prompts
    other_ids, other_mask = prompts(tokenizer, ["w20 w21", "w22", "w23 w24 w25"])
    with pytest.raises(ValueError, match="own prompts belong to the prompts of an earlier generate"):
        base.generate(other_ids, attention_mask=other_mask, logits_processor=[prompted], max_new_tokens=2)
    wrong_rows = build({**models, "expert": PromptedModel(models["expert"], *prompts(tokenizer, OWN_TEXTS[:2]))},
                       pad_token_id=PAD)
    with pytest.raises(ValueError, match="given 2 prompts of its own but generate\\(\\) runs 3 rows"):
        base.generate(input_ids, attention_mask=mask, logits_processor=[wrong_rows], max_new_tokens=2)


def test_plugin_model_as_auxiliary_and_tokenizer_checks(tokenizer):
    base = small("llama", 0)
    bound = make_plugin("llama", **binding_kwargs(base, tokenizer))
    LogitDifferenceLogitsProcessor(bound, tokenizer=tokenizer)  # the assistant's recorded tokenizer: fine
    other = make_tokenizer([f"v{i}" for i in range(VOCAB - 4)])
    with pytest.raises(ValueError, match="Tokenizer mismatch"):
        LogitDifferenceLogitsProcessor(bound, tokenizer=other)
    narrow = small("llama", 1, vocab_size=64)
    with pytest.raises(ValueError, match=f"The expert has 64 output rows but the tokenizer has {VOCAB} tokens"):
        ProxyTuningLogitsProcessor(narrow, small("llama", 2), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=f"scores have 80 entries but the expert has {VOCAB}"):
        ProxyTuningLogitsProcessor(small("llama", 1), small("llama", 2))(torch.tensor([[4, 5]]), torch.randn(1, 80))
    with pytest.raises(ValueError, match=rf"scores have 80 entries but the assistant has {VOCAB}\. The assistant only"):
        LogitDifferenceLogitsProcessor(small("llama", 1))(torch.tensor([[4, 5]]), torch.randn(1, 80))


def test_padded_base_vocabulary_rows_get_minus_infinity(tokenizer):
    # The base pads its output layer to 128 rows; the small models cover the tokenizer's 96 tokens.
    base = small("llama", 0, vocab_size=128)
    input_ids, mask = prompts(tokenizer, TEXTS[:2])
    for method in sorted(METHODS):
        models, build, formula = METHODS[method]("llama")
        recorder = Recorder(build(models, tokenizer=tokenizer))
        base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=3)
        for ids, scores, got in recorder.calls:
            assert got.shape[-1] == 128 and torch.isneginf(got[:, VOCAB:]).all(), method
            expected = expected_outputs(formula, models, {}, ids, scores, mask)
            expected = expected[0] if isinstance(expected, tuple) else expected
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_constructors_refuse_bad_arguments():
    a, b = small("llama", 1), small("llama", 2)
    for alpha in (float("nan"), -1e308, 1e7, "1"):  # -1e308 used to overflow into NaN and decode "" silently
        with pytest.raises(ValueError, match="`alpha` must be a number between -1e\\+06 and 1e\\+06"):
            ProxyTuningLogitsProcessor(a, b, alpha=alpha)
    with pytest.raises(ValueError, match=r"`plausibility_top_p` must be in \(0, 1\]"):
        ProxyTuningLogitsProcessor(a, b, plausibility_top_p=1.5)
    with pytest.raises(TypeError, match="The anti-expert must be a causal LM"):
        ProxyTuningLogitsProcessor(a, "gpt2")
    with pytest.raises(ValueError, match="`beta` must be a finite number"):
        LogitDifferenceLogitsProcessor(a, beta=float("inf"))
    with pytest.raises(ValueError, match=r"`relative_top` must be in \(0, 1\]"):
        LogitDifferenceLogitsProcessor(a, relative_top=0.0)
    with pytest.raises(ValueError, match="at least one model"):
        DynamicLogitFusionLogitsProcessor([], b)
    with pytest.raises(ValueError, match="`alpha_grid` must be a non-empty sequence"):
        DynamicLogitFusionLogitsProcessor(a, b, alpha_grid=())
    with pytest.raises(ValueError, match="must share the small base's vocabulary"):
        DynamicLogitFusionLogitsProcessor([a, small("llama", 3, vocab_size=128)], b)
    with pytest.raises(ValueError, match="must be left-padded"):
        PromptedModel(a, torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="`attention_mask` has shape"):
        PromptedModel(a, torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="`input_ids` must be a"):
        PromptedModel(a, torch.tensor([5, 6, 7]))


@pytest.mark.parametrize("mode", ["sampling_multiple_returns", "beam_multiple_returns"])
def test_plugin_processor_with_a_reweighter_on_its_own_prompts(mode, tokenizer):
    base, own_prompted, shared = small("llama", 0), make_plugin("llama"), make_plugin("gpt2", seed=7)
    input_ids, mask = prompts(tokenizer, TEXTS)
    own = prompts(tokenizer, OWN_TEXTS)
    recorder = Recorder(PluginLogitsProcessor([PromptedModel(own_prompted, *own), shared], alphas=[0.7, 1.2],
                                              pad_token_id=PAD))
    counts = count_tokens(own_prompted)
    torch.manual_seed(0)
    base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=5, min_new_tokens=5,
                  **MODES[mode])
    assert counts == [own[0].shape[1]] + [1] * 4
    for ids, scores, got in recorder.calls:
        logits = [offline_logits(model, *own_sequences(ids, mask, view))[:, -1]
                  for model, view in ((own_prompted, own), (shared, None))]
        torch.testing.assert_close(got, combine_logits(scores, logits, [0.7, 1.2]), atol=1e-4, rtol=0)
