"""The masking properties keep their power at the suite's example count: every known-bad mutation of the masking
ops below makes the property named beside it fail (``tests/layers/test_masking.py``, run against the mutant).

A mutant replaces one function of ``mae_timm.layers.masking`` (and the test module's imported name, if any); the
property runs under the current hypothesis profile (``ci``: ``conftest.CI_EXAMPLES`` examples) without shrinking.
"""

from __future__ import annotations

import pytest
import test_masking as properties
import torch
from hypothesis import Phase, settings

import mae_timm.layers.masking as masking

ids_from_noise = masking.ids_from_noise
random_masking_ids = masking.random_masking_ids
gather_tokens = masking.gather_tokens
restore_tokens = masking.restore_tokens
ids_with_exact_count = masking._ids_with_exact_count


def keep_one_more(noise, len_keep):
    """Off by one: one token more kept than ``int(L * (1 - ratio))``."""
    return ids_from_noise(noise, min(len_keep + 1, noise.shape[1]))


def restore_is_the_shuffle(noise, len_keep):
    """``ids_restore`` is the shuffle itself, not its inverse."""
    ids_keep, mask, _ = ids_from_noise(noise, len_keep)
    return ids_keep, mask, torch.argsort(noise, dim=1)


def mask_swapped(noise, len_keep):
    """1 for kept, 0 for removed."""
    ids_keep, mask, ids_restore = ids_from_noise(noise, len_keep)
    return ids_keep, 1 - mask, ids_restore


def mask_left_shuffled(noise, len_keep):
    """The mask in shuffled order: never gathered back to the patches' own order."""
    ids_keep, _, ids_restore = ids_from_noise(noise, len_keep)
    mask = torch.ones(noise.shape, device=noise.device)
    mask[:, :len_keep] = 0
    return ids_keep, mask, ids_restore


def keep_the_largest(noise, len_keep):
    """Descending rank: the largest noise is kept (official checkpoints and HF keep the smallest)."""
    return ids_from_noise(-noise, len_keep)


def first_row_for_all(noise, len_keep):
    """Every sample masked with the first sample's noise."""
    return ids_from_noise(noise[:1].expand_as(noise).contiguous(), len_keep)


def noise_ignored(batch, length, mask_ratio, *, noise=None, generator=None, device=None):
    """The given noise and generator are ignored: a draw of its own."""
    return random_masking_ids(batch, length, mask_ratio, generator=torch.Generator().manual_seed(1234), device=device)


def first_row_indices(x, ids_keep):
    """Tokens gathered with the first sample's indices for every sample."""
    return gather_tokens(x, ids_keep[:1].expand_as(ids_keep))


def gather_along_features(x, ids_keep):
    """The indices applied to the wrong dimension (features instead of tokens) where they fit, else tokens."""
    if x.shape[-1] < x.shape[1] or ids_keep.shape[1] == 0:
        return gather_tokens(x, ids_keep)
    return torch.gather(x, dim=2, index=ids_keep.unsqueeze(1).expand(-1, x.shape[1], -1))[:, : ids_keep.shape[1]]


def mask_tokens_first(x_visible, mask_token, ids_restore):
    """Mask tokens placed before the visible ones in the shuffled order."""
    batch, len_keep, dim = x_visible.shape
    tokens = mask_token.to(x_visible.dtype).expand(batch, ids_restore.shape[1] - len_keep, dim)
    x = torch.cat([tokens, x_visible], dim=1)
    return torch.gather(x, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, dim))


def restore_with_the_shuffle(x_visible, mask_token, ids_restore):
    """Unshuffled with the forward permutation (argsort of ids_restore) instead of ids_restore."""
    return restore_tokens(x_visible, mask_token, torch.argsort(ids_restore, dim=1))


def exact_count_one_short(removed, len_keep, generator):
    """Block and grid masks corrected to one removed patch too few."""
    return ids_with_exact_count(removed, min(len_keep + 1, removed.shape[1]), generator)


