"""The pretraining loop: any registered pretext model (``mae_*``, ``apl_*``), one process or many under torchrun.

Recipe (MAE paper, appendix A.1): AdamW (0.9, 0.95), weight decay 0.05 except biases, norms, position tables and
tokens, lr = blr * global batch / 256, linear warmup then per-update cosine decay, mask ratio 0.75, norm-pix loss.

Exact resume: a checkpoint holds everything the next update depends on (model, optimizer, scaler, scheduler,
update count, RNG states, data position), and every update reseeds the global generators from
``(seed, rank, step)``, so masks and augmentations do not depend on what ran before (a data-loader start, a
figure). The data position is "epoch e, b batches consumed": the loader's order is fixed by ``(seed, epoch)``,
so resuming skips b batches of epoch e. After ``kill -9`` at any moment, ``--resume auto`` therefore gives the
same losses as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel

from mae_timm import __version__
from mae_timm.data import DataError, GpuAugment, create_loader, read_info
from mae_timm.data.synthetic import SyntheticImages
from mae_timm.engine.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_partial_files,
    restore_rng_state,
    save_checkpoint,
)
from mae_timm.engine.config import PretrainConfig, save_config
from mae_timm.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
)

__all__ = ["NonFiniteLossError", "PretrainResult", "build_model", "pretrain", "update_batches"]

_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_STEP_STREAM, _EPOCH_STREAM = 0, 1  # tags that keep per-update and per-epoch seeds apart


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving."""


@dataclass
class PretrainResult:
    """How a run ended."""

    step: int  # optimizer updates done
    loss: float | None  # loss of the last update (None when no update ran)
    checkpoint: Path | None  # the newest checkpoint written
    interrupted: bool  # stopped by SIGTERM / SIGINT (after saving)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, rank, step, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_batches(loader, epoch: int, skip: int):
    """Batches of ``epoch`` after the first ``skip`` (the order is fixed by the loader's seed and the epoch)."""
    loader.set_epoch(epoch)
    if hasattr(loader, "iter_from"):
        return loader.iter_from(skip)
    return itertools.islice(iter(loader), skip, None)


def build_model(cfg: PretrainConfig) -> tuple[nn.Module, dict]:
    """``timm.create_model(cfg.model, **cfg.model_kwargs)`` -> (model, the kwargs that rebuild it).

    Models with a ``norm_pix_loss`` attribute (the MAE models) get ``cfg.norm_pix_loss``; others (APL) ignore it.
    """
    if cfg.model not in timm.list_models():
        known = ", ".join(timm.list_models(["mae_*", "apl_*"]))
        raise ValueError(f"unknown model {cfg.model!r}; pretext models: {known}")
    model_kwargs = dict(cfg.model_kwargs)
    model = timm.create_model(cfg.model, **model_kwargs)
    if hasattr(model, "norm_pix_loss"):
        # the flag only selects the loss target, so setting it after construction equals passing it as a kwarg
        model.norm_pix_loss = cfg.norm_pix_loss
        model_kwargs["norm_pix_loss"] = cfg.norm_pix_loss
    return model, model_kwargs


def _takes_mask_ratio(model: nn.Module) -> bool:
    return "mask_ratio" in inspect.signature(model.forward).parameters


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = no autocast (fp32)."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; choose one of {', '.join(_PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def _image_size(cfg: PretrainConfig, model: nn.Module) -> int:
    """The size the model was built for (kwargs such as img_size=28 included), unless the config says otherwise."""
    return cfg.img_size or int(model.patch_embed.img_size[-1])


def _create_loader(cfg: PretrainConfig, info: DistInfo, img_size: int, *, split: str, train: bool, batch_size: int):
    if cfg.synthetic:
        return SyntheticImages(cfg.synthetic_samples, batch_size, img_size, cfg.seed, info.rank if train else 0)
    if cfg.data is None:
        raise ValueError("no data: pass --data SHARD_DIR (made by `mae-timm shards`) or --synthetic")
    source = cfg.data.split(",") if "," in cfg.data else cfg.data
    # crop_on_device: workers only decode; the random crop + flip run in GpuAugment
    return create_loader(
        source, split, batch_size, train=train, img_size=img_size, num_workers=cfg.num_workers, seed=cfg.seed,
        crop_on_device=True, scale=(cfg.crop_scale_min, 1.0),
    )


