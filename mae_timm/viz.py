"""Figures: reconstruction grids of masked-image models and loss curves of pretraining runs.

Reconstruction grid, one row per image: original | masked | reconstruction | reconstruction with the visible
patches pasted back, in true colour: every column is de-normalised with the model's own per-channel mean/std.
Grayscale stays grayscale: a 1-channel model's images are drawn with a gray colour map on a fixed [0, 1] scale,
and so are the rows of a 3-channel model whose input image is gray (equal channels), its predicted channels
averaged, since their differences would only paint a colour cast that no input pixel has.

With a norm-pix loss the model predicts every patch normalised by that patch's own mean and std, which for a
removed patch are unknown. They are estimated from the visible patches only: each
removed patch takes the mean and std of the visible patches around it, weighted by a Gaussian of the distance
in patches; a visible patch keeps its own. No statistic of a removed patch's pixels enters the figure.

The figure is drawn in evaluation mode, where every removed patch is predicted (a decoder that samples a share of
them in training decodes them all here). A model that does not predict visible patches (a cross-attention
decoder, ``predicts_visible_patches`` False) has them grey in the reconstruction column.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from matplotlib.figure import Figure

from mae_timm.layers import patchify, unpatchify
from mae_timm.models.base import is_pretext_model

__all__ = [
    "NEIGHBOUR_SIGMA",
    "visible_patch_stats",
    "reconstruct",
    "is_gray",
    "to_display",
    "save_reconstruction_grid",
    "save_loss_curve",
]

NEIGHBOUR_SIGMA = 2.0  # width, in patches, of the Gaussian that weighs visible patches' statistics
GRAY_TOLERANCE = 1.0 / 512  # channels closer than half a uint8 step: a gray pixel


def visible_patch_stats(
    patches: torch.Tensor, mask: torch.Tensor, grid_size: tuple[int, int], sigma: float = NEIGHBOUR_SIGMA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std for de-normalising norm-pix predictions, from visible patches only.

    patches (N, L, p*p*C), mask (N, L) with 1 = removed -> mean (N, L, 1), std (N, L, 1). A visible patch gets
    its own statistics (as in the norm-pix target); a removed one the Gaussian-weighted average over the visible
    patches. The removed patches' pixels are never read: changing them leaves the result unchanged.
    """
    own_mean = patches.mean(dim=-1)  # (N, L)
    own_std = (patches.var(dim=-1) + 1.0e-6) ** 0.5  # the norm-pix loss's normalisation
    visible = 1.0 - mask  # (N, L)
    own_mean, own_std = own_mean * visible, own_std * visible  # removed patches' values are dropped here
    rows, cols = torch.meshgrid(
        torch.arange(grid_size[0], device=patches.device), torch.arange(grid_size[1], device=patches.device),
        indexing="ij",
    )
    position = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()  # (L, 2)
    weight = torch.exp(-torch.cdist(position, position) ** 2 / (2 * sigma**2))  # (L, L)
    norm = (visible @ weight).clamp_min(1e-12)  # (N, L): weight matrix is symmetric
    mean = (own_mean @ weight) / norm
    std = (own_std @ weight) / norm
    mean = torch.where(mask.bool(), mean, own_mean)
    std = torch.where(mask.bool(), std, own_std)
    return mean.unsqueeze(-1), std.unsqueeze(-1)


