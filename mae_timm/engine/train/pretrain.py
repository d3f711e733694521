"""Pretraining, set up top to bottom as the official ``main_pretrain.py`` reads: device and process group, run
folder, model, data, optimizer and schedule, resume, then the run loop (``loop.run``) of ``Trainer.step`` updates.

Recipe (MAE paper, appendix A.1): AdamW (0.9, 0.95), weight decay 0.05 except biases, norms, position tables and
tokens, lr = blr * global batch / 256, linear warmup then per-update cosine decay, mask ratio 0.75, norm-pix loss.

Exact resume: a checkpoint holds everything the next update depends on (model, optimizer, scaler, scheduler,
update count, RNG states, data position), and every update reseeds the global generators from
``(seed, rank, step)``. After ``kill -9`` at any moment, ``--resume auto`` therefore gives the same losses as a
run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from mae_timm import __version__
from mae_timm.data import GpuAugment, create_loader, read_info
from mae_timm.data.synthetic import SyntheticImages
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.distributed import cleanup_distributed, init_distributed, lost_peer_message
from mae_timm.engine.train.loop import StopRequest, run, update_batches
from mae_timm.engine.train.model_setup import build_model
from mae_timm.engine.train.resume import RunLock, agree_on_resume, check_resumable, data_identity, lock_on_main
from mae_timm.engine.train.run_output import RunOutput
from mae_timm.engine.train.trainer import build_trainer
from mae_timm.utils import DistributedError, NonFiniteLossError, UserError, seed_everything
from mae_timm.utils.settings import split_outside_braces

__all__ = ["PretrainResult", "pretrain"]


@dataclass
class PretrainResult:
    """How a run ended."""

    step: int  # optimizer updates done
    loss: float | None  # loss of the last update (None when no update ran)
    checkpoint: Path | None  # the newest checkpoint written
    interrupted: bool  # stopped by SIGTERM / SIGINT (after saving)


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Run (or resume) pretraining as configured; joins the torchrun process group when there is one."""
    info = init_distributed(cfg.device, cfg.dist_timeout)
    lock = RunLock(cfg.out)  # one run writes a run folder at a time
    try:
        # a folder another run writes stops here, before it is read: that run's checkpoints are not ours to judge
        lock_on_main(lock, info.is_main)
        resumed = agree_on_resume(cfg.resume, Path(cfg.out), info.is_main)  # a used --out stops here, before work

        # model: the same initial weights on every rank
        seed_everything(cfg.seed)
        model, record = build_model(cfg, info.device)
        model.to(info.device).train()
        record = dict(record, world_size=info.world_size, config=dataclasses.asdict(cfg), version=__version__,
                      data_identity=data_identity(cfg.data, cfg.split, cfg.synthetic, cfg.synthetic_samples))

        # data: uint8 batches with the model's size and channels, cropped and flipped on the device
        loader = _create_loader(cfg, model, split=cfg.split, train=True, rank=info.rank, batch_size=cfg.batch_size)
        if len(loader) < cfg.accum_steps:
            raise UserError(f"an epoch has {len(loader)} batches per rank, fewer than --accum-steps "
                            f"{cfg.accum_steps}; lower --batch-size or --accum-steps")
        updates_per_epoch = len(loader) // cfg.accum_steps
        total_steps = min(cfg.epochs * updates_per_epoch, cfg.max_steps or math.inf)

        # optimizer and schedule (lr = blr * global batch / 256), DDP, compile
        global_batch = cfg.batch_size * cfg.accum_steps * info.world_size
        lr = cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256
        trainer = build_trainer(cfg, model, info, lr=lr, updates_per_epoch=updates_per_epoch,
                                planned_updates=total_steps, run_dir=Path(cfg.out) if info.is_main else None)

        # resume
        step, last_checkpoint = 0, None
        if resumed is not None:
            last_checkpoint, ckpt = resumed
            check_resumable(ckpt, last_checkpoint, record["model_name"], updates_per_epoch,
                            world_size=info.world_size, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps,
                            seed=cfg.seed, data=record["data_identity"], force=cfg.force_resume)
            trainer.load_state_dict(ckpt)
            step = ckpt["step"]

        output = None
        if info.is_main:  # rank 0 writes the run folder
            if resumed is not None:
                print(f"resumed from {last_checkpoint} at step {step}")
            print(f"pretraining {record['model_name']} on {info.world_size} x {info.device}, global batch "
                  f"{global_batch}, lr {lr:.3g}, {updates_per_epoch} updates/epoch, {total_steps} updates, compile "
                  f"{trainer.compile_mode}; run folder {cfg.out}")
            for note in trainer.notes:  # what precision and compile mode this run takes, and why
                print(note)
            output = RunOutput(cfg, record, start_step=step, total_steps=total_steps,
                               updates_per_epoch=updates_per_epoch, last_checkpoint=last_checkpoint, model=model,
                               viz_images=_viz_images(cfg, model, info.device))

        batches = update_batches(loader, step, total_steps, updates_per_epoch, cfg.accum_steps, cfg.seed, info.rank)
        with StopRequest() as stop:
            try:
                step, loss, interrupted = run(trainer, batches, output, stop, start=step, seed=cfg.seed, info=info,
                                              global_batch=global_batch)
            except NonFiniteLossError as e:
                good = output.last_checkpoint if output is not None else last_checkpoint
                raise NonFiniteLossError(f"{e}; stopped without saving, last good checkpoint: {good or 'none'} "
                                         "(try a lower --blr, --clip-grad or --precision fp32)") from None
            finally:
                if output is not None:
                    output.close()
        if output is not None:
            last_checkpoint = output.last_checkpoint
            if interrupted:
                print(f"stopped by signal {stop.signum} at step {step}, saved {last_checkpoint}; go on with "
                      "--resume auto")
            else:
                print(f"done: {step} of {total_steps} updates, last loss {'none' if loss is None else f'{loss:.4f}'}, "
                      f"checkpoint {last_checkpoint}")
        return PretrainResult(step=step, loss=loss, checkpoint=last_checkpoint, interrupted=interrupted)
    except RuntimeError as e:
        # a collective that timed out or lost its peer (gloo raises RuntimeError, nccl DistBackendError): one line
        if info.distributed and (isinstance(e, dist.DistError) or "gloo" in str(e)):
            raise DistributedError(lost_peer_message(e, info.rank, info.world_size, cfg.dist_timeout)) from None
        raise
    finally:
        lock.release()
        cleanup_distributed()


