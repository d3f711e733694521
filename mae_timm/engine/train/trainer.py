"""One pretraining update: :meth:`Trainer.step`, the math only, as the official ``engine_pretrain.py`` reads.

Forward under autocast, scaled backward with gradient accumulation (DDP all-reduces on the last micro-batch only),
clip, optimizer step, schedule. No update waits for the device: the statistics come back as device tensors, and
the run loop (``loop.py``) reads them one update later.

``compile``: ``off``, ``default`` (inductor kernels), ``max-autotune`` (autotuned matmuls, CUDA graphs),
``reduce-overhead`` (inductor plus CUDA graphs of the forward and backward), or ``auto`` (``execution.py`` decides,
by measurement on the CPU). Shapes are static (``dynamic=False``): the training loader yields full batches only
and the masks keep exactly ``len_keep`` tokens per sample, so one graph serves every update.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel

from mae_timm.data import GpuAugment
from mae_timm.engine.checkpoint import capture_rng_state, first_non_finite, load_weights, restore_rng_state
from mae_timm.engine.train.config import COMPILE_MODES, PretrainConfig
from mae_timm.engine.train.distributed import DistInfo
from mae_timm.engine.train.execution import choose_compile, choose_precision
from mae_timm.utils import UserError, autocast, cpu_bf16_units

__all__ = ["COMPILE_MODES", "Trainer", "build_trainer", "compile_model", "create_optimizer_and_schedule"]


@dataclass
class Trainer:
    """The model and what updates it; ``state_dict`` / ``load_state_dict`` are a checkpoint's content."""

    model: nn.Module  # the bare model: its state_dict is what checkpoints hold
    train_model: nn.Module  # the model as called: DDP and / or torch.compile around `model`
    ddp_model: DistributedDataParallel | None
    augment: nn.Module  # uint8 (N, C, H, W) -> cropped, flipped, normalised float, on the device
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None  # None: fp32
    mask_ratio: float | None  # None: the model takes no mask ratio (APL)
    clip_grad: float | None
    device: torch.device
    compile_mode: str  # one of COMPILE_MODES
    fp32_attention: bool | None = None  # attention in fp32 under autocast; None: on the CPU only (utils.autocast)
    notes: list[str] = field(default_factory=list)  # one log line per choice made for this run (precision, compile)

    def step(self, update: int, micro_batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Update number ``update`` (from 0) from its micro-batches (uint8 (N, C, H, W) each) -> this process's
        statistics as () device tensors: ``loss`` and the model's ``out.metrics`` (means over the micro-batches),
        ``grad_norm`` when clipping. Nothing here waits for the device."""
        self.scheduler.step_update(update)
        kwargs = {} if self.mask_ratio is None else dict(mask_ratio=self.mask_ratio)
        sums = {"loss": torch.zeros((), device=self.device)}
        for i, imgs in enumerate(micro_batches):
            imgs = self.augment(imgs.to(self.device, non_blocking=True))  # uint8 -> cropped, flipped, normalised
            last = i == len(micro_batches) - 1  # DDP all-reduces the gradients on the last micro-batch only
            with contextlib.nullcontext() if self.ddp_model is None or last else self.ddp_model.no_sync():
                with autocast(self.device, self.autocast_dtype, self.fp32_attention):
                    out = self.train_model(imgs, **kwargs)
                self.scaler.scale(out.loss / len(micro_batches)).backward()
            for name, value in dict(loss=out.loss, **out.metrics).items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        stats = {name: total / len(micro_batches) for name, total in sums.items()}
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            stats["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)  # a tensor
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    @property
    def lr(self) -> float:
        """The learning rate of the last update (the schedule sets it at the start of each)."""
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """The model, optimizer, schedule, scaler and RNG states, as plain values and tensors (``weights_only``)."""
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), rng=capture_rng_state())

    def load_state_dict(self, ckpt: dict) -> None:
        """Restore what :meth:`state_dict` wrote (the checkpoint was checked by ``resume.check_resumable``)."""
        # NaN in the weights or the AdamW moments makes the first update NaN, and the error would then blame it
        states = ckpt["optimizer"].get("state", {}).items()
        moments = {f"optimizer moment {k} of parameter {i}": v for i, state in states for k, v in state.items()
                   if torch.is_tensor(v)}
        bad = first_non_finite({**ckpt["model"], **moments})
        if bad:
            raise UserError(f"the checkpoint holds NaN or inf ({bad}); it cannot be resumed: resume from an earlier "
                            "checkpoint (--resume PATH) or start a new --out")
        load_weights(self.model, ckpt["model"], "the checkpoint")  # other model_kwargs: one UserError line
        try:
            self._load_training_state(ckpt)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:  # a state of another shape
            raise UserError(f"the checkpoint's optimizer, schedule, scaler or rng state does not fit this run "
                            f"({type(e).__name__}: {str(e)[:120]})") from None

    def _load_training_state(self, ckpt: dict) -> None:
        # this run's AdamW kernel (fused on CUDA) wins over the one the checkpoint was written with
        kernel = [{key: group[key] for key in ("foreach", "fused")} for group in self.optimizer.param_groups]
        saved = ckpt["optimizer"]
        groups = [dict(group, **chosen) for group, chosen in zip(saved["param_groups"], kernel, strict=True)]
        self.optimizer.load_state_dict(dict(saved, param_groups=groups))
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt["rng"])


def build_trainer(cfg: PretrainConfig, model: nn.Module, info: DistInfo, *, lr: float, updates_per_epoch: int,
                  planned_updates: int = 0, run_dir: Path | None = None) -> Trainer:
    """What updates ``model`` (on its device, in train mode) as ``cfg`` says: DDP and ``torch.compile`` around it,
    the device augmentation, AdamW (fused on CUDA) + schedule, the gradient scaler and autocast.

    ``precision`` / ``compile`` ``auto`` are chosen for ``planned_updates`` updates by ``execution.py``, which may
    time a few updates of copies of ``model`` (the global RNG states are left as they were); ``run_dir`` keeps the
    precision choice for a resumed run. Every rank takes rank 0's choices.
    """
    def time_updates(dtypes: dict, updates: int) -> dict[str, list[float]]:
        return _time_updates(cfg, model, info, dtypes, updates, lr=lr, updates_per_epoch=updates_per_epoch)

    key = dict(model=cfg.model, model_kwargs=cfg.model_kwargs, pretext=cfg.pretext, encoder=cfg.encoder,
               encoder_kwargs=cfg.encoder_kwargs, img_size=cfg.img_size, batch_size=cfg.batch_size,
               threads=torch.get_num_threads(), cpu=cpu_bf16_units(), torch=torch.__version__)
    dtype, precision_note = choose_precision(cfg.precision, info.device, planned_updates=planned_updates,
                                             time_updates=time_updates, run_dir=run_dir, key=key)
    compile_mode, compile_note = choose_compile(
        cfg.compile, info.device, planned_updates=planned_updates,
        eager_seconds=lambda: statistics.median(time_updates({"eager": dtype}, 2)["eager"]),
    )
    if info.distributed:  # ranks that timed differently still train alike
        choices = [dtype, precision_note, compile_mode, compile_note]
        torch.distributed.broadcast_object_list(choices, src=0)
        dtype, precision_note, compile_mode, compile_note = choices
    ddp_model = None
    if info.distributed:  # gradients are all-reduced during backward
        ddp_model = DistributedDataParallel(model, device_ids=[info.device] if info.device.type == "cuda" else None)
    return _assemble(cfg, model, info, dtype, lr=lr, updates_per_epoch=updates_per_epoch, ddp_model=ddp_model,
                     compile_mode=compile_mode, notes=[precision_note, compile_note])


def _assemble(cfg: PretrainConfig, model: nn.Module, info: DistInfo, dtype: torch.dtype | None, *, lr: float,
              updates_per_epoch: int, ddp_model: DistributedDataParallel | None = None, compile_mode: str = "off",
              notes: list[str] | None = None) -> Trainer:
    """The trainer of ``model`` in the precision ``dtype`` (eager and without DDP by default)."""
    optimizer, scheduler = create_optimizer_and_schedule(
        model, cfg, lr, updates_per_epoch, fused=info.device.type == "cuda",  # one kernel; the CPU: torch's default
    )
    return Trainer(
        model=model,
        train_model=compile_model(ddp_model or model, compile_mode),
        ddp_model=ddp_model,
        augment=GpuAugment(  # uint8 -> RandomResizedCrop + flip -> normalised float, on the device
            model.pretrained_cfg["mean"], model.pretrained_cfg["std"], img_size=model.input_size(),
            random_crop=True, scale=(cfg.crop_scale_min, 1.0), hflip=0.5 * cfg.hflip,
        ).to(info.device),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(info.device.type, enabled=dtype is torch.float16),
        autocast_dtype=dtype,
        mask_ratio=cfg.mask_ratio if model.takes_mask_ratio else None,
        clip_grad=cfg.clip_grad,
        device=info.device,
        compile_mode=compile_mode,
        notes=notes or [],
    )


def _time_updates(cfg: PretrainConfig, model: nn.Module, info: DistInfo, dtypes: dict, updates: int, *, lr: float,
                  updates_per_epoch: int) -> dict[str, list[float]]:
    """Seconds of ``updates`` eager updates per named dtype, each on its own copy of ``model`` at the run's batch
    size, interleaved after one untimed update each; the global RNG states are restored afterwards."""
    shape = (cfg.batch_size, model.input_channels(), model.input_size(), model.input_size())
    with torch.random.fork_rng(devices=[info.device] if info.device.type == "cuda" else []):
        images = torch.randint(0, 256, shape, dtype=torch.uint8, device=info.device)
        trainers = {name: _assemble(cfg, copy.deepcopy(model), info, dtype, lr=lr,
                                    updates_per_epoch=updates_per_epoch) for name, dtype in dtypes.items()}
        times = {name: [] for name in trainers}
        names = list(trainers)
        for update in range(updates + 1):
            for name in names[update % len(names):] + names[:update % len(names)]:  # rotated: drift hits all alike
                trainer = trainers[name]
                started = time.perf_counter()
                trainer.step(update, [images])["loss"].item()  # waits for the device
                if update:
                    times[name].append(time.perf_counter() - started)
    return times


def create_optimizer_and_schedule(model: nn.Module, cfg: PretrainConfig, lr: float, updates_per_epoch: int,
                                  fused: bool = False):
    """AdamW (timm: no decay on 1-d params and ``model.no_weight_decay()``) and the per-update warmup + cosine.

    ``fused``: torch's fused AdamW kernel (CUDA); otherwise torch's default implementation.
    """
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                                    **(dict(fused=True) if fused else {}))
    # MAE: the cosine spans the epochs after warmup, so the warmup is a prefix of the `epochs` total
    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=cfg.epochs - cfg.warmup_epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_prefix=True, warmup_lr=0.0, min_lr=cfg.min_lr, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return optimizer, scheduler


def compile_model(model: nn.Module, mode: str, backend: str = "inductor") -> nn.Module:
    """``model`` under ``torch.compile`` in ``mode`` with static shapes, or ``model`` itself when ``mode`` is off.

    ``backend`` other than inductor (``aot_eager`` in the CPU tests: the same graphs, forward and backward, run by
    eager kernels) takes no mode.
    """
    if mode == "off":
        return model
    options = dict(mode=mode) if backend == "inductor" else {}
    return torch.compile(model, backend=backend, dynamic=False, **options)
