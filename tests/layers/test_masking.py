"""Properties of the masking ops over many drawn batches, lengths, ratios and dtypes; the vectorised block and
grid masks against the per-sample loops they replaced (kept as the reference in ``masking_reference.py``)."""


import pytest
import torch
from hypothesis import given
from masking_reference import (
    reference_block_masking,
    reference_grid_masking,
    reference_sample_blocks,
)
from strategies import bad_mask_ratios, patch_grids, seeds, token_batches

from mae_timm import block_masking, gather_tokens, grid_masking, random_masking, random_masking_ids, restore_tokens
from mae_timm.layers import num_kept
from mae_timm.layers.masking import _BLOCK_ATTEMPTS, _ids_with_exact_count, _sample_blocks


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
def test_kept_are_the_smallest_noise(case):
    """Ascend: every kept patch has smaller noise than every removed one (so the official code's masks reproduce)."""
    x, ratio, seed = case
    batch, length, _ = x.shape
    noise = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed))
    ids_keep, mask, _ = random_masking_ids(batch, length, ratio, noise=noise)
    largest_kept = torch.gather(noise, 1, ids_keep).amax(1, keepdim=True) if ids_keep.shape[1] else -1.0
    assert torch.all(noise[mask.bool()].view(batch, -1) > largest_kept)


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


# --- the vectorised block and grid masks against the old per-sample loops ---


def block_uniforms(batch, grid, ratio, seed):
    """(num_removed, N, attempts, 4) uniforms: enough for every round any sample can need."""
    num_removed = grid[0] * grid[1] - num_kept(grid[0] * grid[1], ratio)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_removed, batch, _BLOCK_ATTEMPTS, 4, generator=g), num_removed


def vectorised_blocks(uniforms, batch, grid, num_removed):
    rounds = iter(uniforms.unbind(0))
    return _sample_blocks(lambda: next(rounds), batch, grid, num_removed, 4, (0.3, 1 / 0.3), uniforms.device)


@given(patch_grids())
def test_blocks_follow_the_reference_rule_exactly(case):
    """Fed the same uniforms, the batched rounds place exactly the rectangles the old per-sample loop placed."""
    batch, grid, ratio, seed = case
    uniforms, num_removed = block_uniforms(batch, grid, ratio, seed)
    removed = vectorised_blocks(uniforms, batch, grid, num_removed)
    for n in range(batch):
        expected = reference_sample_blocks(grid, num_removed, lambda r, a, n=n: uniforms[r, n, a])
        assert torch.equal(removed[n], expected)
    assert torch.all(removed.sum(1) <= num_removed)  # blocks never overshoot; singles complete the count


def test_compiled_blocks_equal_eager():
    """The compiled graph runs every round (eager CPU stops early): same uniforms, same blocks."""
    batch, grid, ratio = 16, (4, 5), 0.75
    uniforms, num_removed = block_uniforms(batch, grid, ratio, seed=3)
    compiled = torch.compile(vectorised_blocks, backend="eager", fullgraph=True, dynamic=False)
    assert torch.equal(
        compiled(uniforms, batch, grid, num_removed), vectorised_blocks(uniforms, batch, grid, num_removed)
    )