class MetricsLog:
    """Rank 0's ``metrics.jsonl`` (one record per update) and, when installed, TensorBoard events."""

    def __init__(self, run_dir: Path, start_step: int, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self._drop_records_after(start_step)
        self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed; metrics go to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def _drop_records_after(self, step: int) -> None:
        """A resumed run recomputes the updates after its checkpoint; keep one record per step."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by kill -9
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".part")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves and exits after the current update."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None


def _save_figures(cfg: PretrainConfig, run_dir: Path, model: nn.Module, viz_images: torch.Tensor, epoch: int):
    """Loss curve, and for pixel-predicting models a reconstruction grid; skipped if matplotlib is missing."""
    try:
        from mae_timm.viz import save_loss_curve, save_reconstruction_grid
    except ImportError as e:
        print(f"figures skipped ({e}); pip install 'mae-timm[viz]'")
        return
    save_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    if _takes_mask_ratio(model):
        mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]  # the normalisation of viz_images
        path = run_dir / f"reconstruction-epoch{epoch:04d}.png"
        save_reconstruction_grid(model, viz_images, path, mask_ratio=cfg.mask_ratio, seed=cfg.seed, mean=mean, std=std)
        model.train()


def _choose_resume(cfg: PretrainConfig, run_dir: Path) -> tuple[Path, dict] | None:
    """Rank 0's reading of ``--resume`` and the run folder -> (checkpoint path, its content) or None (fresh run).

    A fresh run refuses a folder that holds checkpoints: it would cut their metrics, and ``--resume auto`` would
    later pick the old run's newer checkpoints over its own.
    """
    if cfg.resume is None:
        if list_checkpoints(run_dir):
            raise ValueError(
                f"{run_dir} already holds checkpoints of a run: pass --resume auto to continue it or choose a new --out"
            )
        return None
    if cfg.resume == "auto":
        found = find_latest_checkpoint(run_dir)
        if found is None:
            print(f"--resume auto: no checkpoint in {run_dir}, starting from scratch")
        return found
    path = Path(cfg.resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint file")
    ckpt = load_checkpoint(path)
    up_to_step = list_checkpoints(run_dir, ckpt["step"])
    later = [p.name for p in list_checkpoints(run_dir) if p not in up_to_step]
    if later:
        raise ValueError(
            f"{run_dir} holds checkpoints after step {ckpt['step']} of {path} ({', '.join(later)}): "
            "choose a new --out to continue from this checkpoint"
        )
    return path, ckpt


def _agree_on_resume(cfg: PretrainConfig, info: DistInfo, run_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint every rank resumes from: rank 0 chooses, the others load the file it names.

    Ranks choosing on their own could see different files (a checkpoint being written or tidied away), and
    then start from different steps. An error on rank 0 is raised on every rank.
    """
    chosen = error = None
    if info.is_main:
        try:
            chosen = _choose_resume(cfg, run_dir)
        except (ValueError, OSError) as e:
            error = e
    path, error = broadcast_object((chosen[0] if chosen else None, error))
    if error is not None:
        raise error
    if path is None or info.is_main:
        return chosen
    return path, load_checkpoint(path)


def update_batches(loader, start: int, total: int, updates_per_epoch: int, accum_steps: int, seed: int, rank: int):
    """``(step, micro-batches)`` for the updates ``start .. total - 1``, epoch after epoch.

    Epoch ``e`` reads the loader's ``(seed, e)`` order; starting mid-epoch skips the batches already consumed. The
    global generators are seeded per epoch first, because a loader may draw worker seeds from them when it starts.
    Raises DataError when an epoch holds fewer batches than ``len(loader)``.
    """
    step = start
    while step < total:
        epoch, done = divmod(step, updates_per_epoch)
        seed_everything(derive_seed(seed, rank, _EPOCH_STREAM, epoch))
        batches = epoch_batches(loader, epoch, done * accum_steps)
        end = min(total, (epoch + 1) * updates_per_epoch)
        for update in range(step, end):
            micro_batches = [imgs for imgs, _ in itertools.islice(batches, accum_steps)]
            if len(micro_batches) < accum_steps:
                wanted = (update - epoch * updates_per_epoch) * accum_steps + len(micro_batches) + 1
                raise DataError(
                    f"epoch {epoch}: the data loader stopped before batch {wanted} of the {len(loader)} that "
                    "len(loader) promises; every rank needs len(loader) batches per epoch"
                )
            yield update, micro_batches
        step = end


@dataclass
class _Trainer:
    """The model and what updates it; ``update`` runs one optimizer update, ``state`` is a checkpoint's content."""

    cfg: PretrainConfig
    info: DistInfo
    model: nn.Module  # the bare model: its state_dict is what checkpoints hold
    model_kwargs: dict
    train_model: nn.Module  # the model as called: DDP and / or torch.compile around `model`
    ddp_model: DistributedDataParallel | None
    augment: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None
    forward_kwargs: dict
    updates_per_epoch: int

    def update(
        self, micro_batches: list[torch.Tensor], step: int, stop_flag: bool
    ) -> tuple[float, bool, float | None, dict]:
        """One update from uint8 micro-batches -> (mean loss over ranks, any rank asked to stop, grad norm or None,
        extra metrics: the position accuracy of models that define ``position_accuracy(pred, aux)``, as APL does).

        Raises NonFiniteLossError before touching the weights when the loss is NaN or infinite on any rank.
        """
        device, accum_steps = self.info.device, len(micro_batches)
        self.scheduler.step_update(step)
        loss_sum = torch.zeros((), device=device)
        accuracy_fn = getattr(self.model, "position_accuracy", None)
        accuracy_sum = torch.zeros((), device=device)
        for micro, imgs in enumerate(micro_batches):
            imgs = self.augment(imgs.to(device, non_blocking=True))  # uint8 -> normalised float
            sync = self.ddp_model is None or micro == accum_steps - 1  # all-reduce the grads on the last only
            with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
                with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    loss, pred, aux = self.train_model(imgs, **self.forward_kwargs)
                self.scaler.scale(loss / accum_steps).backward()
            loss_sum += loss.detach().float()
            if accuracy_fn is not None:
                accuracy_sum += accuracy_fn(pred.detach(), aux).float()
        # one collective per update: the mean loss (NaN on any rank -> NaN on all), the stop flag, the accuracy
        flag = torch.tensor(float(stop_flag), device=device)
        stats = all_reduce_mean(torch.stack([loss_sum / accum_steps, flag, accuracy_sum / accum_steps]))
        loss_value, stop = stats[0].item(), stats[1].item() > 0
        extras = {"position_accuracy": stats[2].item()} if accuracy_fn is not None else {}
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"loss is {loss_value} at step {step + 1}")
        grad_norm = None
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad).item()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, stop, grad_norm, extras

    def state(self, step: int) -> dict:
        """Everything the next update depends on, as plain values and tensors (``weights_only`` loads it)."""
        epoch, done = divmod(step, self.updates_per_epoch)
        return {
            "model": self.model.state_dict(),
            "model_name": self.cfg.model,
            "model_kwargs": self.model_kwargs,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": step,
            "epoch": epoch,
            "data_position": dict(
                epoch=epoch, batches_consumed=done * self.cfg.accum_steps, updates_per_epoch=self.updates_per_epoch
            ),
            "rng": capture_rng_state(),
            "world_size": self.info.world_size,
            "config": dataclasses.asdict(self.cfg),
            "version": __version__,
        }

    def load_state(self, ckpt: dict, path: Path) -> int:
        """Restore a checkpoint of the same model and data layout; returns its step."""
        if ckpt["model_name"] != self.cfg.model:
            raise ValueError(f"checkpoint {path} is of {ckpt['model_name']}, not --model {self.cfg.model}")
        if ckpt["data_position"]["updates_per_epoch"] != self.updates_per_epoch:
            raise ValueError(
                f"checkpoint {path} has {ckpt['data_position']['updates_per_epoch']} updates per epoch, this run "
                f"{self.updates_per_epoch}: resume with the same data, batch size, accum steps and process count"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt["rng"])
        return ckpt["step"]