@torch.no_grad()
def reconstruct(
    model: nn.Module, imgs: torch.Tensor, *, mask_ratio: float = 0.75, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Mask, encode and decode a batch of normalised images (N, C, H, W) with a fixed seed.

    Returns normalised images (N, C, H, W) 'reconstruction' and 'pasted' (visible patches from the input),
    'mask' (N, L) with 1 = removed, 'predicted' (N, L) with 1 = predicted by the model, and 'loss'.
    """
    if not (is_pretext_model(model) and model.predicts_pixels):
        raise ValueError(
            f"{type(model).__name__} predicts no pixels (an APL model predicts patch positions); "
            "reconstruction figures need an mae_* checkpoint"
        )
    was_training = model.training
    model.eval()
    patch_size = model.patch_embed.patch_size
    grid_size = model.patch_embed.grid_size
    noise = torch.rand(imgs.shape[0], grid_size[0] * grid_size[1], generator=torch.Generator().manual_seed(seed))
    out = model(imgs, mask_ratio=mask_ratio, noise=noise.to(imgs.device))  # a ReconstructionOutput
    model.train(was_training)
    pred, mask = out.pred.float(), out.mask.float()
    patches = patchify(imgs, patch_size)  # (N, L, p*p*C)
    if model.norm_pix_loss:
        mean, std = visible_patch_stats(patches, mask, grid_size)
        pred = pred * std + mean
    removed = mask.unsqueeze(-1)  # (N, L, 1)
    img_size = imgs.shape[-2:]
    return dict(
        reconstruction=unpatchify(pred, patch_size, img_size),
        pasted=unpatchify(patches * (1 - removed) + pred * removed, patch_size, img_size),
        mask=mask,
        predicted=torch.ones_like(mask) if model.predicts_visible_patches else mask,
        loss=out.loss.float(),
    )


def to_display(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised (N, C, H, W) -> (N, H, W, C) in [0, 1] on the CPU, de-normalised per channel with ``mean`` /
    ``std`` (C values each, or one for all channels)."""
    mean = torch.tensor(mean, dtype=torch.float32, device=imgs.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=imgs.device).view(1, -1, 1, 1)
    return (imgs.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def is_gray(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) display images -> (N,) bool: one channel, or all channels equal at every pixel."""
    spread = images.amax(dim=-1) - images.amin(dim=-1)  # (N, H, W)
    return spread.flatten(1).amax(dim=1) <= GRAY_TOLERANCE


def _draw(ax, image: torch.Tensor, gray: bool) -> None:
    """One (H, W, C) image in [0, 1]: gray ones as their channel mean on a fixed [0, 1] gray scale."""
    if gray:
        ax.imshow(image.mean(dim=-1).numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(image.numpy())
    ax.axis("off")


def save_reconstruction_grid(
    model: nn.Module,
    imgs: torch.Tensor,
    path: str | Path,
    *,
    mask_ratio: float = 0.75,
    seed: int = 0,
    mean: Sequence[float],
    std: Sequence[float],
) -> Path:
    """Write the original | masked | reconstruction | reconstruction + visible figure for normalised ``imgs``.

    ``mean``/``std`` are the normalisation of ``imgs`` (the model's ``pretrained_cfg``); removed patches are
    shown grey. Rows whose input is gray are drawn in gray (see the module docstring). Returns the path written.
    """
    out = reconstruct(model, imgs, mask_ratio=mask_ratio, seed=seed)
    patch_size = model.patch_embed.patch_size
    removed, predicted = (
        unpatchify(out[key].unsqueeze(-1).expand(-1, -1, patch_size[0] * patch_size[1]), patch_size, imgs.shape[-2:])
        .permute(0, 2, 3, 1).cpu()  # (N, H, W, 1), 1 on removed / predicted pixels
        for key in ("mask", "predicted")
    )
    original = to_display(imgs, mean, std)  # (N, H, W, C)
    gray = is_gray(original)  # (N,)
    columns = {
        "original": original,
        "masked": original * (1 - removed) + 0.5 * removed,
        "reconstruction": to_display(out["reconstruction"], mean, std) * predicted + 0.5 * (1 - predicted),
        "reconstruction + visible": to_display(out["pasted"], mean, std),
    }
    rows = imgs.shape[0]
    fig = Figure(figsize=(2.0 * len(columns), 2.0 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for col, (title, images) in enumerate(columns.items()):
        axes[0, col].set_title(title, fontsize=9)
        for row in range(rows):
            _draw(axes[row, col], images[row], bool(gray[row]))
    note = f"mask ratio {mask_ratio:g}, seed {seed}, loss {out['loss'].item():.4f}"
    if imgs.shape[1] > 1 and gray.any():
        note += f"\ngray input: its {imgs.shape[1]} predicted channels shown as their mean, in gray"
    if not model.predicts_visible_patches:
        note += "\nthe cross decoder predicts removed patches only: visible ones are grey in the reconstruction"
    if model.norm_pix_loss:
        note += (
            f"\nnorm-pix: removed patches de-normalised with the mean/std of visible patches\n"
            f"(Gaussian-weighted by distance, sigma {NEIGHBOUR_SIGMA:g} patches); no removed pixel is used"
        )
    fig.suptitle(note, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a partly written last line (a run killed mid-write) is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def save_loss_curve(jsonl_path: str | Path, png_path: str | Path) -> Path:
    """Plot 'loss' (and 'lr' on a second axis, when logged) against 'step' from a metrics JSONL file."""
    records = [r for r in _read_jsonl(Path(jsonl_path)) if "loss" in r]
    if not records:
        raise ValueError(f"{jsonl_path} has no records with a 'loss'; is it a pretraining metrics file?")
    steps = [r.get("step", i) for i, r in enumerate(records)]
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, [r["loss"] for r in records], color="tab:blue", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    if all("lr" in r for r in records):
        lr_axis = ax.twinx()
        lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange", linewidth=1)
        lr_axis.set_ylabel("lr", color="tab:orange")
    ax.set_title(Path(jsonl_path).parent.name or str(jsonl_path), fontsize=9)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return png_path