@pytest.mark.parametrize("strategy", [block_masking, grid_masking])
@given(case=patch_grids())
def test_count_per_row_matches_reference(strategy, case):
    batch, grid, ratio, seed = case
    reference = {block_masking: reference_block_masking, grid_masking: reference_grid_masking}[strategy]
    _, old_mask, _ = reference(batch, grid, ratio, generator=torch.Generator().manual_seed(seed))
    _, mask, _ = strategy(batch, grid, ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(mask.sum(1), old_mask.sum(1))


@given(patch_grids())
def test_grid_masking_keeps_a_lattice(case):
    """The kept patches lie on one ``s x s`` lattice offset when it holds enough of them, else contain it."""
    batch, (gh, gw), ratio, seed = case
    _, mask, _ = grid_masking(batch, (gh, gw), ratio, generator=torch.Generator().manual_seed(seed))
    kept = (mask == 0).view(batch, gh, gw)
    cell = max(1, round((1.0 / (1.0 - ratio)) ** 0.5))
    rows, cols = torch.arange(gh).view(gh, 1), torch.arange(gw).view(1, gw)
    lattices = [(rows % cell == dy) & (cols % cell == dx) for dy in range(cell) for dx in range(cell)]
    for sample in kept:
        fits = [
            bool(torch.all(lattice[sample])) if lattice.sum() >= sample.sum() else bool(torch.all(sample[lattice]))
            for lattice in lattices
        ]
        assert any(fits)


@given(patch_grids())
def test_exact_count_flips_only_the_surplus_side(case):
    """A proposal with too many removed loses some (never gains); one with too few gains some (never loses)."""
    batch, (gh, gw), ratio, seed = case
    length = gh * gw
    len_keep = num_kept(length, ratio)
    g = torch.Generator().manual_seed(seed)
    proposal = torch.rand(batch, length, generator=g) < torch.rand(batch, 1, generator=g)
    ids_keep, mask, ids_restore = _ids_with_exact_count(proposal, len_keep, g)
    check_triple(ids_keep, mask, ids_restore, length, len_keep)
    removed = mask.bool()
    too_many = proposal.sum(1, keepdim=True) >= length - len_keep
    assert torch.all(torch.where(too_many, ~removed | proposal, removed | ~proposal))


def marginal_z(old_masks, new_masks):
    """Largest two-sample z score over positions of the removal frequency (N, L) masks."""
    p_old, p_new = old_masks.mean(0), new_masks.mean(0)
    pooled = (p_old + p_new) / 2
    se = (pooled * (1 - pooled) * (1 / len(old_masks) + 1 / len(new_masks))).sqrt().clamp_min(1e-6)
    return ((p_old - p_new).abs() / se).max().item()


def removed_neighbour_pairs(mask, grid):
    removed = mask.view(-1, *grid)
    return (removed[:, 1:] * removed[:, :-1]).sum((1, 2)) + (removed[:, :, 1:] * removed[:, :, :-1]).sum((1, 2))


@pytest.mark.parametrize(
    "strategy, grid, ratio",
    [
        (block_masking, (8, 8), 0.75),
        (block_masking, (5, 7), 0.4),
        (grid_masking, (7, 7), 0.75),
        (grid_masking, (6, 5), 0.6),
    ],
)
def test_same_distribution_as_reference(strategy, grid, ratio):
    """Per-position removal frequency and the mean count of removed neighbour pairs (how blocky a mask is) agree
    with the old loop within 4.5 standard errors (fixed seeds, 2,000 masks per side: deterministic)."""
    reference = {block_masking: reference_block_masking, grid_masking: reference_grid_masking}[strategy]
    _, old, _ = reference(2000, grid, ratio, generator=torch.Generator().manual_seed(0))
    _, new, _ = strategy(2000, grid, ratio, generator=torch.Generator().manual_seed(1))
    assert marginal_z(old, new) < 4.5
    pairs_old, pairs_new = removed_neighbour_pairs(old, grid), removed_neighbour_pairs(new, grid)
    se = ((pairs_old.var() + pairs_new.var()) / 2000).sqrt()
    assert (pairs_old.mean() - pairs_new.mean()).abs() < 4.5 * se


def test_masks_compile_without_graph_breaks():
    def masked_sum(x):
        total = x.new_zeros(())
        for strategy in (block_masking, grid_masking):
            ids_keep, mask, ids_restore = strategy(x.shape[0], (3, 3), 0.75, device=x.device)
            total = total + gather_tokens(x, ids_keep).sum() + mask.sum() + ids_restore.sum()
        ids_keep, mask, _ = random_masking_ids(x.shape[0], 9, 0.75, device=x.device)
        return total + gather_tokens(x, ids_keep).sum() + mask.sum()

    x = torch.randn(4, 9, 2)
    assert torch._dynamo.explain(masked_sum)(x).graph_break_count == 0
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(masked_sum, backend=counter, fullgraph=True, dynamic=False)
    compiled(x), compiled(x), compiled(x)  # new draws each call: no recompiles
    assert counter.frame_count == 1


@pytest.mark.parametrize("strategy", [block_masking, grid_masking])
def test_masks_drawn_on_the_device(strategy, device):
    """A device generator draws there; a CPU generator draws on the CPU and the result moves (as random masking)."""
    on_device = strategy(3, (4, 5), 0.5, generator=torch.Generator(device).manual_seed(0), device=device)
    check_triple(*(t.cpu() for t in on_device), 20, 10)
    assert all(t.device.type == torch.device(device).type for t in on_device)
    moved = strategy(3, (4, 5), 0.5, generator=torch.Generator().manual_seed(0), device=device)
    on_cpu = strategy(3, (4, 5), 0.5, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(moved, on_cpu))
