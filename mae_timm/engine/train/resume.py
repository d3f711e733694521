"""Which checkpoint a run starts from: ``--resume`` (none / ``auto`` / a path) read against the run folder.

Rank 0 chooses and every other rank loads the file it names, so all ranks start from the same step even while
a checkpoint is being written or tidied away. A fresh run refuses a folder that holds checkpoints, and a run
from an older checkpoint refuses a folder that holds later ones: either would leave ``--resume auto`` to pick
another run's newer files.
"""

from __future__ import annotations

from pathlib import Path

from mae_timm.engine.checkpoint import find_latest_checkpoint, list_checkpoints, load_checkpoint
from mae_timm.engine.train.distributed import broadcast_object
from mae_timm.utils import UserError

__all__ = ["agree_on_resume", "check_resumable", "choose_resume"]


def choose_resume(resume: str | None, run_dir: Path) -> tuple[Path, dict] | None:
    """``--resume`` and the run folder -> (checkpoint path, its content), or None for a fresh run."""
    if resume is None:
        if list_checkpoints(run_dir):
            raise UserError(
                f"{run_dir} already holds checkpoints of a run: pass --resume auto to continue it or choose a new --out"
            )
        return None
    if resume == "auto":
        found = find_latest_checkpoint(run_dir)
        if found is None:
            print(f"--resume auto: no checkpoint in {run_dir}, starting from scratch")
        return found
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint file")
    ckpt = load_checkpoint(path)
    up_to_step = list_checkpoints(run_dir, ckpt["step"])
    later = [p.name for p in list_checkpoints(run_dir) if p not in up_to_step]
    if later:
        raise UserError(
            f"{run_dir} holds checkpoints after step {ckpt['step']} of {path} ({', '.join(later)}): "
            "choose a new --out to continue from this checkpoint"
        )
    return path, ckpt


def agree_on_resume(resume: str | None, run_dir: Path, is_main: bool) -> tuple[Path, dict] | None:
    """The checkpoint every rank resumes from: rank 0 chooses, the others load the file it names.

    An error on rank 0 is raised on every rank.
    """
    chosen = error = None
    if is_main:
        try:
            chosen = choose_resume(resume, run_dir)
        except (ValueError, OSError) as e:
            error = e
    path, error = broadcast_object((chosen[0] if chosen else None, error))
    if error is not None:
        raise error
    if path is None or is_main:
        return chosen
    return path, load_checkpoint(path)


def check_resumable(ckpt: dict, path: Path, model_name: str, updates_per_epoch: int, *, world_size: int = 1,
                    batch_size: int | None = None, accum_steps: int | None = None) -> None:
    """A checkpoint continues this run only with the same model and the same data layout: its step counts updates
    of ``updates_per_epoch`` per epoch, made by ``world_size`` processes of ``batch_size`` x ``accum_steps``
    images (checked where the checkpoint records them)."""
    if ckpt["model_name"] != model_name:
        raise UserError(f"checkpoint {path} is of {ckpt['model_name']}, not --model {model_name}")
    saved = dict(ckpt.get("config") or {}, world_size=ckpt.get("world_size"))
    ours = dict(world_size=world_size, batch_size=batch_size, accum_steps=accum_steps)
    differ = [f"{k} {saved[k]} (now {v})" for k, v in ours.items() if v is not None and saved.get(k) not in (None, v)]
    if differ:
        raise UserError(
            f"checkpoint {path} was made with {', '.join(differ)}: resume with the same batch size, accum steps and "
            "process count (the global batch and data order depend on them), or start a new --out"
        )
    if ckpt["data_position"]["updates_per_epoch"] != updates_per_epoch:
        raise UserError(
            f"checkpoint {path} has {ckpt['data_position']['updates_per_epoch']} updates per epoch, this run "
            f"{updates_per_epoch}: resume with the same data, batch size, accum steps and process count"
        )
