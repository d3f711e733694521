"""Rank 0's side of a pretraining run: the run folder and what lands in it.

``config.yaml`` at the start; one ``metrics.jsonl`` record (and TensorBoard scalars) per update with a progress
bar; the numbered checkpoints that are due (``last.pt`` links the newest, the last ``keep_last`` are kept); and
every ``viz_every_epochs`` epochs the loss curve plus, for pixel models, a reconstruction grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from mae_timm.engine.checkpoint import checkpoint_path, prune_checkpoints, remove_partial_files, save_checkpoint
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.trainer import Trainer
from mae_timm.utils import atomic_write
from mae_timm.utils.settings import save_config

__all__ = ["MetricsLog", "RunOutput"]


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
        with atomic_write(self.path, "w") as f:
            f.write("".join(line + "\n" for line in kept))

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


class RunOutput:
    """The run folder of rank 0: ``log`` after every update, ``save`` when ``checkpoint_due``, ``figures``.

    ``viz_images`` (a fixed normalised batch) turns the reconstruction grid on; ``viz_every_epochs`` = 0 turns
    all figures off.
    """

    def __init__(self, cfg: PretrainConfig, record: dict, *, start_step: int, total_steps: int,
                 updates_per_epoch: int, last_checkpoint: Path | None, model: nn.Module,
                 viz_images: torch.Tensor | None):
        self.cfg, self.record, self.run_dir = cfg, record, Path(cfg.out)
        self.total_steps, self.updates_per_epoch, self.last_checkpoint = total_steps, updates_per_epoch, last_checkpoint
        self.model, self.viz_images = model, viz_images
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_files(self.run_dir)
        save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsLog(self.run_dir, start_step, cfg.tensorboard)
        from tqdm.auto import tqdm

        self.progress = tqdm(total=total_steps, initial=start_step, disable=not cfg.progress, unit="step",
                             dynamic_ncols=True)

    def log(self, step: int, loss: float, lr: float, imgs_per_s: float, grad_norm: float | None,
            metrics: dict[str, float]) -> None:
        """Record update number ``step`` (counted from 1): loss, lr, speed, grad norm when clipped, the model's
        metrics (``out.metrics``, e.g. APL's position_accuracy)."""
        record = dict(step=step, epoch=step / self.updates_per_epoch, loss=loss, lr=lr, img_per_s=imgs_per_s)
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self.metrics.log(dict(record, **metrics))
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{imgs_per_s:.0f}", refresh=False)

    def checkpoint_due(self, step: int, stopping: bool) -> bool:
        """Every ``save_every_steps`` updates, every ``save_every_epochs`` epochs, at the end, on a stop."""
        epochs_done, into_epoch = divmod(step, self.updates_per_epoch)
        epoch_checkpoint = into_epoch == 0 and epochs_done % max(self.cfg.save_every_epochs, 1) == 0
        step_checkpoint = self.cfg.save_every_steps and step % self.cfg.save_every_steps == 0
        return bool(epoch_checkpoint or step_checkpoint or step == self.total_steps or stopping)

    def save(self, trainer: Trainer, step: int) -> Path:
        """Write checkpoint ``step`` (and ``last.pt``), then drop all but the last ``keep_last`` up to ``step``.

        A checkpoint holds everything the next update depends on: the trainer's state, the update count, the data
        position ("epoch e, b batches consumed") and the record that rebuilds the model."""
        epoch, done = divmod(step, self.updates_per_epoch)
        data_position = dict(epoch=epoch, batches_consumed=done * self.cfg.accum_steps,
                             updates_per_epoch=self.updates_per_epoch)
        state = dict(trainer.state_dict(), step=step, epoch=epoch, data_position=data_position, **self.record)
        self.last_checkpoint = save_checkpoint(state, checkpoint_path(self.run_dir, step))
        prune_checkpoints(self.run_dir, self.cfg.keep_last, up_to=step)
        return self.last_checkpoint

    def figures(self, step: int) -> None:
        """Loss curve and reconstruction grid at every ``viz_every_epochs``-th epoch end and at the last update;
        skipped without matplotlib."""
        epochs_done, into_epoch = divmod(step, self.updates_per_epoch)
        every = self.cfg.viz_every_epochs
        due = into_epoch == 0 and every and epochs_done % every == 0
        if not every or not (due or step == self.total_steps):
            return
        try:
            from mae_timm.viz import save_loss_curve, save_reconstruction_grid
        except ImportError as e:
            print(f"figures skipped ({e}); pip install 'mae-timm[viz]'")
            return
        save_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        if self.viz_images is not None:
            mean, std = self.model.pretrained_cfg["mean"], self.model.pretrained_cfg["std"]  # of viz_images
            path = self.run_dir / f"reconstruction-epoch{epochs_done + (into_epoch > 0):04d}.png"
            save_reconstruction_grid(self.model, self.viz_images, path, mask_ratio=self.cfg.mask_ratio,
                                     seed=self.cfg.seed, mean=mean, std=std)
            self.model.train()

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()
