"""Device-side augmentation: normalisation, random resized crop + flip on uint8 batches."""

import pytest
import torch
from conftest import TOLERANCES
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mae_timm.data import GpuAugment, random_resized_crop_boxes


def images(device, n=4, size=16):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(
        device
    )


def test_normalise_matches_definition(device):
    x = images(device)
    out = GpuAugment().to(device)(x)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std, **TOLERANCES[torch.float32])


def test_full_crop_without_flip_is_identity(device):
    x = images(device)
    aug = GpuAugment(mean=(0, 0, 0), std=(1 / 255,) * 3, random_crop=True, scale=(1, 1), ratio=(1, 1), hflip=0)
    torch.testing.assert_close(aug.to(device)(x), x.float(), atol=1e-3, rtol=0)


def test_full_crop_with_flip_mirrors(device):
    x = images(device)
    aug = GpuAugment(mean=(0, 0, 0), std=(1 / 255,) * 3, random_crop=True, scale=(1, 1), ratio=(1, 1), hflip=1)
    torch.testing.assert_close(aug.to(device)(x), x.float().flip(-1), atol=1e-3, rtol=0)


def test_crop_resizes_and_is_reproducible(device):
    x = images(device, size=32)
    aug = GpuAugment(img_size=24, random_crop=True).to(device)
    first = aug(x, generator=torch.Generator(device).manual_seed(3))
    assert first.shape == (4, 3, 24, 24)
    torch.testing.assert_close(first, aug(x, generator=torch.Generator(device).manual_seed(3)))
    assert not torch.equal(first, aug(x, generator=torch.Generator(device).manual_seed(4)))


@pytest.mark.parametrize("height,width", [(64, 64), (20, 90), (90, 20)])
def test_boxes_inside_image_and_in_scale(height, width):
    boxes = random_resized_crop_boxes(2000, height, width, generator=torch.Generator().manual_seed(0))
    left, top, crop_w, crop_h = boxes.unbind(1)
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + crop_w <= width + 1e-4).all() and (top + crop_h <= height + 1e-4).all()
    area = crop_w * crop_h / (height * width)
    assert area.max() <= 1 + 1e-5 and area.min() >= 0.2 - 1e-5


def test_loader_batches_feed_the_device_crop(tmp_path, device):
    from fakes import make_shards

    from mae_timm.data import create_loader

    loader = create_loader(make_shards(tmp_path), "train", 8, train=True, img_size=32, num_workers=0)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
    out = GpuAugment(img_size=24, random_crop=True).to(device)(images.to(device))
    assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32
