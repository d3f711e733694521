"""The one image transform the loader's workers apply: decode a tar sample, resize its central square.

Every random augmentation (RandomResizedCrop + flip) happens on the device in :class:`mae_timm.data.GpuAugment`;
the workers only turn encoded bytes into fixed-size uint8 arrays, so they ship one byte per pixel.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["DECODE_ERRORS", "IMAGE_FIELDS", "IMAGE_MODES", "center_crop", "center_crop_box", "decode_sample"]

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
IMAGE_MODES = {1: "L", 3: "RGB"}  # a model's in_chans -> the PIL mode its images are decoded to (timm's rule)
# what a broken image raises in PIL (truncated data, bad header, missing field, absurd size)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, KeyError, Image.DecompressionBombError)


def decode_sample(sample: dict, mode: str = "RGB") -> tuple[Image.Image, int]:
    """A tar sample as an image in PIL ``mode`` ('RGB', or 'L' for 1-channel models; other modes are converted)
    and its class (-1: unlabeled)."""
    data = next((sample[k] for k in IMAGE_FIELDS if k in sample), None)
    if data is None:
        raise KeyError(f"no image field ({'/'.join(IMAGE_FIELDS)}) in sample")
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode != mode:
        image = image.convert(mode)
    return image, int(sample["cls"]) if "cls" in sample else -1


def center_crop_box(width: int, height: int, crop_pct: float) -> tuple[float, float, float, float]:
    """The central square ``(left, top, right, bottom)`` that resize-shorter-side-to-``size / crop_pct`` followed
    by center-crop-to-``size`` keeps, in input pixels."""
    side = min(width, height) * crop_pct
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def center_crop(image: Image.Image, img_size: int, crop_pct: float) -> np.ndarray:
    """Resize the shorter side to ``img_size / crop_pct`` and take the central square (bicubic):
    RGB image -> (img_size, img_size, 3) uint8, 'L' image -> (img_size, img_size) uint8. An image already at that
    size is returned as it is."""
    box = center_crop_box(image.width, image.height, crop_pct)
    if image.size == (img_size, img_size) and box == (0, 0, img_size, img_size):
        return np.asarray(image)
    return np.asarray(image.resize((img_size, img_size), Image.BICUBIC, box=box))
