"""``mae-timm demo``: the whole pipeline in a few minutes on a CPU, with nothing downloaded, and an honest verdict.

Bundled Fashion-MNIST sample (``mae_timm/assets``) -> shards (``mae_timm.data.write_source``) -> MAE pretraining
(``mae_timm.engine.train.pretrain``) -> kNN of the pretrained encoder at a few points of the run, of the same encoder at
random init and of raw pixels -> a short fine-tune of the pretrained encoder and of the same architecture from
scratch, same recipe and budget -> which wins, ``summary.json``, reconstruction grid, loss and accuracy curves.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mae_timm.data import GpuAugment, create_loader, fashion_mnist, write_source
from mae_timm.engine.checkpoint import list_checkpoints, load_model
from mae_timm.engine.eval.evaluate import (
    EvalData,
    FinetuneConfig,
    KnnConfig,
    evaluate_frozen,
    evaluate_model,
    scratch_model,
    write_result,
)
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.pretrain import pretrain
from mae_timm.utils import atomic_write
from mae_timm.viz import save_loss_curve, save_reconstruction_grid

__all__ = ["ASSETS", "DemoConfig", "run_demo", "save_accuracy_curve"]

ASSETS = Path(__file__).parent / "assets"  # Fashion-MNIST sample: 5,000 train + 1,000 test images (MIT)
TRAIN_IMAGES = 5000  # images in the bundled train split
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.286, 0.353  # of the training images, one value for every channel


@dataclass
class DemoConfig:
    out: str | None = None  # run folder; None: runs/demo-<date>-<time>
    steps: int = 600  # pretraining updates (about 15 passes over the 5,000 training images)
    batch_size: int = 128  # images per update
    model: str = "mae_vit_tiny_patch8_64"  # a registered pretext model, shrunk by model_kwargs
    # the recipe of benchmarks/quality.py (configs/fashion_mnist_late.yaml): Fashion-MNIST's native 28 px, one
    # channel, in 7-px patches (4 x 4 tokens), a 192 d x 4 encoder and a one-block decoder; the dataset's own
    # mean/std (ImageNet's would shift the gray images' statistics)
    model_kwargs: dict = field(
        default_factory=lambda: dict(
            img_size=28, patch_size=7, in_chans=1, embed_dim=192, depth=4, num_heads=6,
            decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=4, mae_init=False,
            pretrained_cfg_overlay=dict(mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD]),
        )
    )
    blr: float = 1.5e-3  # 10x the paper's 1.5e-4: a run of a few hundred steps has to move fast
    crop_scale_min: float = 0.5  # small centred images: ImageNet's 0.2 crops away most of the garment
    # None: one epoch (TRAIN_IMAGES // batch_size updates) when the run is longer than that, else none; a value
    # given must be below the run's epochs (the one warmup rule, mae_timm.utils.settings.check_warmup)
    warmup_epochs: int | None = None
    knn_points: int = 4  # kNN of the encoder at this many evenly spaced points of the run (accuracy vs updates)
    finetune_epochs: int = 2  # fine-tune budget of both the pretrained encoder and scratch (78 updates of 128)
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
        crop_scale_min=cfg.crop_scale_min,
        batch_size=cfg.batch_size,
        epochs=epochs,
        warmup_epochs=int(epochs > 1) if cfg.warmup_epochs is None else cfg.warmup_epochs,
        max_steps=cfg.steps,
        blr=cfg.blr,
        device=cfg.device,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        out=str(run_dir),
        save_every_steps=max(cfg.steps // max(cfg.knn_points, 1), 1),
        save_every_epochs=10**6,  # only the step checkpoints (and the last)
        keep_last=max(cfg.knn_points, 1),
        viz_every_epochs=0,  # the demo draws its figures once, at the end
        tensorboard=False,
    )


def save_accuracy_curve(points: dict[str, list[tuple[int, float]]], path: str | Path, title: str,
                        baselines: dict[str, float] | None = None) -> Path:
    """Top-1 (%) against pretraining updates, one line per series (name -> [(updates, top1)]), and a dashed
    horizontal line per baseline (name -> top1)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for name, series in points.items():
        ax.plot(*zip(*sorted(series)), marker="o", label=name)
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, linestyle="--", color=f"C{len(points) + i}", label=name)
    ax.set_xlabel("pretraining updates")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _verdict(knn: dict, finetune: dict) -> list[str]:
    """Plain sentences: which arm wins each comparison."""
    lines = []
    if knn["pretrained"] > knn["raw_pixels"]:
        lines.append(f"kNN: the pretrained encoder beats raw pixels ({knn['pretrained']:.1f} vs "
                     f"{knn['raw_pixels']:.1f} %) and random init ({knn['random_init']:.1f} %).")
    else:
        lines.append(f"kNN: the pretrained encoder ({knn['pretrained']:.1f} %) beats random init "
                     f"({knn['random_init']:.1f} %) but NOT raw pixels ({knn['raw_pixels']:.1f} %) within the demo's "
                     "budget; `python -m benchmarks.quality` measures longer runs on the full 60,000 images "
                     "(docs/evaluation.md, benchmarks/results/quality_cpu.md).")
    winner = "pretrained" if finetune["pretrained"] > finetune["scratch"] else "scratch"
    lines.append(f"fine-tune at the same budget: {winner} wins ({finetune['pretrained']:.1f} % pretrained vs "
                 f"{finetune['scratch']:.1f} % from scratch).")
    return lines


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; returns the run folder, the files written and the accuracies of ``summary.json``."""
    start_all = time.perf_counter()
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass another --out or delete it")
    shard_dir = run_dir / "shards"
    print(f"[1/5] writing the bundled Fashion-MNIST sample (5,000 train, 1,000 test images) as shards to {shard_dir}")
    write_source(shard_dir, fashion_mnist(ASSETS), shard_size=500, min_shards=8, progress=False)

    print(f"[2/5] pretraining {cfg.model} {cfg.model_kwargs} for {cfg.steps} steps of {cfg.batch_size} images")
    start = time.perf_counter()
    result = pretrain(_pretrain_config(cfg, run_dir, shard_dir))
    pretrain_minutes = (time.perf_counter() - start) / 60
    if result.interrupted:
        print(f"demo stopped during pretraining; the run folder {run_dir} keeps checkpoint {result.checkpoint}")
        return dict(run_dir=run_dir, checkpoint=result.checkpoint, interrupted=True)

    print("[3/5] kNN (k=20, cosine, T=0.07, average of the patch tokens): train split as memory bank, accuracy on "
          "the test split; pretrained (at several points of the run), random init, raw pixels")
    device = None if cfg.device == "auto" else cfg.device
    data = EvalData(data=str(shard_dir), num_workers=cfg.num_workers, device=device)
    model, ckpt = load_model(result.checkpoint)
    curve = []
    for path in list_checkpoints(run_dir):  # oldest first
        point, point_ckpt = load_model(path)
        curve.append((point_ckpt["step"], evaluate_frozen(point, data, knn=KnnConfig())["knn"]["top1"]))
    random_init = scratch_model(ckpt["model_name"], ckpt["model_kwargs"], cfg.seed)
    knn = dict(pretrained=curve[-1][1], random_init=evaluate_frozen(random_init, data, knn=KnnConfig())["knn"]["top1"],
               raw_pixels=evaluate_frozen(model, data, knn=KnnConfig(), raw_pixels=True)["knn"]["top1"])
    print(f"kNN top-1: pretrained {knn['pretrained']:.2f} %, random init {knn['random_init']:.2f} %, raw pixels "
          f"{knn['raw_pixels']:.2f} %; pretrained by updates {curve}")

    ft_cfg = FinetuneConfig(epochs=cfg.finetune_epochs, batch_size=cfg.batch_size, warmup_epochs=0, seed=cfg.seed)
    updates = cfg.finetune_epochs * (TRAIN_IMAGES // cfg.batch_size)
    print(f"[4/5] fine-tune, {updates} updates of {cfg.batch_size} images each (the library's recipe, "
          f"FinetuneConfig): the pretrained encoder, then the same architecture from scratch")
    finetune = {}
    for name, init in (("pretrained", model), ("scratch", random_init)):
        metrics = evaluate_model("finetune", init, data, ft_cfg, log=lambda record: None)
        finetune[name] = metrics["top1"]
        write_result(dict(protocol="finetune", init=name, config=asdict(ft_cfg), **metrics),
                     run_dir / f"finetune_{name}.json")
        print(f"  {name}: top-1 {metrics['top1']:.2f} % ({metrics['seconds']:.0f} s)")

    print("[5/5] figures")
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    val_loader = create_loader(str(shard_dir), "validation", 8, train=False, img_size=model.input_size(),
                               num_workers=0, crop_pct=1.0, in_chans=model.input_channels())
    imgs = GpuAugment(mean, std)(next(iter(val_loader))[0])
    grid = save_reconstruction_grid(model, imgs, run_dir / "reconstruction.png", mask_ratio=0.75, seed=cfg.seed,
                                    mean=mean, std=std)
    loss_curve = save_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    accuracy_curve = save_accuracy_curve(
        {"kNN pretrained": curve}, run_dir / "accuracy.png", "demo: kNN top-1 vs pretraining updates",
        {"kNN raw pixels": knn["raw_pixels"], "kNN random init": knn["random_init"]},
    )
    summary = dict(knn_top1=knn, finetune_top1=finetune, finetune_updates=updates, pretrain_updates=result.step,
                   minutes=round((time.perf_counter() - start_all) / 60, 2))
    with atomic_write(run_dir / "summary.json", "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")

    print(f"\ndemo finished in {run_dir}/ in {summary['minutes']:.1f} min (pretraining {pretrain_minutes:.1f} min, "
          f"{result.step} steps, final loss {result.loss:.4f})")
    for line in _verdict(knn, finetune):
        print(f"  {line}")
    print(f"  summary:         {run_dir / 'summary.json'}")
    print(f"  reconstructions: {grid}")
    print(f"  loss curve:      {loss_curve}")
    print(f"  kNN vs updates:  {accuracy_curve}")
    print(f"  checkpoint:      {result.checkpoint}")
    print(f"next: mae-timm linprobe --checkpoint {result.checkpoint} --data {shard_dir} --epochs 20 --warmup-epochs 2")
    return dict(run_dir=run_dir, checkpoint=result.checkpoint, interrupted=False, summary=summary,
                reconstruction=grid, loss_curve=loss_curve, accuracy_curve=accuracy_curve,
                pretrain_minutes=pretrain_minutes)
