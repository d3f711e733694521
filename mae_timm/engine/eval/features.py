"""Frozen features: ONE extractor for the CLI (``mae-timm knn / linprobe``) and for ``mae-timm compare``.

:func:`extract_features` reads a pretext model's encoder through the contract (``mae_timm.create_timm_encoder``
turns it into a timm ``VisionTransformer``; its ``pretrained_cfg`` gives the mean / std) or, with ``model=None``,
the raw pixels (the normalised input image as the feature vector: the raw-pixel baseline). One pass gives every
requested variant, a (pooling, final norm) pair, for each of the last ``blocks`` blocks:

- ``avg``: the mean of the patch tokens; ``token``: the class token (where the encoder has one); ``flat``: the
  patch tokens one after another in grid order (patches x width values: the spatial layout kept, as raw pixels
  keep it);
- final norm: the block's tokens through the encoder's final LayerNorm (as the last block's are in pretraining),
  or not.

Features are extracted batch by batch and stored in float16 (:data:`FEATURE_DTYPE`): ``flat`` features of a large
split are big, and float16's 11-bit mantissa is well below the spread of a kNN similarity or a probe's input. The
protocols compute in float32 on each chunk they read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import mae_timm
from mae_timm.data import GpuAugment
from mae_timm.utils import UserError, inference_autocast

__all__ = ["FEATURE_DTYPE", "PIXELS", "POOLS", "Variant", "extract_features", "frozen_features", "labelled",
           "normalizer", "predict", "progress", "select_blocks"]

POOLS = ("avg", "token", "flat")  # mean of the patch tokens, the class token, the patch tokens in grid order
FEATURE_DTYPE = torch.float16  # how extracted features are stored (memory); protocols compute in float32
Variant = tuple[str, bool]  # (pooling, through the final norm)
PIXELS: Variant = ("pixels", False)  # the raw-pixel variant (model=None)


def normalizer(model: nn.Module, device: torch.device, **augment) -> GpuAugment:
    """uint8 -> float normalised with the pretext model's mean/std (its ``pretrained_cfg``), on ``device``.

    ``augment``: :class:`GpuAugment` options, e.g. ``random_crop=True, img_size=..., scale=...`` for training.
    """
    cfg = model.pretrained_cfg
    return GpuAugment(tuple(cfg["mean"]), tuple(cfg["std"]), **augment).to(device)


def progress(iterable: Iterable, desc: str):
    """A tqdm bar over ``iterable`` on a terminal (none when the output is a file or a pipe)."""
    total = len(iterable) if isinstance(iterable, Sized) else None
    return tqdm(iterable, desc=desc, total=total, unit="batch", leave=False, disable=None)


def labelled(loader: Iterable, split: str) -> Iterator:
    """``loader``'s (images, labels) batches; a clear error at the first unlabelled sample (class -1)."""
    for imgs, targets in loader:
        if (targets < 0).any():
            raise UserError(f"the {split} data holds unlabelled samples (class -1); evaluation needs labelled splits")
        yield imgs, targets


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, normalize: nn.Module, device: torch.device,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` over every batch: loader of (uint8 (N, C, H, W), labels (N,)) -> (outputs (M, D) in ``dtype``, labels).

    Runs under the evaluation autocast (bf16 on CUDA and on CPUs with bf16 units, attention in fp32 there; fp32 on
    other CPUs); each batch's outputs are cast to ``dtype``
    and moved to the CPU before the next batch runs, so the peak is one batch of activations plus the outputs.
    """
    outputs, labels = [], []
    for imgs, targets in loader:
        x = normalize(imgs.to(device, non_blocking=True))
        with inference_autocast(device):
            outputs.append(fn(x).to(dtype).cpu())
        labels.append(targets.cpu())
    if not outputs:
        raise UserError("the split holds no images")
    return torch.cat(outputs), torch.cat(labels)


def _check(encoder: nn.Module, variants: list[Variant], blocks: int) -> None:
    for pool, _ in variants:
        if pool not in POOLS:
            raise UserError(f"pooling must be one of {', '.join(POOLS)}, got {pool!r}")
        if pool == "token" and not encoder.has_class_token:
            raise UserError("this encoder has no class token; use the pooling 'avg' or 'flat'")
    if not 1 <= blocks <= len(encoder.blocks):
        raise UserError(f"feature_blocks must be in 1..{len(encoder.blocks)} (the encoder's depth), got {blocks}")


def _pool(encoder: nn.Module, outs: list, pool: str, final_norm: bool) -> torch.Tensor:
    """Per block (patch tokens (N, L, D), prefix tokens (N, P, D)) -> (N, blocks, width) of one variant."""
    vectors = []
    for patches, prefix in outs:
        tokens = torch.cat([prefix, patches], 1)  # (N, P + L, D): timm puts the prefix (class token) first
        tokens = encoder.norm(tokens) if final_norm else tokens
        start = prefix.shape[1]
        vectors.append(tokens[:, 0] if pool == "token" else
                       tokens[:, start:].flatten(1) if pool == "flat" else tokens[:, start:].mean(1))
    return torch.stack(vectors, 1)


def extract_features(model: nn.Module | None, loader: Iterable, normalize: nn.Module, device: torch.device,
                     variants: list[Variant] = (("avg", True),), blocks: int = 1,
                     dtype: torch.dtype = FEATURE_DTYPE) -> tuple[dict[Variant, torch.Tensor], torch.Tensor]:
    """One pass over ``loader`` -> ({variant: features (N, blocks, width)}, labels (N,)), stored in ``dtype``.

    ``model=None``: raw pixels, ``{PIXELS: (N, 1, C*H*W)}``. Otherwise width is D (``avg``, ``token``) or
    patches x D (``flat``); ``[:, -1]`` is the last block.
    """
    if model is None:
        pixels, labels = predict(lambda x: x.flatten(1), loader, normalize, device, dtype)
        return {PIXELS: pixels[:, None]}, labels
    variants = [tuple(v) for v in variants]
    encoder = mae_timm.create_timm_encoder(model, fc_norm=False).eval().to(device)
    _check(encoder, variants, blocks)
    widths = [blocks * encoder.embed_dim * (encoder.patch_embed.num_patches if p == "flat" else 1)
              for p, _ in variants]

    def pooled(x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, sum of blocks * width)
        outs = encoder.forward_intermediates(x, indices=blocks, norm=False, output_fmt="NLC", intermediates_only=True,
                                             return_prefix_tokens=True)
        outs = [out if isinstance(out, tuple) else (out, out[:, :0]) for out in outs]  # no prefix: (N, 0, D)
        return torch.cat([_pool(encoder, outs, pool, norm).flatten(1) for pool, norm in variants], 1)

    flat, labels = predict(pooled, loader, normalize, device, dtype)
    parts = flat.split(widths, dim=1)
    return {v: part.view(len(labels), blocks, -1) for v, part in zip(variants, parts)}, labels


def select_blocks(features: torch.Tensor, blocks: int) -> torch.Tensor:
    """The last ``blocks`` blocks of (N, B, width) features, concatenated: (N, blocks * width)."""
    return features[:, -blocks:].flatten(1)


def frozen_features(model: nn.Module, train_loader: Iterable, val_loader: Iterable, device: torch.device, *,
                    pool: str = "avg", final_norm: bool = True, blocks: int = 1, raw_pixels: bool = False,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train features (M, D), train labels, val features (Q, D), val labels) of one variant through
    :func:`extract_features`: the last ``blocks`` blocks concatenated, or the raw pixels. ``model`` also gives the
    normalisation (its mean / std) for raw pixels."""
    device = torch.device(device)
    normalize, variant = normalizer(model, device), PIXELS if raw_pixels else (pool, final_norm)
    splits = []
    for loader, split in ((train_loader, "training"), (val_loader, "validation")):
        batches = labelled(progress(loader, f"features of the {split} split"), split)
        features, labels = extract_features(None if raw_pixels else model, batches, normalize, device, [variant],
                                            1 if raw_pixels else blocks)
        splits += [select_blocks(features[variant], blocks if not raw_pixels else 1), labels]
    return tuple(splits)
