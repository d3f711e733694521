"""``mae-timm demo``: a small ``mae-timm compare`` on the bundled Fashion-MNIST sample, with nothing downloaded.

Bundled sample (``mae_timm/assets``: 5,000 train + 1,000 test images) -> shards -> for raw pixels, scratch (the same
architecture at random init) and MAE, over ``seeds`` seeds: pretraining (MAE), then kNN, linear probe, fine-tune and
partial fine-tune with every choice made on a hold-out of the training images and the test images read once
(:func:`mae_timm.engine.eval.compare.run_compare`) -> the verdicts of compare's rule (a paired 95 % t-interval over
seeds; "level" inside it), a reconstruction figure, the loss curve.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mae_timm.data import GpuAugment, fashion_mnist, write_source
from mae_timm.engine.checkpoint import load_model
from mae_timm.engine.eval.compare import CompareConfig, run_compare
from mae_timm.engine.eval.compare.report import LABELS
from mae_timm.layers import patchify, unpatchify
from mae_timm.utils import atomic_write
from mae_timm.utils.settings import above, at_least, check_settings, fraction
from mae_timm.viz import save_loss_curve, save_reconstruction_grid

__all__ = ["ASSETS", "DemoConfig", "run_demo"]

ASSETS = Path(__file__).parent / "assets"  # Fashion-MNIST sample: 5,000 train + 1,000 test images (MIT)


@dataclass
class DemoConfig:
    """A small compare of raw pixels, scratch and MAE on the bundled Fashion-MNIST sample."""

    out: str | None = None  # run folder; None: runs/demo-<date>-<time>
    steps: int = 300  # MAE pretraining updates per seed
    seeds: int = 2  # seeds per arm: the verdicts need a spread (one seed: every verdict is "level")
    batch_size: int = 128  # pretraining images per update
    # the encoder of every arm: Fashion-MNIST's native 28 px, one channel (from the shards), 7-px patches (16 tokens)
    encoder: dict = field(default_factory=lambda: dict(img_size=28, patch_size=7, embed_dim=192, depth=4,
                                                       num_heads=6))
    # MAE decoder options (decoder_embed_dim, decoder_depth, decoder_num_heads) for the demo's model
    decoder: dict = field(default_factory=lambda: dict(decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=4))
    blr: float = 1.5e-3  # 10x the paper's 1.5e-4: a run of a few hundred updates has to move fast
    crop_scale_min: float = 0.5  # small centred images: ImageNet's 0.2 crops away most of the garment
    holdout: int = 1000  # training images on which every choice is made
    finetune_epochs: int = 2  # fine-tune epochs of scratch and MAE (the best on the hold-out is kept)
    probe_epochs: int = 20  # linear-probe epochs
    mask_ratio: float = 0.75  # share of patches removed in pretraining and in the figure
    device: str = "auto"  # auto: cuda when available, else cpu
    num_workers: int = 2  # loader processes

    def __post_init__(self):  # refused before any work
        check_settings(self, dict(steps=at_least(1), seeds=at_least(1), batch_size=at_least(2), holdout=at_least(1),
                                  finetune_epochs=at_least(1), probe_epochs=at_least(2), blr=above(0),
                                  mask_ratio=fraction(), num_workers=at_least(0)))


def compare_config(cfg: DemoConfig, run_dir: Path) -> CompareConfig:
    """The compare the demo runs."""
    return CompareConfig(
        data=str(run_dir / "shards"), arms="raw_pixels,scratch,mae", updates=cfg.steps, seeds=cfg.seeds,
        out=str(run_dir), holdout=cfg.holdout, encoder=dict(cfg.encoder), decoder=dict(cfg.decoder),
        batch_size=cfg.batch_size, blr=cfg.blr, mask_ratio=cfg.mask_ratio, crop_scale_min=cfg.crop_scale_min,
        curve_points=3, knn_k="10,20,50", feature_blocks="1,4", pools="avg,flat", probe_blr="1.0,0.1",
        probe_epochs=str(cfg.probe_epochs), finetune_epochs=cfg.finetune_epochs, finetune_batch_size=cfg.batch_size,
        num_workers=cfg.num_workers, device=cfg.device, keep_features=False,
    )


@torch.no_grad()
def save_true_stats_reconstruction(model, imgs: torch.Tensor, path: Path, mask_ratio: float, seed: int,
                                   mean, std) -> Path:
    """original | masked | prediction de-normalised with each removed patch's TRUE mean / std (the display of the
    MAE and HF ViTMAE notebooks for norm-pix models: brightness given, shape predicted), labelled as such."""
    from matplotlib.figure import Figure

    from mae_timm.viz import to_display

    model.eval()
    grid = model.patch_embed.grid_size
    noise = torch.rand(imgs.shape[0], grid[0] * grid[1], generator=torch.Generator().manual_seed(seed))
    out = model(imgs, mask_ratio=mask_ratio, noise=noise)
    patch = model.patch_embed.patch_size
    target = patchify(imgs, patch)  # (N, L, p*p*C)
    pred = out.pred.float()
    if model.norm_pix_loss:
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    removed = out.mask.float().unsqueeze(-1)  # (N, L, 1), 1 = removed
    masked = unpatchify(target * (1 - removed), patch, imgs.shape[-2:])
    pasted = unpatchify(target * (1 - removed) + pred * removed, patch, imgs.shape[-2:])
    columns = {"original": to_display(imgs, mean, std),
               "masked (removed: grey,\nthe dataset mean)": to_display(masked, mean, std),
               "visible + predicted\n(removed patches' true\nmean/std, official display)":
                   to_display(pasted, mean, std)}
    fig = Figure(figsize=(6.0, 2.0 * len(imgs) + 0.9), layout="constrained")
    axes = fig.subplots(len(imgs), len(columns), squeeze=False)
    for j, (title, images) in enumerate(columns.items()):
        axes[0, j].set_title(title, fontsize=8)
        for i in range(len(imgs)):
            axes[i, j].imshow(images[i].mean(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
    fig.savefig(path, dpi=80)
    return path


def _verdicts(payload: dict) -> list[str]:
    lines = []
    for v in payload["verdicts"]:
        if v["a"] != "mae":
            continue
        a, b = payload["arms"]["mae"][v["protocol"]], payload["arms"][v["b"]][v["protocol"]]
        lines.append(f"{LABELS[v['protocol']]}: MAE {a['mean']:.1f} vs {v['b']} {b['mean']:.1f} % "
                     f"(mean of {len(a['per_seed'])} seeds; paired difference {v['diff']:+.1f}, 95 % interval "
                     + (f"[{v['low']:+.1f}, {v['high']:+.1f}]" if v["low"] is not None else "none") +
                     f"): {v['verdict']}")
    return lines


def _refuse_another_runs_folder(run_dir: Path) -> None:
    """A folder that holds files, but not the demo's first output (``shards/``), is another run's: refused before any
    work, as ``pretrain`` refuses a used ``--out``. A demo stopped later goes on in its own folder."""
    names = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if names and "shards" not in names:
        raise FileExistsError(f"{run_dir} holds another run's files ({', '.join(names[:3])}"
                              f"{', ...' if len(names) > 3 else ''}); pass a new or empty --out")


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; returns the run folder, the files written and compare's payload."""
    start = time.perf_counter()
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    if (run_dir / "compare.json").exists():
        raise FileExistsError(f"{run_dir} already holds a finished demo; pass another --out or delete it")
    _refuse_another_runs_folder(run_dir)
    print(f"[1/3] the bundled Fashion-MNIST sample (5,000 train, 1,000 test images) as shards in {run_dir / 'shards'}")
    write_source(run_dir / "shards", fashion_mnist(ASSETS), shard_size=500, min_shards=4, progress=False)
    print(f"[2/3] compare raw pixels, scratch and MAE ({cfg.steps} pretraining updates of {cfg.batch_size}) over "
          f"{cfg.seeds} seeds: kNN, linear probe, fine-tune, partial fine-tune; choices on {cfg.holdout} held-out "
          "training images, the 1,000 test images read once at the end")
    try:
        payload = run_compare(compare_config(cfg, run_dir))
    except SystemExit as stop:  # a signal during pretraining: the checkpoint is kept, the same command resumes
        print(stop)
        return dict(run_dir=run_dir, interrupted=True)
    print("[3/3] figures")
    mae_dir = run_dir / "runs" / "mae" / "seed0"
    model, _ = load_model(mae_dir / "last.pt")
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    from mae_timm.data import create_loader

    loader = create_loader(str(run_dir / "shards"), "validation", 6, train=False, img_size=model.input_size(),
                           in_chans=model.input_channels(), num_workers=0, crop_pct=1.0)
    imgs = GpuAugment(mean, std)(next(iter(loader))[0])
    figures = dict(
        reconstruction=save_true_stats_reconstruction(model, imgs, run_dir / "reconstruction.png", cfg.mask_ratio, 0,
                                                      mean, std),
        reconstruction_no_leak=save_reconstruction_grid(model, imgs, run_dir / "reconstruction_no_leak.png",
                                                        mask_ratio=cfg.mask_ratio, mean=mean, std=std),
        loss_curve=save_loss_curve(mae_dir / "metrics.jsonl", run_dir / "loss.png"),
    )
    minutes = (time.perf_counter() - start) / 60
    lines = _verdicts(payload)
    summary = dict(verdicts=lines, minutes=round(minutes, 2), compare=str(run_dir / "compare.json"))
    with atomic_write(run_dir / "summary.json", "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    print(f"\ndemo finished in {run_dir}/ in {minutes:.1f} min. Verdicts (a win only where the 95 % interval of the "
          "per-seed differences excludes 0):")
    for line in lines:
        print(f"  {line}")
    print(f"  table:           {run_dir / 'compare.md'}")
    print(f"  reconstructions: {figures['reconstruction']} (removed patches shown with their true mean / std, as the "
          f"official notebooks do; {figures['reconstruction_no_leak'].name}: estimated from visible patches only)")
    print(f"  loss curve:      {figures['loss_curve']}")
    print("next: mae-timm compare --data SHARDS --arms raw_pixels,scratch,mae --updates 3000 --seeds 3 --out DIR")
    return dict(run_dir=run_dir, interrupted=False, summary=summary, payload=payload, **figures)