def _create_loader(cfg: PretrainConfig, model: nn.Module, *, split: str, train: bool, rank: int, batch_size: int):
    """The loader of the data settings (``data`` / ``synthetic``): uint8 batches with the model's size and
    channels; workers only decode (the random crop + flip run on the device)."""
    img_size, in_chans = model.input_size(), model.input_channels()
    if cfg.synthetic:
        return SyntheticImages(cfg.synthetic_samples, batch_size, img_size, cfg.seed, rank if train else 0, in_chans)
    if cfg.data is None:
        raise UserError("no data: pass --data SHARD_DIR (made by `mae-timm shards`) or --synthetic")
    sources = split_outside_braces(cfg.data)
    source = sources if len(sources) > 1 else cfg.data
    return create_loader(source, split, batch_size, train=train, img_size=img_size, in_chans=in_chans,
                         num_workers=cfg.num_workers, seed=cfg.seed, num_samples=cfg.num_samples)


def _viz_images(cfg: PretrainConfig, model: nn.Module, device: torch.device) -> torch.Tensor | None:
    """The fixed normalised batch of 8 of the reconstruction figures, from the validation split when the shards
    have one; None when figures are off or the model predicts no pixels."""
    if not (cfg.viz_every_epochs and model.predicts_pixels):
        return None
    split = cfg.split
    if not cfg.synthetic and Path(cfg.data).is_dir() and "validation" in read_info(cfg.data).get("splits", {}):
        split = "validation"
    loader = _create_loader(cfg, model, split=split, train=False, rank=0, batch_size=8)
    normalize = GpuAugment(model.pretrained_cfg["mean"], model.pretrained_cfg["std"], img_size=model.input_size())
    return normalize.to(device)(next(iter(loader))[0].to(device))
