"""Who writes a run folder, and which checkpoint a run starts from.

Resume: ``--resume`` (none / ``auto`` / a path) read against the run folder.

Rank 0 chooses and every other rank loads the file it names, so all ranks start from the same step even while
a checkpoint is being written or tidied away. A fresh run refuses a folder that holds checkpoints, and a run
from an older checkpoint refuses a folder that holds later ones: either would leave ``--resume auto`` to pick
another run's newer files.

The run lock: one writer per run folder, an advisory lock on ``<run folder>/run.lock`` that names the owner's
pid and host. A second run on the same ``--out`` (a fresh run, or ``--resume auto`` while the first still
writes) stops at once with one line naming the owner, instead of removing the first run's temp files or rewriting
its ``metrics.jsonl``. The lock is a POSIX record lock (``fcntl.lockf``): the kernel drops it when the owner
exits, even by ``kill -9``, so a file left behind never blocks a resume, and forked DataLoader workers do not
inherit it. The file stays in the folder (removing it would let two runs lock two different files of one name).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path

from mae_timm.data.shards import read_info
from mae_timm.engine.checkpoint import find_latest_checkpoint, list_checkpoints, load_checkpoint
from mae_timm.engine.train.distributed import broadcast_object
from mae_timm.utils import UserError

__all__ = [
    "LOCK_NAME", "RunLock", "agree_on_resume", "check_resumable", "choose_resume", "data_identity", "lock_on_main",
]


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


def data_identity(data: str | None, split: str, synthetic: bool, synthetic_samples: int) -> str:
    """What names the images of a run: the sha256 of the split's shards as ``_info.json`` records them (a local
    shard directory), the shard list itself (urls), or the synthetic settings."""
    if synthetic:
        return f"synthetic:{synthetic_samples}"
    if data is not None and (Path(data) / "_info.json").is_file():
        shards = read_info(data)["splits"][split]
        digests = json.dumps(shards.get("sha256") or shards, sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(digests).hexdigest()
    return f"shards:{data}:{split}"


# what a resume reads from a checkpoint (load_weights then checks the model's own keys)
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "data_position", "step")


def check_resumable(ckpt: dict, path: Path, model_name: str, updates_per_epoch: int, *, world_size: int = 1,
                    batch_size: int | None = None, accum_steps: int | None = None, seed: int | None = None,
                    data: str | None = None, force: bool = False) -> None:
    """A checkpoint continues this run only with the same model and the same data layout: its step counts updates
    of ``updates_per_epoch`` per epoch, made by ``world_size`` processes of ``batch_size`` x ``accum_steps``
    images (checked where the checkpoint records them). The same seed and data (:func:`data_identity`) too, unless
    ``force`` (``--force-resume``): another seed or other images would silently give another run."""
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    position, step = ckpt.get("data_position"), ckpt.get("step")
    if missing or not isinstance(position, dict) or not isinstance(position.get("updates_per_epoch"), int):
        raise UserError(f"checkpoint {path} cannot be resumed: it lacks {', '.join(missing) or 'data_position'} "
                        "(a checkpoint of weights only can be evaluated or exported, not continued)")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"checkpoint {path} cannot be resumed: its step {str(step)[:40]!r} is not a count of updates")
    if ckpt["model_name"] != model_name:
        raise UserError(f"checkpoint {path} is of {ckpt['model_name']}, not --model {model_name}")
    saved = dict(ckpt.get("config") or {}, world_size=ckpt.get("world_size"), data=ckpt.get("data_identity"))

    def differences(**ours) -> list[str]:  # settings the checkpoint records with another value than this run's
        return [f"{k} {saved[k]} (now {v})" for k, v in ours.items() if v is not None and saved.get(k) not in (None, v)]

    other = differences(seed=seed, data=data)
    if other and not force:
        raise UserError(f"checkpoint {path} was made with {', '.join(other)}: resume with the same seed and data, "
                        "pass --force-resume to continue anyway, or start a new --out")
    differ = differences(world_size=world_size, batch_size=batch_size, accum_steps=accum_steps)
    if differ:
        raise UserError(
            f"checkpoint {path} was made with {', '.join(differ)}: resume with the same batch size, accum steps and "
            "process count (the global batch and data order depend on them), or start a new --out"
        )
    if position["updates_per_epoch"] != updates_per_epoch:
        raise UserError(
            f"checkpoint {path} has {position['updates_per_epoch']} updates per epoch, this run "
            f"{updates_per_epoch}: resume with the same data, batch size, accum steps and process count"
        )


LOCK_NAME = "run.lock"
_HELD: set[Path] = set()  # folders this process holds: POSIX locks do not keep out the owner's own second try


class RunLock:
    """The lock of one run folder: ``acquire`` (UserError naming the owner when another process holds it),
    ``release``."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        key = self.path.resolve()
        if key in _HELD:  # checked before opening: closing any descriptor of the file would drop our own lock
            self._refuse(f"pid {os.getpid()} on host {socket.gethostname()}")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the lock file {self.path}: {e.strerror or e}") from e
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 200).decode("utf-8", "replace").strip()
            os.close(fd)
            self._refuse(owner or "another process")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd
        _HELD.add(key)

    def _refuse(self, owner: str) -> None:
        raise UserError(f"{self.run_dir} is in use by {owner} (lock file {self.path}): wait until that run ends or "
                        "choose another --out")

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self.path.resolve())
            os.close(self._fd)
            self._fd = None


def lock_on_main(lock: RunLock, is_main: bool) -> None:
    """Rank 0 takes ``lock``; its refusal is raised on every rank."""
    error = None
    if is_main:
        try:
            lock.acquire()
        except UserError as e:
            error = e
    error = broadcast_object(error)
    if error is not None:
        raise error
