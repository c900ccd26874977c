"""Streaming statistics equal their one-shot definitions."""

import torch

from codeprune.calibration.stats import ChannelStats, HessianStats


def test_channel_stats_match_direct_computation():
    torch.manual_seed(0)
    batches = [torch.randn(3, 7, 5) * 4 + 100 for _ in range(4)] + [torch.randn(1, 2, 5)]
    acc = ChannelStats(moments=True)
    for b in batches:
        acc.add_batch(b)
    X = torch.cat([b.reshape(-1, 5) for b in batches]).double()
    assert acc.count == X.shape[0]
    assert torch.allclose(acc.sumsq, (X**2).sum(0), rtol=1e-6)
    assert torch.allclose(acc.l2, X.norm(dim=0), rtol=1e-6)
    assert torch.allclose(acc.mean, X.mean(0), rtol=1e-6)
    assert torch.allclose(acc.var, X.var(0, unbiased=False), rtol=1e-4)


def test_hessian_stats_is_average_outer_product():
    torch.manual_seed(0)
    batches = [torch.randn(2, 4, 6), torch.randn(1, 3, 6)]
    acc = HessianStats()
    for b in batches:
        acc.add_batch(b)
    X = torch.cat([b.reshape(-1, 6) for b in batches])
    assert torch.allclose(acc.H, 2 * X.T @ X / X.shape[0], atol=1e-5)
