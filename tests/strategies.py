"""Hypothesis strategies for the tensor ops: shapes stay small so hundreds of examples run in seconds."""

import torch
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

dtypes = st.sampled_from(DTYPES)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
mask_ratios = st.floats(min_value=0.0, max_value=0.99, allow_nan=False, exclude_max=False)
bad_mask_ratios = st.one_of(
    st.floats(max_value=0.0, exclude_max=True, allow_nan=False),
    st.floats(min_value=1.0, allow_nan=False),
)


@st.composite
def token_batches(draw, max_batch=6, max_length=64, max_dim=8):
    """(x (N, L, D) of a drawn dtype, mask_ratio, seed)."""
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(1, max_length))
    dim = draw(st.integers(1, max_dim))
    dtype = draw(dtypes)
    seed = draw(seeds)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, dim, generator=g).to(dtype)
    return x, draw(mask_ratios), seed


@st.composite
def patch_grids(draw, max_batch=4, max_grid=8):
    """(batch, (gh, gw), mask_ratio, seed) for block / grid masking."""
    gh = draw(st.integers(1, max_grid))
    gw = draw(st.integers(1, max_grid))
    return draw(st.integers(1, max_batch)), (gh, gw), draw(mask_ratios), draw(seeds)


@st.composite
def images_and_patches(draw, max_batch=3, max_chans=4, max_patch=5, max_grid=5):
    """(imgs (N, C, H, W) of a drawn dtype, (ph, pw)); H, W are multiples of the patch size, not always square."""
    ph = draw(st.integers(1, max_patch))
    pw = draw(st.integers(1, max_patch))
    gh = draw(st.integers(1, max_grid))
    gw = draw(st.integers(1, max_grid))
    n = draw(st.integers(1, max_batch))
    c = draw(st.integers(1, max_chans))
    g = torch.Generator().manual_seed(draw(seeds))
    imgs = torch.randn(n, c, gh * ph, gw * pw, generator=g).to(draw(dtypes))
    return imgs, (ph, pw)

predict_ratios = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False)
bad_predict_ratios = st.one_of(
    st.floats(max_value=0.0, allow_nan=False),
    st.floats(min_value=1.0, exclude_min=True, allow_nan=False),
)


@st.composite
def noise_batches(draw, max_batch=6, max_length=64):
    """(noise (N, L) in [0, 1), mask_ratio, predict_ratio) for the predicted-subset op."""
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(1, max_length))
    noise = torch.rand(batch, length, generator=torch.Generator().manual_seed(draw(seeds)))
    return noise, draw(mask_ratios), draw(predict_ratios)
