"""The pretraining loop: any registered pretext model (``mae_*``, ``apl_*``), one process or many under torchrun.

Reads like the official ``main_pretrain.py`` + ``engine_pretrain.py``: :func:`pretrain` sets up (device, model,
data, optimizer and schedule, resume, run folder), then :func:`train` runs the updates, one per loop iteration.

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
import itertools
import math
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from mae_timm import __version__
from mae_timm.data import DataError, GpuAugment, create_loader, read_info
from mae_timm.data.synthetic import SyntheticImages
from mae_timm.engine.checkpoint import capture_rng_state, load_weights, restore_rng_state
from mae_timm.engine.config import PretrainConfig
from mae_timm.engine.distributed import DistInfo, all_reduce_mean, cleanup_distributed, init_distributed
from mae_timm.engine.eval_setup import input_channels
from mae_timm.engine.model_setup import build_model, create_optimizer_and_schedule
from mae_timm.engine.resume import agree_on_resume, check_resumable
from mae_timm.engine.run_lock import RunLock, lock_on_main
from mae_timm.engine.run_output import RunOutput
from mae_timm.engine.runtime import (
    NonFiniteLossError,
    UserError,
    autocast,
    autocast_dtype,
    check_warmup,
    derive_seed,
    seed_everything,
)
from mae_timm.engine.step import PendingStats, StatsReader, compile_model, resolve_compile
from mae_timm.models.factory import model_record

__all__ = ["NonFiniteLossError", "PretrainResult", "Trainer", "build_model", "build_trainer", "pretrain", "train",
           "update_batches"]

_STEP_STREAM, _EPOCH_STREAM = 0, 1  # tags that keep per-update and per-epoch seeds apart


@dataclass
class PretrainResult:
    """How a run ended."""

    step: int  # optimizer updates done
    loss: float | None  # loss of the last update (None when no update ran)
    checkpoint: Path | None  # the newest checkpoint written
    interrupted: bool  # stopped by SIGTERM / SIGINT (after saving)


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Run (or resume) pretraining as configured; joins the torchrun process group when there is one."""
    info = init_distributed(cfg.device)
    lock = RunLock(cfg.out)  # one run writes a run folder at a time
    try:
        return _pretrain(cfg, info, lock)
    finally:
        lock.release()
        cleanup_distributed()


def _pretrain(cfg: PretrainConfig, info: DistInfo, lock: RunLock) -> PretrainResult:
    check_warmup(cfg.warmup_epochs, cfg.epochs)
    compile_mode = resolve_compile(cfg.compile, info.device)
    run_dir = Path(cfg.out)
    resumed = agree_on_resume(cfg.resume, run_dir, info.is_main)  # a used --out stops the run here, before any work
    lock_on_main(lock, info.is_main)  # a folder another run writes stops it here: nothing was written yet

    seed_everything(cfg.seed)  # the same initial weights on every rank
    # --img-size builds the model at that size (the encoder's, for a named timm ViT), so the loader and model agree
    sized = dict(img_size=cfg.img_size) if cfg.img_size else {}
    model, record = build_model(
        model_record(
            cfg.model, dict(cfg.model_kwargs, **({} if cfg.pretext else sized)), cfg.pretext, cfg.encoder,
            dict(cfg.encoder_kwargs, **(sized if cfg.pretext else {})),
        ),
        cfg.norm_pix_loss,
    )
    model.to(info.device).train()
    img_size = cfg.img_size or int(model.patch_embed.img_size[-1])  # the size the model was built for
    loader = _create_loader(cfg, info.rank, img_size, input_channels(model), split=cfg.split, train=True,
                            batch_size=cfg.batch_size)
    updates_per_epoch = _updates_per_epoch(len(loader), cfg.accum_steps)
    total_steps = min(cfg.epochs * updates_per_epoch, cfg.max_steps or math.inf)

    global_batch = cfg.batch_size * cfg.accum_steps * info.world_size
    lr = cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256
    trainer = build_trainer(cfg, info, model, record, img_size, lr, updates_per_epoch, compile_mode)
    step, last_checkpoint = 0, None
    if resumed is not None:
        last_checkpoint, ckpt = resumed
        check_resumable(ckpt, last_checkpoint, record["model_name"], updates_per_epoch, world_size=info.world_size,
                        batch_size=cfg.batch_size, accum_steps=cfg.accum_steps)
        step = trainer.load_state_dict(ckpt)

    output = None
    if info.is_main:
        if resumed is not None:
            print(f"resumed from {last_checkpoint} at step {step}")
        print(f"pretraining {record['model_name']} on {info.world_size} x {info.device}, global batch {global_batch}, "
              f"lr {lr:.3g}, {updates_per_epoch} updates/epoch, {total_steps} updates, compile {compile_mode}; "
              f"run folder {run_dir}")
        output = RunOutput(
            run_dir, cfg, step, total_steps, updates_per_epoch, save_every_steps=cfg.save_every_steps,
            save_every_epochs=cfg.save_every_epochs, keep_last=cfg.keep_last, viz_every_epochs=cfg.viz_every_epochs,
            tensorboard=cfg.tensorboard, progress=cfg.progress, last_checkpoint=last_checkpoint, model=model,
            viz_images=_viz_images(cfg, info.device, model, img_size), mask_ratio=cfg.mask_ratio, seed=cfg.seed,
        )

    batches = update_batches(loader, step, total_steps, updates_per_epoch, cfg.accum_steps, cfg.seed, info.rank)
    with StopRequest() as stop:
        try:
            step, loss, interrupted = train(trainer, batches, step, cfg.seed, info, global_batch, output, stop)
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


