"""Properties of the predicted subset of removed patches (``mae_timm.layers.prediction_subset``) over drawn
batches, lengths, mask ratios and predict ratios, for random, block and grid masking."""

import pytest
import torch
from hypothesis import given
from strategies import bad_predict_ratios, noise_batches, patch_grids, predict_ratios

from mae_timm.layers import block_masking, grid_masking, num_kept, num_predicted, predicted_ids, random_masking_ids


def check_subset(ids_pred, mask, len_keep, predict_ratio):
    """Removed patches only, no repeats, as many as the rounding rule says, in every row."""
    batch, length = mask.shape
    count = 0 if length == len_keep else max(1, round((length - len_keep) * predict_ratio))
    assert ids_pred.shape == (batch, count)
    assert torch.all(torch.gather(mask, 1, ids_pred) == 1)  # a subset of the removed patches
    for row in ids_pred.tolist():
        assert len(set(row)) == len(row)  # no patch twice


@given(noise_batches())
def test_random_masking_subset(case):
    noise, ratio, predict_ratio = case
    batch, length = noise.shape
    len_keep = num_kept(length, ratio)
    _, mask, ids_restore = random_masking_ids(batch, length, ratio, noise=noise)
    ids_pred = predicted_ids(ids_restore, len_keep, predict_ratio)
    check_subset(ids_pred, mask, len_keep, predict_ratio)
    # it is the removed patches of smallest noise: a uniform share of them, since the noise is i.i.d.
    removed_noise = torch.where(mask.bool(), noise, torch.inf)
    expected = torch.argsort(removed_noise, dim=1)[:, : ids_pred.shape[1]]
    assert torch.equal(ids_pred, expected)
    # the same noise gives the same subset
    assert torch.equal(predicted_ids(random_masking_ids(batch, length, ratio, noise=noise)[2], len_keep,
                                     predict_ratio), ids_pred)


@given(noise_batches(max_batch=4))
def test_rows_are_drawn_apart(case):
    """A row's subset depends on that row's noise only: redrawing the other rows leaves it as it is."""
    noise, ratio, predict_ratio = case
    batch, length = noise.shape
    len_keep = num_kept(length, ratio)
    other = torch.rand(batch, length, generator=torch.Generator().manual_seed(1))
    other[0] = noise[0]
    first = predicted_ids(random_masking_ids(batch, length, ratio, noise=noise)[2], len_keep, predict_ratio)
    second = predicted_ids(random_masking_ids(batch, length, ratio, noise=other)[2], len_keep, predict_ratio)
    assert torch.equal(first[0], second[0])


@given(noise_batches())
def test_predict_ratio_one_is_every_removed_patch(case):
    noise, ratio, _ = case
    batch, length = noise.shape
    len_keep = num_kept(length, ratio)
    _, mask, ids_restore = random_masking_ids(batch, length, ratio, noise=noise)
    ids_pred = predicted_ids(ids_restore, len_keep, 1.0)
    predicted = torch.zeros_like(mask).scatter(1, ids_pred, 1.0)
    assert torch.equal(predicted, mask)


@given(patch_grids(), predict_ratios)
def test_block_and_grid_masking_subsets(case, predict_ratio):
    batch, grid, ratio, seed = case
    len_keep = num_kept(grid[0] * grid[1], ratio)
    for masking in (block_masking, grid_masking):
        _, mask, ids_restore = masking(batch, grid, ratio, generator=torch.Generator().manual_seed(seed))
        check_subset(predicted_ids(ids_restore, len_keep, predict_ratio), mask, len_keep, predict_ratio)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_removed_patch_is_equally_likely(seed):
    """One removed set, 4,000 rows of fresh noise within it: each of its 12 patches is predicted in 3/12 of the
    rows (binomial sd 27 rows; 6 sd allowed), and no kept patch ever is."""
    g = torch.Generator().manual_seed(seed)
    rows, length = 4000, 16
    removed = torch.zeros(length, dtype=torch.bool)
    removed[torch.randperm(length, generator=g)[:12]] = True
    noise = torch.rand(rows, length, generator=g) + removed.float()  # removed patches rank last
    _, mask, ids_restore = random_masking_ids(rows, length, 0.75, noise=noise)
    assert torch.equal(mask.bool(), removed.expand(rows, -1))
    counts = torch.zeros(length).scatter_add_(0, predicted_ids(ids_restore, 4, 0.25).flatten(), torch.ones(rows * 3))
    assert torch.all(counts[~removed] == 0)
    assert torch.all((counts[removed] - rows * 3 / 12).abs() < 6 * 27.4)


def test_num_predicted_rounding_rule():
    assert [num_predicted(48, r) for r in (1.0, 0.5, 0.25, 1 / 3)] == [48, 24, 12, 16]
    assert num_predicted(12, 0.01) == 1  # at least one patch when any is removed
    assert num_predicted(0, 0.5) == 0
    assert num_predicted(10, 0.25) == 2  # round(2.5): half to even, as Python rounds


@given(bad_predict_ratios)
def test_bad_predict_ratio_is_refused(ratio):
    with pytest.raises(ValueError, match="predict_ratio must be in"):
        num_predicted(4, ratio)