# mutant -> (the function it replaces, the property that must catch it, the property's explicit arguments)
MUTANTS = {
    keep_one_more: ("ids_from_noise", "test_random_masking_invariants", {}),
    restore_is_the_shuffle: ("ids_from_noise", "test_random_masking_invariants", {}),
    mask_swapped: ("ids_from_noise", "test_random_masking_invariants", {}),
    mask_left_shuffled: ("ids_from_noise", "test_random_masking_invariants", {}),
    keep_the_largest: ("ids_from_noise", "test_kept_are_the_smallest_noise", {}),
    first_row_for_all: ("ids_from_noise", "test_samples_masked_independently", {}),
    noise_ignored: ("random_masking_ids", "test_kept_are_the_smallest_noise", {}),
    first_row_indices: ("gather_tokens", "test_random_masking_invariants", {}),
    gather_along_features: ("gather_tokens", "test_random_masking_invariants", {}),
    mask_tokens_first: ("restore_tokens", "test_restore_puts_tokens_back", {}),
    restore_with_the_shuffle: ("restore_tokens", "test_restore_puts_tokens_back", {}),
    exact_count_one_short: ("_ids_with_exact_count", "test_block_and_grid_exact_count",
                            dict(strategy=masking.block_masking)),
}


@pytest.fixture
def no_shrinking():
    """The current profile (its example count), without the shrink phase: a mutant fails fast."""
    current = settings.get_current_profile_name()
    settings.register_profile("mutants", parent=settings.get_profile(current), phases=[Phase.explicit,
                              Phase.generate], print_blob=False)
    settings.load_profile("mutants")
    yield
    settings.load_profile(current)


@pytest.mark.parametrize("mutant", list(MUTANTS), ids=lambda m: m.__name__)
def test_every_mutant_is_caught(mutant, no_shrinking, monkeypatch):
    name, property_name, arguments = MUTANTS[mutant]
    check = getattr(properties, property_name)
    monkeypatch.setattr(masking, name, mutant)
    if hasattr(properties, name):
        monkeypatch.setattr(properties, name, mutant)
    with pytest.raises(Exception) as caught:
        check(**arguments)
    failures = getattr(caught.value, "exceptions", (caught.value,))  # hypothesis groups distinct failures
    assert all(isinstance(e, (AssertionError, RuntimeError, IndexError)) for e in failures), caught.value


def fresh(args):
    """``args`` with every generator replaced by a new one of the same seed (both calls draw the same)."""
    return tuple(torch.Generator().manual_seed(1) if isinstance(a, torch.Generator) else a for a in args)


def test_mutants_are_real_mutations():
    """Each mutant changes what its op returns on one fixed input (so a caught mutant is a real bug caught)."""
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 12, 16, generator=g), torch.rand(3, 12, generator=g)
    for mutant, (name, _, _) in MUTANTS.items():
        original = getattr(masking, name)
        if name == "ids_from_noise":
            args = (noise, 4)
        elif name == "random_masking_ids":
            args = (3, 12, 0.5)
        elif name == "gather_tokens":
            args = (x, ids_from_noise(noise, 4)[0])
        elif name == "restore_tokens":
            args = (gather_tokens(x, ids_from_noise(noise, 4)[0]), torch.zeros(1, 1, 16), ids_from_noise(noise, 4)[2])
        else:
            args = (noise < 0.5, 4, torch.Generator().manual_seed(1))
        kwargs = dict(noise=noise) if name == "random_masking_ids" else {}
        expected, got = original(*fresh(args), **kwargs), mutant(*fresh(args), **kwargs)
        expected, got = (expected,) if torch.is_tensor(expected) else expected, (got,) if torch.is_tensor(got) else got
        assert any(e.shape != m.shape or not torch.equal(e, m) for e, m in zip(expected, got)), mutant.__name__