def _build_trainer(cfg: PretrainConfig, info: DistInfo, loader_len: int, model: nn.Module, model_kwargs: dict,
                   augment: nn.Module) -> _Trainer:
    updates_per_epoch = loader_len // cfg.accum_steps
    if updates_per_epoch == 0:
        raise ValueError(
            f"an epoch has {loader_len} batches per rank, fewer than --accum-steps {cfg.accum_steps}; "
            "lower --batch-size or --accum-steps"
        )
    global_batch = cfg.batch_size * cfg.accum_steps * info.world_size
    lr = cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256
    # timm's factory: no weight decay on 1-d params (biases, norms) and on model.no_weight_decay() (pos tables, tokens)
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    # MAE: the cosine spans the epochs after warmup, so the warmup is a prefix of the `epochs` total
    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=cfg.epochs - cfg.warmup_epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_prefix=True, warmup_lr=0.0, min_lr=cfg.min_lr, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    autocast_dtype = _autocast_dtype(cfg.precision, info.device)
    ddp_model = None
    if info.distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        ddp_model = DistributedDataParallel(model, device_ids=device_ids)
    train_model = ddp_model or model
    if cfg.compile:
        train_model = torch.compile(train_model)
    forward_kwargs = dict(mask_ratio=cfg.mask_ratio) if _takes_mask_ratio(model) else {}  # APL takes none
    return _Trainer(
        cfg=cfg, info=info, model=model, model_kwargs=model_kwargs, train_model=train_model, ddp_model=ddp_model,
        augment=augment, optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler(info.device.type, enabled=autocast_dtype is torch.float16),
        autocast_dtype=autocast_dtype, forward_kwargs=forward_kwargs, updates_per_epoch=updates_per_epoch,
    )


