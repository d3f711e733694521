"""patchify / unpatchify: exact inverses with the official element layout; sin-cos table resampling."""

import pytest
import torch
from hypothesis import given
from strategies import images_and_patches

from mae_timm import get_2d_sincos_pos_embed, patchify, resample_pos_embed, unpatchify


@given(images_and_patches())
def test_round_trip(case):
    imgs, patch = case
    x = patchify(imgs, patch)
    n, c, h, w = imgs.shape
    assert x.shape == (n, (h // patch[0]) * (w // patch[1]), patch[0] * patch[1] * c)
    assert torch.equal(unpatchify(x, patch, (h, w)), imgs)


@given(images_and_patches())
def test_official_layout(case):
    """Element (n, c, i*p+u, j*q+v) of the image is element (n, i*w+j, (u*q+v)*C+c) of the sequence (nhwpqc)."""
    imgs, (ph, pw) = case
    n, c, height, width = imgs.shape
    x = patchify(imgs, (ph, pw))
    gw = width // pw
    i, j, u, v, ch = (torch.randint(0, m, (1,)).item() for m in (height // ph, gw, ph, pw, c))
    assert x[:, i * gw + j, (u * pw + v) * c + ch].equal(imgs[:, ch, i * ph + u, j * pw + v])


def test_bad_sizes_are_value_errors():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 10, 12), 4)
    with pytest.raises(ValueError, match="cannot unpatchify"):
        unpatchify(torch.zeros(1, 6, 48), 4, (8, 8))


def test_resample_keeps_cls_row_and_is_2d():
    table = get_2d_sincos_pos_embed(32, (4, 4), cls_token=True)[None]  # (1, 17, 32)
    same = resample_pos_embed(table, (4, 4))
    assert torch.allclose(same, table, atol=1e-6)
    bigger = resample_pos_embed(table, (8, 6))
    assert bigger.shape == (1, 1 + 48, 32)
    assert torch.equal(bigger[:, 0], table[:, 0])
    # a 2-D resampling of a table that varies along columns only stays constant along rows
    cols_only = table.clone()
    cols_only[:, 1:, 16:] = 0
    out = resample_pos_embed(cols_only, (8, 6))[0, 1:].view(8, 6, 32)
    assert torch.allclose(out[:, :, :16], out[:1, :, :16].expand(8, -1, -1), atol=1e-5)
