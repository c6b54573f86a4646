import math

import pytest
import torch

from hf_plugin import align_vocab, combine_logits


def test_product_of_distributions_renormalised():
    base = torch.tensor([1.0, 2.0, 3.0])
    reweighter = torch.tensor([0.5, -1.0, 2.0])
    p, r = base.softmax(-1), reweighter.softmax(-1)
    expected = (p * r) / (p * r).sum()
    torch.testing.assert_close(combine_logits(base, reweighter).exp(), expected)


def test_alpha_powers_the_reweighter():
    base, reweighter = torch.randn(4, 10), torch.randn(4, 10)
    torch.testing.assert_close(combine_logits(base, reweighter, alpha=0.0), base.log_softmax(-1))
    p, r = base.softmax(-1), reweighter.softmax(-1)
    expected = p * r**2.5
    torch.testing.assert_close(combine_logits(base, reweighter, alpha=2.5).exp(), expected / expected.sum(-1, keepdim=True))


def test_log_space_is_stable_and_keeps_masked_tokens_masked():
    base = torch.tensor([[-1e4, 0.0, float("-inf")]])
    reweighter = torch.tensor([[1e4, -1e4, 3.0]])
    out = combine_logits(base, reweighter)
    assert torch.isfinite(out[0, :2]).all() and math.isinf(out[0, 2].item())
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(1))


def test_raw_logits_and_log_probs_give_the_same_result():
    base, reweighter = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(combine_logits(base, reweighter), combine_logits(base.log_softmax(-1) - 5.0, reweighter + 3.0))


def test_half_precision_is_computed_in_float32():
    out = combine_logits(torch.randn(2, 5).half(), torch.randn(2, 5).bfloat16())
    assert out.dtype == torch.float32


def test_width_mismatch_raises_and_align_pads_with_minus_inf():
    with pytest.raises(ValueError, match="5 vocabulary entries but the reweighter's have 4"):
        combine_logits(torch.randn(5), torch.randn(4))
    logits = torch.randn(2, 4)
    padded = align_vocab(logits, 6)
    assert torch.equal(padded[:, :4], logits) and torch.isneginf(padded[:, 4:]).all()
    assert torch.equal(align_vocab(logits, 3), logits[:, :3])
    assert align_vocab(logits, 4) is logits


def test_stacked_reweighters_multiply_with_their_own_alphas():
    base, r1, r2 = torch.randn(3, 9), torch.randn(3, 9), torch.randn(3, 9)
    p, q1, q2 = base.softmax(-1), r1.softmax(-1), r2.softmax(-1)
    expected = p * q1**0.5 * q2**2.0
    out = combine_logits(base, [r1, r2], alpha=[0.5, 2.0])
    torch.testing.assert_close(out.exp(), expected / expected.sum(-1, keepdim=True))
    torch.testing.assert_close(combine_logits(base, [r1, r2], alpha=1.0), combine_logits(combine_logits(base, r1), r2))
    with pytest.raises(ValueError, match="2 alphas for 3 reweighters"):
        combine_logits(base, [r1, r2, r1], alpha=[1.0, 1.0])


def _topk_inputs(base, labels, k):
    log_probs = base.log_softmax(-1)
    values, ids = log_probs.topk(k, dim=-1)
    return ids, values, log_probs.gather(-1, labels[:, None]).squeeze(-1)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_topk_nll_is_exact_with_the_whole_vocabulary_and_an_upper_bound_otherwise(alpha):
    from hf_plugin.combine import combine_topk_nll

    torch.manual_seed(0)
    base, reweighter = torch.randn(50, 40) * 3, torch.randn(50, 40) * 3
    labels = torch.randint(0, 40, (50,))
    exact = -combine_logits(base, reweighter, alpha).gather(-1, labels[:, None]).squeeze(-1)
    full = combine_topk_nll(reweighter, *_topk_inputs(base, labels, 40)[:2], labels, _topk_inputs(base, labels, 40)[2], alpha)
    torch.testing.assert_close(full, exact)
    for k in (1, 5, 20):
        ids, values, label_lp = _topk_inputs(base, labels, k)
        bound = combine_topk_nll(reweighter, ids, values, labels, label_lp, alpha)
        assert torch.isfinite(bound).all() and (bound >= exact - 1e-5).all()
    # a larger k never loosens the bound much: it converges to the exact value
    ids, values, label_lp = _topk_inputs(base, labels, 39)
    assert (combine_topk_nll(reweighter, ids, values, labels, label_lp, alpha) - exact).abs().max() < 0.1


def test_topk_bound_is_tighter_than_the_max_bound_and_still_above_the_truth():
    from hf_plugin.combine import combine_topk_nll

    torch.manual_seed(1)
    base, reweighter = torch.randn(64, 500) * 2, torch.randn(64, 500)
    labels = torch.randint(0, 500, (64,))
    exact = -combine_logits(base, reweighter).gather(-1, labels[:, None]).squeeze(-1)
    ids, values, label_lp = _topk_inputs(base, labels, 16)
    filled = combine_topk_nll(reweighter, ids, values, labels, label_lp, fill=256)
    max_only = combine_topk_nll(reweighter, ids, values, labels, label_lp, fill=1)  # one portion: close to m·max r
    assert (filled >= exact - 1e-5).all() and (filled <= max_only + 1e-6).all()
    assert (filled - exact).mean() < (max_only - exact).mean()


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_known_task_tokens_tighten_the_bound_and_complete_it(alpha):
    from hf_plugin.combine import combine_topk_nll

    torch.manual_seed(2)
    base, reweighter = torch.randn(64, 300) * 3, torch.randn(64, 300) * 2
    labels = torch.randint(0, 300, (64,))
    exact = -combine_logits(base, reweighter, alpha).gather(-1, labels[:, None]).squeeze(-1)
    ids, values, label_lp = _topk_inputs(base, labels, 8)
    log_probs = base.log_softmax(-1)
    top_only = combine_topk_nll(reweighter, ids, values, labels, label_lp, alpha)
    task = torch.randperm(300)[:100]  # overlaps some top-k ids: counted once
    with_task = combine_topk_nll(reweighter, ids, values, labels, label_lp, alpha, extra_ids=task,
                                 extra_logprobs=log_probs[:, task])
    assert (with_task >= exact - 1e-5).all() and (with_task <= top_only + 1e-5).all()
    assert (with_task - exact).mean() < 0.8 * (top_only - exact).mean()
    everything = torch.arange(300)
    complete = combine_topk_nll(reweighter, ids, values, labels, label_lp, alpha, extra_ids=everything,
                                extra_logprobs=log_probs)
    torch.testing.assert_close(complete, exact)
    with pytest.raises(ValueError, match="pass both or neither"):
        combine_topk_nll(reweighter, ids, values, labels, label_lp, alpha, extra_ids=task)