def train(t: Trainer, batches, start: int, seed: int, info: DistInfo, global_batch: int,
          output: RunOutput | None, stop: StopRequest) -> tuple[int, float | None, bool]:
    """Run the updates ``batches`` yields, ``start`` being done -> (updates done, last loss, stopped by a signal).

    One iteration is one optimizer update of ``len(micro_batches)`` accumulated micro-batches. No update waits for
    the device: its statistics (stop flag, loss, ``out.metrics``, grad norm) are read during the next update, after
    that update's forward and backward are queued. A NaN or infinite loss (on any rank) therefore stops the run one
    update later, with NonFiniteLossError naming the update where it happened; a checkpoint is written only after
    the losses of all updates up to it were read and found finite.
    """
    device, step, pending, read = info.device, start, None, StatsReader(output, global_batch)
    for update, micro_batches in batches:
        # reseeded after the batches were fetched: whatever the loader draws from the global generators (a
        # DataLoader starting lazily, mid-epoch on resume) cannot shift this update's masks and crops
        seed_everything(derive_seed(seed, info.rank, _STEP_STREAM, update))
        t.scheduler.step_update(update)
        loss_sum, metric_sums = torch.zeros((), device=device), {}
        for i, imgs in enumerate(micro_batches):
            imgs = t.augment(imgs.to(device, non_blocking=True))  # uint8 -> cropped, flipped, normalised float
            last = i == len(micro_batches) - 1  # DDP all-reduces the gradients on the last micro-batch only
            with contextlib.nullcontext() if t.ddp_model is None or last else t.ddp_model.no_sync():
                with autocast(device, t.autocast_dtype):
                    out = t.train_model(imgs, **t.forward_kwargs)
                t.scaler.scale(out.loss / len(micro_batches)).backward()
            loss_sum += out.loss.detach().float()
            for name, value in out.metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value.detach().float()
        if pending is not None:  # the previous update is done on the device by now; this one is queued behind it
            read(pending)
        # one collective per update: the stop flag, the mean loss (NaN on any rank -> NaN on all), the metrics
        flag = torch.full((1,), float(stop.requested), device=device)  # a fill on the device, no copy from the host
        means = torch.stack([loss_sum, *metric_sums.values()]) / len(micro_batches)
        stats = dict(zip(["stop", "loss", *metric_sums], all_reduce_mean(torch.cat([flag, means])).unbind()))
        if t.clip_grad:
            t.scaler.unscale_(t.optimizer)
            stats["grad_norm"] = nn.utils.clip_grad_norm_(t.model.parameters(), t.clip_grad)  # a tensor: no wait
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.optimizer.zero_grad(set_to_none=True)
        step = update + 1
        pending = PendingStats.start(step, t.optimizer.param_groups[0]["lr"], stats)

        # one process stops at once; ranks stop together, one update after the one whose all-reduce carried the flag
        stopping = step >= read.stop_at if info.distributed else stop.requested
        if stopping:  # every rank reads this update now: a non-finite loss raises before anything is saved
            read(pending)
            pending = None
        if output is not None:  # rank 0 writes
            # nothing unread is saved: read the update now (checkpoints are rare); a non-finite loss stays pending
            # for the next read to raise, where every rank raises
            if output.checkpoint_due(step, stopping) and (pending is None or read(pending, defer_non_finite=True)):
                pending = None
                output.save(t.state_dict(step), step)
            output.figures(step)
        if stopping:
            return step, read.loss, True
    if pending is not None:
        read(pending)
    return step, read.loss, False


@dataclass
class Trainer:
    """The model and what updates it; ``state_dict`` / ``load_state_dict`` are a checkpoint's content."""

    model: nn.Module  # the bare model: its state_dict is what checkpoints hold
    train_model: nn.Module  # the model as called: DDP and / or torch.compile around `model`
    ddp_model: DistributedDataParallel | None
    augment: nn.Module  # uint8 (N, 3, H, W) -> cropped, flipped, normalised float, on the device
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None  # None: fp32
    forward_kwargs: dict  # mask_ratio for models that take it
    clip_grad: float | None
    updates_per_epoch: int
    accum_steps: int
    record: dict  # what checkpoints hold besides the state: model_name, model_kwargs, world_size, config, version

    def state_dict(self, step: int) -> dict:
        """Everything the next update depends on, as plain values and tensors (``weights_only`` loads it)."""
        epoch, done = divmod(step, self.updates_per_epoch)
        data_position = dict(epoch=epoch, batches_consumed=done * self.accum_steps,
                             updates_per_epoch=self.updates_per_epoch)
        return dict(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), step=step, epoch=epoch,
            data_position=data_position, rng=capture_rng_state(), **self.record,
        )

    def load_state_dict(self, ckpt: dict) -> int:
        """Restore a checkpoint (checked by ``resume.check_resumable``); returns its step."""
        load_weights(self.model, ckpt["model"], "the checkpoint")  # other model_kwargs: one line, not 75
        # this run's AdamW kernel (fused on CUDA) wins over the one the checkpoint was written with
        kernel = [{key: group[key] for key in ("foreach", "fused")} for group in self.optimizer.param_groups]
        saved = ckpt["optimizer"]
        groups = [dict(group, **chosen) for group, chosen in zip(saved["param_groups"], kernel, strict=True)]
        self.optimizer.load_state_dict(dict(saved, param_groups=groups))
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt["rng"])
        return ckpt["step"]


