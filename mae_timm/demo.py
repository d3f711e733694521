"""``mae-timm demo``: the whole pipeline in a few minutes on a CPU, with nothing downloaded.

Bundled Fashion-MNIST sample (``mae_timm/assets``) -> shards (``mae_timm.data.write_source``) -> MAE pretraining
(``mae_timm.engine.pretrain``) -> kNN of the pretrained encoder and of the same encoder at random init ->
reconstruction grid and loss curve, all in one run folder.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch

from mae_timm.data import GpuAugment, create_loader, fashion_mnist, write_source
from mae_timm.engine.checkpoint import load_model
from mae_timm.engine.config import PretrainConfig
from mae_timm.engine.evaluate import EvalData, KnnConfig, evaluate_checkpoint, evaluate_model, write_result
from mae_timm.engine.pretrain import pretrain
from mae_timm.viz import save_loss_curve, save_reconstruction_grid

__all__ = ["ASSETS", "DemoConfig", "run_demo"]

ASSETS = Path(__file__).parent / "assets"  # Fashion-MNIST sample: 5,000 train + 1,000 test images (MIT)
TRAIN_IMAGES = 5000  # images in the bundled train split


@dataclass
class DemoConfig:
    out: str | None = None  # run folder; None: runs/demo-<date>-<time>
    steps: int = 800  # pretraining updates (about 20 passes over the 5,000 training images)
    batch_size: int = 128  # images per update
    model: str = "mae_vit_tiny_patch8_64"  # a registered pretext model, shrunk by model_kwargs
    # Fashion-MNIST's 28 px in 4-px patches (7 x 7 tokens); a narrow, shallow encoder and a one-block decoder
    model_kwargs: dict = field(
        default_factory=lambda: dict(
            img_size=28, patch_size=4, embed_dim=96, depth=4, num_heads=3,
            decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
        )
    )
    blr: float = 1e-3  # above the paper's 1.5e-4: a run of a few hundred steps has to move fast
    # None: one epoch (TRAIN_IMAGES // batch_size updates) when the run is longer than that, else none; a value
    # given must be below the run's epochs (the one warmup rule, mae_timm.engine.runtime.check_warmup)
    warmup_epochs: int | None = None
    device: str = "auto"  # auto: cuda when available, else cpu
    num_workers: int = 2  # loader processes
    seed: int = 0


def _pretrain_config(cfg: DemoConfig, run_dir: Path, shard_dir: Path) -> PretrainConfig:
    epochs = -(-cfg.steps // (TRAIN_IMAGES // cfg.batch_size))  # the cosine schedule spans whole epochs
    return PretrainConfig(
        model=cfg.model,
        model_kwargs=dict(cfg.model_kwargs),
        data=str(shard_dir),
        img_size=cfg.model_kwargs["img_size"],
        batch_size=cfg.batch_size,
        epochs=epochs,
        warmup_epochs=int(epochs > 1) if cfg.warmup_epochs is None else cfg.warmup_epochs,
        max_steps=cfg.steps,
        blr=cfg.blr,
        device=cfg.device,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        out=str(run_dir),
        save_every_steps=0,
        keep_last=1,
        viz_every_epochs=0,  # the demo draws its figures once, at the end
        tensorboard=False,
    )


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; returns the run folder, the files written and the kNN top-1 (pretrained, random init)."""
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass another --out or delete it")
    shard_dir = run_dir / "shards"
    print(f"[1/4] writing the bundled Fashion-MNIST sample (5,000 train, 1,000 test images) as shards to {shard_dir}")
    write_source(shard_dir, fashion_mnist(ASSETS), shard_size=500, min_shards=8, progress=False)

    print(f"[2/4] pretraining {cfg.model} {cfg.model_kwargs} for {cfg.steps} steps of {cfg.batch_size} images")
    start = time.perf_counter()
    result = pretrain(_pretrain_config(cfg, run_dir, shard_dir))
    pretrain_minutes = (time.perf_counter() - start) / 60
    if result.interrupted:
        print(f"demo stopped during pretraining; the run folder {run_dir} keeps checkpoint {result.checkpoint}")
        return dict(run_dir=run_dir, checkpoint=result.checkpoint, interrupted=True)

    print("[3/4] kNN (k=20, cosine, T=0.07): train split as memory bank, accuracy on the test split")
    device = None if cfg.device == "auto" else cfg.device
    data = EvalData(data=str(shard_dir), num_workers=cfg.num_workers, device=device)
    knn = evaluate_checkpoint("knn", result.checkpoint, data, KnnConfig(), out_dir=run_dir)
    model, ckpt = load_model(result.checkpoint)
    torch.manual_seed(cfg.seed)
    random_model = timm.create_model(ckpt["model_name"], **ckpt["model_kwargs"])
    baseline = dict(protocol="knn", model_name=ckpt["model_name"], init="random", data=asdict(data),
                    **evaluate_model("knn", random_model, data, KnnConfig()))
    baseline_path = write_result(baseline, run_dir / "knn_random_init.json")
    print(f"knn at random init: top-1 {baseline['top1']:.2f} %  top-5 {baseline['top5']:.2f} %  -> {baseline_path}")

    print("[4/4] figures")
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    val_loader = create_loader(str(shard_dir), "validation", 8, train=False, img_size=model.patch_embed.img_size[0],
                               num_workers=0, crop_pct=1.0)
    imgs = GpuAugment(mean, std)(next(iter(val_loader))[0])
    grid = save_reconstruction_grid(model, imgs, run_dir / "reconstruction.png", mask_ratio=0.75, seed=cfg.seed,
                                    mean=mean, std=std)
    curve = save_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")

    print(f"\ndemo finished in {run_dir}/ (pretraining took {pretrain_minutes:.1f} min, {result.step} steps, "
          f"final loss {result.loss:.4f})")
    print(f"  kNN top-1: {knn['top1']:.2f} % pretrained vs {baseline['top1']:.2f} % random init ({knn['path']})")
    print(f"  reconstructions: {grid}")
    print(f"  loss curve:      {curve}")
    print(f"  checkpoint:      {result.checkpoint}")
    print(f"next: mae-timm linprobe --checkpoint {result.checkpoint} --data {shard_dir} --epochs 20")
    return dict(run_dir=run_dir, checkpoint=result.checkpoint, interrupted=False, knn_top1=knn["top1"],
                random_init_top1=baseline["top1"], reconstruction=grid, loss_curve=curve,
                pretrain_minutes=pretrain_minutes)
