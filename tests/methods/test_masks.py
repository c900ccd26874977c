"""Known-answer tests of the pure score and mask functions."""

import pytest
import torch

from codeprune.errors import ConfigError
from codeprune.methods.unstructured.magnitude import magnitude_scores
from codeprune.methods.unstructured.masks import nm_mask, unstructured_mask
from codeprune.methods.unstructured.wanda import wanda_scores
from codeprune.reporting.masks import jaccard_distance


def test_unstructured_mask_exact_per_row():
    scores = torch.tensor([[1.0, 8.0, 3.0, 5.0, 2.0, 7.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    mask = unstructured_mask(scores, 0.5)
    assert mask.tolist() == [[True, False, True, False, True, False],
                             [False, False, False, True, True, True]]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.33, 0.5, 0.9])
def test_unstructured_mask_counts(sparsity):
    scores = torch.rand(7, 13)
    mask = unstructured_mask(scores, sparsity)
    assert (mask.sum(1) == int(13 * sparsity)).all()


def test_nm_mask_known_answer():
    scores = torch.arange(1.0, 9.0).view(1, 8)  # weights 1..8
    assert nm_mask(scores, 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 5.0, 8.0, 6.0, 7.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, False, True, False]]
    assert nm_mask(scores, 1, 4).sum().item() == 2


def test_nm_mask_every_group():
    scores = torch.rand(5, 16)
    mask = nm_mask(scores, 4, 8).view(5, 2, 8)
    assert (mask.sum(-1) == 4).all()
    kept = scores.view(5, 2, 8).masked_fill(mask, float("inf")).amin(-1)
    dropped = scores.view(5, 2, 8).masked_fill(~mask, float("-inf")).amax(-1)
    assert (dropped <= kept).all()


def test_nm_mask_rejects_indivisible_width():
    with pytest.raises(ConfigError):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_wanda_keeps_hand_computed_ranking():
    # |W| * ||X_j||: column norms 1, 10, 0.1, 2 flip the magnitude ranking.
    W = torch.tensor([[4.0, -1.0, 8.0, 1.0], [-3.0, 0.5, 10.0, -2.0]])
    x_l2 = torch.tensor([1.0, 10.0, 0.1, 2.0])
    scores = wanda_scores(W, x_l2)
    assert torch.allclose(scores, torch.tensor([[4.0, 10.0, 0.8, 2.0], [3.0, 5.0, 1.0, 4.0]]))
    mask = unstructured_mask(scores, 0.5)
    assert mask.tolist() == [[False, False, True, True], [True, False, True, False]]
    # magnitude would prune differently: it keeps column 2 (the largest weights)
    assert unstructured_mask(magnitude_scores(W), 0.5)[:, 2].tolist() == [False, False]


def test_jaccard_distance():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    assert jaccard_distance(a, b) == pytest.approx(1 - 1 / 3)
    assert jaccard_distance(a, a) == 0.0
    assert jaccard_distance(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 0.0