def _check_settings(cfg: PretrainConfig) -> None:
    """Settings that cannot work, reported in one line before any work."""
    if not 0 <= cfg.warmup_epochs < cfg.epochs:
        raise ValueError(
            f"--warmup-epochs {cfg.warmup_epochs} must be at least 0 and below --epochs {cfg.epochs}: "
            "the cosine decay after the warmup needs at least one epoch"
        )


def _viz_images(cfg: PretrainConfig, info: DistInfo, model: nn.Module, img_size: int) -> torch.Tensor | None:
    """The fixed normalised batch of 8 of the reconstruction figures; None when figures are off or the model
    predicts no pixels."""
    if not (cfg.viz_every_epochs and _takes_mask_ratio(model)):
        return None
    loader = _create_loader(cfg, info, img_size, split=_viz_split(cfg), train=False, batch_size=8)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    normalize = GpuAugment(mean, std, img_size=img_size).to(info.device)
    return normalize(next(iter(loader))[0].to(info.device))


class _RunOutput:
    """Rank 0's side of a run: the run folder, ``config.yaml``, metrics and progress bar, and after each update the
    checkpoint and figures that are due."""

    def __init__(self, cfg: PretrainConfig, trainer: _Trainer, run_dir: Path, start_step: int, total_steps: int,
                 last_checkpoint: Path | None, viz_images: torch.Tensor | None):
        self.cfg, self.trainer, self.run_dir, self.total_steps = cfg, trainer, run_dir, total_steps
        self.last_checkpoint, self.viz_images = last_checkpoint, viz_images
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_files(run_dir)
        save_config(cfg, run_dir / "config.yaml")
        self.metrics = MetricsLog(run_dir, start_step, cfg.tensorboard)
        from tqdm.auto import tqdm

        self.progress = tqdm(
            total=total_steps, initial=start_step, disable=not cfg.progress, unit="step", dynamic_ncols=True
        )

    def after_update(self, step: int, loss: float, imgs_per_s: float, grad_norm: float | None, extras: dict,
                     stop_requested: bool) -> None:
        """Record update number ``step`` (counted from 1) and write the checkpoint and figures due after it."""
        cfg, updates_per_epoch = self.cfg, self.trainer.updates_per_epoch
        lr = self.trainer.optimizer.param_groups[0]["lr"]
        record = dict(step=step, epoch=step / updates_per_epoch, loss=loss, lr=lr, img_per_s=imgs_per_s)
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self.metrics.log(dict(record, **extras))
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{imgs_per_s:.0f}", refresh=False)

        epochs_done, into_epoch = divmod(step, updates_per_epoch)
        epoch_end, finished = into_epoch == 0, step == self.total_steps
        epoch_checkpoint = epoch_end and epochs_done % max(cfg.save_every_epochs, 1) == 0
        step_checkpoint = cfg.save_every_steps and step % cfg.save_every_steps == 0
        if epoch_checkpoint or step_checkpoint or finished or stop_requested:
            self.last_checkpoint = save_checkpoint(self.trainer.state(step), checkpoint_path(self.run_dir, step))
            prune_checkpoints(self.run_dir, cfg.keep_last, up_to=step)
        figures_due = epoch_end and cfg.viz_every_epochs and epochs_done % cfg.viz_every_epochs == 0
        if self.viz_images is not None and (figures_due or finished):
            _save_figures(cfg, self.run_dir, self.trainer.model, self.viz_images, epochs_done + (not epoch_end))

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()


