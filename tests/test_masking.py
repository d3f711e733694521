"""Properties of the masking ops over many drawn batches, lengths, ratios and dtypes."""

import pytest
import torch
from hypothesis import given
from strategies import bad_mask_ratios, patch_grids, seeds, token_batches

from mae_timm import block_masking, gather_tokens, grid_masking, random_masking, random_masking_ids, restore_tokens
from mae_timm.layers import num_kept


def check_triple(ids_keep, mask, ids_restore, length, len_keep):
    """The invariants every masking strategy's (ids_keep, mask, ids_restore) satisfies."""
    batch = mask.shape[0]
    assert ids_keep.shape == (batch, len_keep)
    assert mask.shape == ids_restore.shape == (batch, length)
    assert mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask.sum(1), torch.full((batch,), float(length - len_keep)))
    arange = torch.arange(length).expand(batch, -1)
    assert torch.equal(ids_restore.sort(dim=1).values, arange)  # a permutation
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), arange)  # inverse of the shuffle
    assert torch.equal(ids_shuffle[:, :len_keep], ids_keep)  # kept ones come first in the shuffle
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)  # kept ones are unmasked


@given(token_batches())
def test_random_masking_invariants(case):
    x, ratio, seed = case
    batch, length, dim = x.shape
    len_keep = num_kept(length, ratio)
    g = torch.Generator().manual_seed(seed)
    x_visible, mask, ids_restore = random_masking(x, ratio, generator=g)
    ids_keep = torch.argsort(ids_restore, dim=1)[:, :len_keep]
    check_triple(ids_keep, mask, ids_restore, length, len_keep)
    assert x_visible.dtype == x.dtype and x_visible.shape == (batch, len_keep, dim)
    for b in range(batch):  # rows of x at the kept indices, exactly
        assert torch.equal(x_visible[b], x[b, ids_keep[b]])


@given(token_batches())
def test_restore_puts_tokens_back(case):
    x, ratio, seed = case
    g = torch.Generator().manual_seed(seed)
    x_visible, mask, ids_restore = random_masking(x, ratio, generator=g)
    mask_token = torch.full((1, 1, x.shape[-1]), 7.0)
    restored = restore_tokens(x_visible, mask_token, ids_restore)
    assert restored.shape == x.shape and restored.dtype == x.dtype
    removed = mask.bool()
    assert torch.equal(restored[~removed], x[~removed])  # every visible token at its own index
    assert torch.all(restored[removed] == 7.0)  # mask tokens exactly where mask == 1


@given(token_batches())
def test_same_noise_or_seed_same_result(case):
    x, ratio, seed = case
    a = random_masking(x, ratio, generator=torch.Generator().manual_seed(seed))
    b = random_masking(x, ratio, generator=torch.Generator().manual_seed(seed))
    noise = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(seed))
    c = random_masking(x, ratio, noise=noise)
    d = random_masking(x, ratio, noise=noise.clone())
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    for u, v, w in zip(c, d, a):
        assert torch.equal(u, v)
        assert torch.equal(u, w)  # the generator draws exactly torch.rand(N, L)


@given(token_batches())
def test_samples_masked_independently(case):
    """Each sample's result depends on its own noise row only."""
    x, ratio, seed = case
    noise = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(seed))
    x_visible, mask, ids_restore = random_masking(x, ratio, noise=noise)
    for b in range(x.shape[0]):
        vb, mb, rb = random_masking(x[b : b + 1], ratio, noise=noise[b : b + 1])
        assert torch.equal(vb[0], x_visible[b]) and torch.equal(mb[0], mask[b]) and torch.equal(rb[0], ids_restore[b])


@given(token_batches())
def test_ratio_zero_is_identity(case):
    x, _, seed = case
    x_visible, mask, ids_restore = random_masking(x, 0.0, generator=torch.Generator().manual_seed(seed))
    assert torch.all(mask == 0)
    assert torch.equal(restore_tokens(x_visible, torch.zeros(1, 1, x.shape[-1]), ids_restore), x)


@given(token_batches())
def test_index_form_drives_gathering(case):
    x, ratio, seed = case
    batch, length, _ = x.shape
    ids_keep, mask, ids_restore = random_masking_ids(
        batch, length, ratio, generator=torch.Generator().manual_seed(seed)
    )
    x_visible, mask2, ids_restore2 = random_masking(x, ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(gather_tokens(x, ids_keep), x_visible)
    assert torch.equal(mask, mask2) and torch.equal(ids_restore, ids_restore2)


@given(bad_mask_ratios)
def test_bad_ratio_is_value_error(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking_ids(2, 16, ratio)


@pytest.mark.parametrize("strategy", [block_masking, grid_masking])
@given(case=patch_grids())
def test_block_and_grid_exact_count(strategy, case):
    batch, grid, ratio, seed = case
    length = grid[0] * grid[1]
    ids_keep, mask, ids_restore = strategy(batch, grid, ratio, generator=torch.Generator().manual_seed(seed))
    check_triple(ids_keep, mask, ids_restore, length, num_kept(length, ratio))
    again = strategy(batch, grid, ratio, generator=torch.Generator().manual_seed(seed))
    assert all(torch.equal(u, v) for u, v in zip((ids_keep, mask, ids_restore), again))


@given(seeds)
def test_grid_masking_keeps_one_in_four(seed):
    """At ratio 0.75 on an even grid, exactly one patch of every 2x2 cell stays, at the same offset everywhere."""
    _, mask, _ = grid_masking(3, (8, 6), 0.75, generator=torch.Generator().manual_seed(seed))
    kept = (mask == 0).view(3, 4, 2, 3, 2)  # (N, cells_h, dy, cells_w, dx)
    assert torch.all(kept.sum(dim=(2, 4)) == 1)
    offsets = kept.permute(0, 1, 3, 2, 4).reshape(3, 12, 4).float().argmax(-1)  # (N, cells)
    assert torch.all(offsets == offsets[:, :1])


def test_block_masking_makes_contiguous_blocks():
    """Blocks, not scattered patches: removed patches mostly have a removed 4-neighbour."""
    _, mask, _ = block_masking(16, (14, 14), 0.5, generator=torch.Generator().manual_seed(0))
    removed = mask.view(16, 14, 14).bool()
    padded = torch.nn.functional.pad(removed.float(), (1, 1, 1, 1)).bool()
    neighbour = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    share = (removed & neighbour).sum() / removed.sum()
    assert share > 0.9


def test_cpu_generator_masks_tokens_on_the_device(device):
    """The noise is drawn where the generator lives and moved to the tokens' device."""
    x = torch.randn(3, 10, 4, device=device)
    x_visible, mask, ids_restore = random_masking(x, 0.5, generator=torch.Generator().manual_seed(1))
    assert x_visible.device == mask.device == ids_restore.device == x.device
    expected = random_masking(x.cpu(), 0.5, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a.cpu(), b) for a, b in zip((x_visible, mask, ids_restore), expected))
