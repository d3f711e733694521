"""The one image transform of the loader: decode a tar sample, resize its central square; three decoders.

Every random augmentation (RandomResizedCrop + flip) happens on the device in :class:`mae_timm.data.GpuAugment`;
the loader only turns encoded bytes into fixed-size uint8 arrays, so it ships one byte per pixel.

Decoders (``create_loader(decode=...)``):

- ``pil``: PIL in the workers, for every format.
- ``torchvision`` (default): ``torchvision.io.decode_jpeg`` in the workers for JPEG samples (about half PIL's CPU
  time), PIL for the rest. Both use libjpeg-turbo with the same IDCT, so the pixels equal PIL's (tested); an image
  that needs resizing goes through the same PIL bicubic resize.
- ``device``: the workers ship the JPEG bytes (:class:`EncodedBatch`), and the main process decodes each batch at
  once on the training device (``decode_jpeg(list, device="cuda")``, nvJPEG). On the CPU that is libjpeg-turbo, the
  same pixels as PIL; nvJPEG's IDCT may differ from libjpeg-turbo's by a level or two. Images not already at
  ``img_size`` are resized on the device with PIL's bicubic weights (two matrix products): photos come out
  within one level of PIL's resize.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

__all__ = [
    "DECODERS",
    "DECODE_ERRORS",
    "IMAGE_FIELDS",
    "JPEG_FIELDS",
    "IMAGE_MODES",
    "EncodedBatch",
    "center_crop",
    "center_crop_box",
    "decode_batch",
    "decode_resized",
    "decode_sample",
    "encode_batch",
    "sample_image",
]

# torchvision >= 0.29 warns on every call that its image codecs will move to torchcodec (not a dependency here)
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
JPEG_FIELDS = ("jpg", "jpeg")
DECODERS = ("pil", "torchvision", "device")
IMAGE_MODES = {1: "L", 3: "RGB"}  # a model's in_chans -> the PIL mode its images are decoded to (timm's rule)
# what a broken image raises: PIL (truncated data, bad header, missing field, absurd size), torchvision (RuntimeError)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, KeyError, RuntimeError, Image.DecompressionBombError)


MAX_PIXELS = 1 << 25  # largest image decoded (33.5 M pixels, 5792 x 5792); its header is read first


def check_size(image: Image.Image) -> None:
    """ValueError when an opened image's header claims more than ``MAX_PIXELS`` pixels (PIL has read only the
    header): a 16x16 JPEG whose header says 8000x8000 (a decompression bomb) is never decoded."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"the image header claims {width}x{height} pixels, more than the {MAX_PIXELS} allowed "
                         "(a decompression bomb?)")


def check_pixels(data: bytes) -> None:
    """:func:`check_size` of encoded bytes, before decoding (the loader counts the ValueError as undecodable)."""
    with Image.open(io.BytesIO(data)) as image:
        check_size(image)


def sample_image(sample: dict) -> tuple[str, bytes]:
    """The (field, encoded bytes) of a tar sample's image: the first of :data:`IMAGE_FIELDS` it holds."""
    field = next((k for k in IMAGE_FIELDS if k in sample), None)
    if field is None:
        raise KeyError(f"no image field ({'/'.join(IMAGE_FIELDS)}) in sample")
    return field, sample[field]


def _label(sample: dict) -> int:
    return int(sample["cls"]) if "cls" in sample else -1


def decode_sample(sample: dict, mode: str = "RGB") -> tuple[Image.Image, int]:
    """A tar sample as an image in PIL ``mode`` ('RGB', or 'L' for 1-channel models; other modes are converted)
    and its class (-1: unlabeled)."""
    _, data = sample_image(sample)
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode != mode:
        image = image.convert(mode)
    return image, _label(sample)


def center_crop_box(width: int, height: int, crop_pct: float) -> tuple[float, float, float, float]:
    """The central square ``(left, top, right, bottom)`` that resize-shorter-side-to-``size / crop_pct`` followed
    by center-crop-to-``size`` keeps, in input pixels."""
    side = min(width, height) * crop_pct
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def center_crop(image: Image.Image, img_size: int, crop_pct: float) -> np.ndarray:
    """Resize the shorter side to ``img_size / crop_pct`` and take the central square (bicubic):
    RGB image -> (img_size, img_size, 3) uint8. An image already at that size is returned as it is."""
    box = center_crop_box(image.width, image.height, crop_pct)
    if image.size == (img_size, img_size) and box == (0, 0, img_size, img_size):
        return np.asarray(image)
    return np.asarray(image.resize((img_size, img_size), Image.BICUBIC, box=box))


