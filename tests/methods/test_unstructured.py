"""Method x architecture x pattern matrix on tiny random models, plus method-level checks."""

import pytest
import torch

from codeprune.errors import ConfigError
from codeprune.methods import SPARSE_METHODS, make_pruner
from codeprune.methods.unstructured.base import prune_model_
from codeprune.models.counting import linear_sparsity

CASES = [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", None), ("4:8", None)]


def _untouched(lm):
    a = lm.adapter
    mods = [a.embed_tokens(), a.lm_head(), a.final_norm()]
    for layer in a.layers():
        mods += [a.input_norm(layer), a.post_attention_norm(layer)]
    return {id(m): m.weight.detach().clone() for m in mods}


@pytest.mark.parametrize("method", SPARSE_METHODS)
@pytest.mark.parametrize("pattern,sparsity", CASES)
def test_method_matrix(tiny_any, random_ids, method, pattern, sparsity):
    lm = tiny_any
    before = _untouched(lm)
    pruner = make_pruner(method, sparsity=sparsity if sparsity is not None else 0.5, pattern=pattern)
    pruned = prune_model_(lm, pruner, random_ids, batch_size=4)
    assert len(pruned) == 7 * lm.adapter.num_layers

    for lin in pruned:
        W = lin.weight
        out_f, in_f = W.shape
        zeros = W == 0
        if pattern == "unstructured":
            if method == "sparsegpt":  # adaptive mask: exact count over each block of rows x 128 cols
                assert zeros.sum().item() == pytest.approx(int(W.numel() * sparsity), abs=out_f)
            else:
                assert (zeros.sum(1) == int(in_f * sparsity)).all()
        else:
            n, m = map(int, pattern.split(":"))
            groups = zeros.view(out_f, in_f // m, m).sum(-1)
            assert (groups >= n).all()
            if method != "sparsegpt":
                assert (groups == n).all()

    actual, per_layer = linear_sparsity(lm.model, pruned)
    target = pruner.config.sparsity
    assert actual == pytest.approx(target, abs=0.02)
    assert len(per_layer) == len(pruned)
    for mid, w in before.items():
        mod = next(m for m in lm.model.modules() if id(m) == mid)
        assert torch.equal(mod.weight, w), "embeddings, norms and lm_head are never pruned"


def test_sparsity_zero_changes_nothing(tiny_llama, random_ids):
    state = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    prune_model_(tiny_llama, make_pruner("wanda", sparsity=0.0), random_ids)
    for k, v in tiny_llama.model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("kwargs", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(pattern="4:2"),
                                    dict(pattern="2:4:8"), dict(pattern="0:4"), dict(bogus=1)])
def test_bad_configs(kwargs):
    with pytest.raises(ConfigError):
        make_pruner("wanda", **kwargs)


def test_unknown_method():
    with pytest.raises(ConfigError, match="magnitude"):
        make_pruner("no-such-method")


def test_nm_pattern_sets_sparsity():
    assert make_pruner("wanda", pattern="2:4").config.sparsity == 0.5
    assert make_pruner("magnitude", pattern="1:4").config.sparsity == 0.25


def _layer_error(W, W_pruned, X):
    return ((X @ W.T - X @ W_pruned.T) ** 2).sum().item()


def test_layerwise_reconstruction_ordering():
    """On inputs with uneven channel scales and correlations, the output error of one
    Linear orders as SparseGPT < Wanda < magnitude (the reason each method exists)."""
    from codeprune.calibration.stats import ChannelStats, HessianStats
    from codeprune.methods.unstructured.masks import unstructured_mask
    from codeprune.methods.unstructured.sparsegpt import sparsegpt_prune_
    from codeprune.methods.unstructured.wanda import wanda_scores

    torch.manual_seed(0)
    in_f, out_f, n = 64, 32, 2048
    mix = torch.randn(in_f, in_f) / in_f**0.5 + torch.eye(in_f)
    X = (torch.randn(n, in_f) @ mix) * torch.logspace(-1, 1, in_f)  # (N, in)
    W = torch.randn(out_f, in_f)
    ch, hs = ChannelStats(), HessianStats()
    ch.add_batch(X)
    hs.add_batch(X)

    W_mag = W * ~unstructured_mask(W.abs(), 0.5)
    W_wanda = W * ~unstructured_mask(wanda_scores(W, ch.l2.float()), 0.5)
    W_sgpt = W.clone()
    mask = sparsegpt_prune_(W_sgpt, hs.H, 0.5, None)
    assert (W_sgpt[mask] == 0).all() and mask.sum().item() == W.numel() // 2

    e_mag, e_wanda, e_sgpt = (_layer_error(W, w, X) for w in (W_mag, W_wanda, W_sgpt))
    assert e_sgpt < e_wanda < e_mag


def test_sparsegpt_with_identity_hessian_is_magnitude():
    """With H = I there is nothing to propagate: SparseGPT keeps the largest weights."""
    from codeprune.methods.unstructured.masks import nm_mask
    from codeprune.methods.unstructured.sparsegpt import sparsegpt_prune_

    torch.manual_seed(0)
    W = torch.randn(8, 16)
    W_sgpt = W.clone()
    sparsegpt_prune_(W_sgpt, torch.eye(16), 0.5, (2, 4))
    expected = W * ~nm_mask(W.abs(), 2, 4)
    torch.testing.assert_close(W_sgpt, expected)


@pytest.mark.parametrize("n,m", [(2, 3), (3, 5), (2, 4)])
def test_sparsegpt_nm_groups_are_aligned(n, m):
    """Groups of M columns start at multiples of M even when M does not divide the block size."""
    from codeprune.methods.unstructured.sparsegpt import sparsegpt_prune_

    torch.manual_seed(0)
    in_f = 60 * m
    X = torch.randn(512, in_f)
    W = torch.randn(4, in_f)
    mask = sparsegpt_prune_(W, 2 * X.T @ X / 512, 0.5, (n, m), block_size=128)
    assert (mask.view(4, -1, m).sum(-1) == n).all()
    assert (W[mask] == 0).all()
