"""``mae-timm visualize``: original | masked | reconstruction | reconstruction + visible, for image files."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from mae_timm.data import GpuAugment, center_crop
from mae_timm.data.decode import IMAGE_MODES, check_size
from mae_timm.engine.checkpoint import load_model
from mae_timm.utils import UserError
from mae_timm.viz import save_reconstruction_grid


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint of an mae_* model (runs/x/last.pt)")
    parser.add_argument("--image", required=True, nargs="+", help="image file(s), one row each")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    parser.add_argument("--out", default=None, help="PNG to write (default: <checkpoint folder>/reconstruction.png)")


def load_images(
    paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float], in_chans: int = 3
) -> torch.Tensor:
    """Image files -> normalised (N, in_chans, size, size): RGB (or grayscale for ``in_chans=1``, as the loader
    decodes), the central square resized (the loader's eval crop)."""
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:  # the header is read, not the pixels: a bomb is refused unpacked
                check_size(image)
                array = center_crop(image.convert(IMAGE_MODES[in_chans]), size, crop_pct=1.0)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # missing, not an image, truncated, a bomb
            raise ValueError(f"cannot read image {path}: {e}") from None
        arrays.append(torch.from_numpy(array.reshape(size, size, -1).copy()))  # (S, S, C)
    uint8 = torch.stack(arrays).permute(0, 3, 1, 2)  # (N, C, S, S)
    return GpuAugment(tuple(mean), tuple(std))(uint8)


def run(args: argparse.Namespace, name: str) -> int:
    model, _ = load_model(args.checkpoint)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    imgs = load_images(args.image, model.patch_embed.img_size[0], mean, std, model.input_channels())
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "reconstruction.png"
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name the PNG file to write (e.g. {out / 'reconstruction.png'})")
    if out.suffix.lower() != ".png":
        out = out.with_name(out.name + ".png")  # what matplotlib would write; say so below
    save_reconstruction_grid(model, imgs, out, mask_ratio=args.mask_ratio, seed=args.seed, mean=mean, std=std)
    print(f"wrote {out}")
    return 0