def build_trainer(cfg: PretrainConfig, info: DistInfo, model: nn.Module, record: dict, img_size: int, lr: float,
                  updates_per_epoch: int, compile_mode: str) -> Trainer:
    """What updates ``model`` (on its device, in train mode) as ``cfg`` says: DDP and ``torch.compile`` around it,
    the device augmentation, AdamW (fused on CUDA) + schedule, the gradient scaler and autocast."""
    optimizer, scheduler = create_optimizer_and_schedule(
        model, lr, cfg.weight_decay, cfg.betas, cfg.min_lr, cfg.epochs, cfg.warmup_epochs, updates_per_epoch,
        fused=info.device.type == "cuda",  # one kernel for all parameters; the CPU keeps torch's default
    )
    ddp_model = None
    if info.distributed:  # gradients are all-reduced during backward
        ddp_model = DistributedDataParallel(model, device_ids=[info.device] if info.device.type == "cuda" else None)
    dtype = autocast_dtype(cfg.precision, info.device)
    return Trainer(
        model=model,
        train_model=compile_model(ddp_model or model, compile_mode),
        ddp_model=ddp_model,
        augment=GpuAugment(  # uint8 -> RandomResizedCrop + flip -> normalised float, on the device
            model.pretrained_cfg["mean"], model.pretrained_cfg["std"], img_size=img_size, random_crop=True,
            scale=(cfg.crop_scale_min, 1.0), hflip=0.5 * cfg.hflip,
        ).to(info.device),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(info.device.type, enabled=dtype is torch.float16),
        autocast_dtype=dtype,
        forward_kwargs=dict(mask_ratio=cfg.mask_ratio) if model.takes_mask_ratio else {},  # APL takes none
        clip_grad=cfg.clip_grad,
        updates_per_epoch=updates_per_epoch,
        accum_steps=cfg.accum_steps,
        record=dict(record, world_size=info.world_size, config=dataclasses.asdict(cfg), version=__version__),
    )


def _create_loader(cfg: PretrainConfig, rank: int, img_size: int, in_chans: int, *, split: str, train: bool,
                   batch_size: int):
    """The loader of the data settings (``data`` / ``synthetic``): uint8 batches with the model's channels,
    cropped on the device."""
    if cfg.synthetic:
        return SyntheticImages(cfg.synthetic_samples, batch_size, img_size, cfg.seed, rank if train else 0, in_chans)
    if cfg.data is None:
        raise UserError("no data: pass --data SHARD_DIR (made by `mae-timm shards`) or --synthetic")
    source = cfg.data.split(",") if "," in cfg.data else cfg.data
    # workers only decode; the random crop + flip run in GpuAugment on the device
    return create_loader(
        source, split, batch_size, train=train, img_size=img_size, in_chans=in_chans, num_workers=cfg.num_workers,
        seed=cfg.seed,
    )


def _viz_images(cfg: PretrainConfig, device: torch.device, model: nn.Module, img_size: int) -> torch.Tensor | None:
    """The fixed normalised batch of 8 of the reconstruction figures, from the validation split when the shards
    have one; None when figures are off or the model predicts no pixels."""
    if not (cfg.viz_every_epochs and model.predicts_pixels):
        return None
    split = cfg.split
    if not cfg.synthetic and Path(cfg.data).is_dir() and "validation" in read_info(cfg.data).get("splits", {}):
        split = "validation"
    loader = _create_loader(cfg, 0, img_size, input_channels(model), split=split, train=False, batch_size=8)
    normalize = GpuAugment(model.pretrained_cfg["mean"], model.pretrained_cfg["std"], img_size=img_size).to(device)
    return normalize(next(iter(loader))[0].to(device))


def _updates_per_epoch(loader_len: int, accum_steps: int) -> int:
    if loader_len < accum_steps:
        raise UserError(
            f"an epoch has {loader_len} batches per rank, fewer than --accum-steps {accum_steps}; "
            "lower --batch-size or --accum-steps"
        )
    return loader_len // accum_steps


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
        loader.set_epoch(epoch)
        skip = done * accum_steps
        batches = loader.iter_from(skip) if hasattr(loader, "iter_from") else itertools.islice(iter(loader), skip, None)
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