def _run_updates(cfg: PretrainConfig, info: DistInfo, trainer: _Trainer, batches, start: int,
                 output: _RunOutput | None, stop: StopRequest) -> tuple[int, float | None, bool]:
    """Run the updates ``batches`` yields, ``start`` being done -> (updates done, last loss, stopped by a signal)."""
    global_batch = cfg.batch_size * cfg.accum_steps * info.world_size
    done, loss, last_time = start, None, time.perf_counter()
    # the batches are fetched before the reseed: whatever the loader draws from the global generators
    # (a DataLoader starting lazily, mid-epoch on resume) cannot shift this update's masks and crops
    for update, micro_batches in batches:
        seed_everything(derive_seed(cfg.seed, info.rank, _STEP_STREAM, update))
        loss, stop_requested, grad_norm, extras = trainer.update(micro_batches, update, stop.requested)
        done = update + 1
        # wall time between updates: the loss .item() in update() waits for the device once per update
        now = time.perf_counter()
        imgs_per_s, last_time = global_batch / (now - last_time), now
        if output is not None:
            output.after_update(done, loss, imgs_per_s, grad_norm, extras, stop_requested)
        if stop_requested:
            return done, loss, True
    return done, loss, False


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Run (or resume) pretraining as configured; joins the torchrun process group when there is one."""
    info = init_distributed(cfg.device)
    try:
        return _pretrain(cfg, info)
    finally:
        cleanup_distributed()


def _pretrain(cfg: PretrainConfig, info: DistInfo) -> PretrainResult:
    _check_settings(cfg)
    run_dir = Path(cfg.out)
    resumed = _agree_on_resume(cfg, info, run_dir)  # a used --out stops the run here, before any work
    seed_everything(cfg.seed)  # the same initial weights on every rank
    model, model_kwargs = build_model(cfg)
    model.to(info.device).train()
    img_size = _image_size(cfg, model)
    augment = GpuAugment(  # uint8 -> RandomResizedCrop + flip -> normalised float, on the device
        model.pretrained_cfg["mean"], model.pretrained_cfg["std"], img_size=img_size, random_crop=True,
        scale=(cfg.crop_scale_min, 1.0), hflip=0.5 * cfg.hflip,
    ).to(info.device)
    loader = _create_loader(cfg, info, img_size, split=cfg.split, train=True, batch_size=cfg.batch_size)
    trainer = _build_trainer(cfg, info, len(loader), model, model_kwargs, augment)
    total_steps = cfg.epochs * trainer.updates_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    step, last_checkpoint, output = 0, None, None
    if resumed is not None:
        last_checkpoint, ckpt = resumed
        step = trainer.load_state(ckpt, last_checkpoint)
    if info.is_main:
        if resumed is not None:
            print(f"resumed from {last_checkpoint} at step {step}")
        print(
            f"pretraining {cfg.model} on {info.world_size} x {info.device}, "
            f"global batch {cfg.batch_size * cfg.accum_steps * info.world_size}, "
            f"lr {trainer.optimizer.param_groups[0]['initial_lr']:.3g}, {trainer.updates_per_epoch} updates/epoch, "
            f"{total_steps} updates; run folder {run_dir}"
        )
        viz_images = _viz_images(cfg, info, model, img_size)
        output = _RunOutput(cfg, trainer, run_dir, step, total_steps, last_checkpoint, viz_images)

    batches = update_batches(loader, step, total_steps, trainer.updates_per_epoch, cfg.accum_steps, cfg.seed,
                             info.rank)
    with StopRequest() as stop:
        try:
            step, loss, interrupted = _run_updates(cfg, info, trainer, batches, step, output, stop)
        except NonFiniteLossError as e:
            good = output.last_checkpoint if output is not None else last_checkpoint
            raise NonFiniteLossError(
                f"{e}; stopped without saving, last good checkpoint: {good or 'none'} "
                "(try a lower --blr, --clip-grad or --precision fp32)"
            ) from None
        finally:
            if output is not None:
                output.close()
    if output is not None:
        last_checkpoint = output.last_checkpoint
        if interrupted:
            print(f"stopped by signal {stop.signum} at step {step}, saved {last_checkpoint}; go on with --resume auto")
        else:
            last = "none" if loss is None else f"{loss:.4f}"
            print(f"done: {step} of {total_steps} updates, last loss {last}, checkpoint {last_checkpoint}")
    return PretrainResult(step=step, loss=loss, checkpoint=last_checkpoint, interrupted=interrupted)


def _viz_split(cfg: PretrainConfig) -> str:
    """A fixed batch for the reconstruction figures: the validation split when the shards have one."""
    if cfg.synthetic:
        return cfg.split
    splits = read_info(cfg.data).get("splits", {}) if Path(cfg.data).is_dir() else {}
    return "validation" if "validation" in splits else cfg.split