def decode_resized(
    sample: dict, img_size: int, crop_pct: float, decoder: str = "torchvision", mode: str = "RGB"
) -> tuple[np.ndarray, int]:
    """A tar sample -> ((img_size, img_size, 3) uint8 central square, or (img_size, img_size) for mode 'L', class):
    :func:`center_crop` of the image that ``decoder`` (``pil`` or ``torchvision``; see the module docstring)
    decodes. Grayscale ('L') takes decode_jpeg's path only for grayscale JPEGs, whose pixels equal PIL's; a colour
    JPEG is converted by PIL, as timm converts it."""
    field, data = sample_image(sample)
    check_pixels(data)
    pixels = None
    if decoder == "torchvision" and field in JPEG_FIELDS:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy: frombuffer shares memory
        read_mode = ImageReadMode.RGB if mode == "RGB" else ImageReadMode.UNCHANGED
        decoded = decode_jpeg(encoded, mode=read_mode)  # (C, H, W)
        if len(mode) == decoded.shape[0]:
            pixels = decoded.permute(1, 2, 0).squeeze(-1).numpy()  # (H, W, 3) or (H, W)
    if pixels is None:
        image, label = decode_sample(sample, mode)
        return center_crop(image, img_size, crop_pct), label
    height, width = pixels.shape[:2]
    if (width, height) == (img_size, img_size) and center_crop_box(width, height, crop_pct) == (0, 0, width, height):
        return pixels, _label(sample)  # already the central square at img_size, as center_crop would return it
    return center_crop(Image.fromarray(pixels), img_size, crop_pct), _label(sample)


class EncodedBatch(NamedTuple):
    """A batch of JPEGs as the workers ship it under ``decode='device'``: one buffer, not one tensor per image
    (each tensor crossing from a worker costs a shared-memory segment)."""

    data: torch.Tensor  # (total_bytes,) uint8: the JPEG files one after another
    offsets: torch.Tensor  # (N + 1,) int64: image i is data[offsets[i]:offsets[i + 1]]
    keys: list[str]  # sample keys, to name an image that does not decode

    def files(self) -> list[torch.Tensor]:
        """The N encoded images as 1-d uint8 views of ``data``."""
        bounds = self.offsets.tolist()
        return [self.data[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def encode_batch(files: list[bytes], keys: list[str]) -> EncodedBatch:
    """Concatenate encoded images into an :class:`EncodedBatch`."""
    offsets = torch.tensor(np.cumsum([0, *map(len, files)]), dtype=torch.int64)
    data = torch.tensor(np.frombuffer(b"".join(files), dtype=np.uint8))  # one copy, writable
    return EncodedBatch(data, offsets, list(keys))


def bicubic_weights(in_size: int, out_size: int, start: float, end: float, device=None) -> torch.Tensor:
    """(out_size, in_size) float64 weights of PIL's bicubic resample (a = -0.5, antialiased when shrinking) of the
    input span ``[start, end)``, fractional ends included: row i holds the filter taps of output pixel i."""
    scale = (end - start) / out_size
    filter_scale = max(scale, 1.0)
    centers = start + (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale  # (out,)
    inputs = torch.arange(in_size, device=device, dtype=torch.float64) + 0.5  # (in,)
    x = ((inputs[None, :] - centers[:, None]) / filter_scale).abs()  # (out, in)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    weights = torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))
    return weights / weights.sum(1, keepdim=True)


def resize_center(image: torch.Tensor, img_size: int, crop_pct: float) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, img_size, img_size) uint8 on the image's device: the central square of
    :func:`center_crop_box` resized with PIL's bicubic weights in two passes, each rounded and clipped to uint8 as
    PIL does. Pillow picks the order of the passes by their cost; here the vertical pass goes first for portrait
    images, which is its choice in most cases. Photos come out within one level of :func:`center_crop` (tested);
    where the orders differ, pixels next to a clipped overshoot can differ more."""
    height, width = image.shape[-2:]
    left, top, right, bottom = center_crop_box(width, height, crop_pct)
    if (width, height) == (img_size, img_size) and (left, top) == (0, 0):
        return image
    cols = bicubic_weights(width, img_size, left, right, image.device)  # (S, W)
    rows = bicubic_weights(height, img_size, top, bottom, image.device)  # (S, H)
    x = image.double()  # float64: TF32 matmuls (allowed on many GPU setups) would round a level off
    if height > width:
        x = (rows @ x).round_().clamp_(0, 255)  # (3, S, W)
        return (x @ cols.T).round_().clamp_(0, 255).to(torch.uint8)  # (3, S, S)
    x = (x @ cols.T).round_().clamp_(0, 255)  # (3, H, S)
    return (rows @ x).round_().clamp_(0, 255).to(torch.uint8)  # (3, S, S)


def decode_batch(
    batch: EncodedBatch, img_size: int, crop_pct: float, device: torch.device | str, mode: str = "RGB"
) -> tuple:
    """Decode an :class:`EncodedBatch` on ``device`` -> ((M, 3, img_size, img_size) uint8, indices of the M images
    that decoded, {key: error} of those that did not). One batched ``decode_jpeg`` call; only when it fails is
    each image decoded alone, to find the broken ones."""
    files = batch.files()
    read_mode = ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY
    try:
        for data in files:
            check_pixels(data.numpy().tobytes())
        images = decode_jpeg(files, mode=read_mode, device=device)
        kept, failed = list(range(len(files))), {}
    except DECODE_ERRORS:
        images, kept, failed = [], [], {}
        for index, (data, key) in enumerate(zip(files, batch.keys)):
            try:
                check_pixels(data.numpy().tobytes())
                images.append(decode_jpeg(data, mode=read_mode, device=device))
                kept.append(index)
            except DECODE_ERRORS as exn:
                failed[key] = exn
    if not images:
        return torch.empty(0, len(mode), img_size, img_size, dtype=torch.uint8, device=device), kept, failed
    return torch.stack([resize_center(image, img_size, crop_pct) for image in images]), kept, failed
