"""Checkpoints that survive ``kill -9``: atomic writes, the newest valid one on resume, the last K kept.

Layout of a run folder: ``checkpoint-0001000.pt`` (number = optimizer updates done), ``last.pt`` (a hard link to
the newest). A checkpoint is a plain dict of tensors and Python values, so ``torch.load(weights_only=True)``
reads it:
``{'model', 'model_name', 'model_kwargs', 'optimizer', 'scheduler', 'scaler', 'step', 'epoch', 'data_position',
'rng', 'world_size', 'config', 'version'}``.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from mae_timm.engine.memory import available_memory, record_size
from mae_timm.models.factory import check_record_is_data, create_model_from_record
from mae_timm.utils import NonFiniteLossError, UserError, atomic_write, fsync_dir

__all__ = [
    "capture_rng_state",
    "check_weights_fit",
    "checkpoint_path",
    "find_latest_checkpoint",
    "first_non_finite",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "prune_checkpoints",
    "remove_partial_files",
    "restore_rng_state",
    "save_checkpoint",
]

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
_REQUIRED_KEYS = ("model", "model_name", "model_kwargs", "step")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step:07d}.pt"


def list_checkpoints(run_dir: str | Path, up_to: int | None = None) -> list[Path]:
    """Numbered checkpoints in ``run_dir`` (those of step <= ``up_to`` if given), oldest first; half-written
    ``.part`` files are not listed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for step, p in sorted(found) if up_to is None or step <= up_to]


def save_checkpoint(state: dict, path: str | Path, link_last: bool = True) -> Path:
    """Write ``state`` to ``path`` with :func:`~mae_timm.utils.files.atomic_write` (temp file, fsync, rename).

    A crash at any moment leaves either the old files or the complete new one, never a truncated ``path``.
    With ``link_last``, ``last.pt`` next to it is atomically re-pointed (hard link) at the new file.

    Weights that are NaN or infinite are never saved (:class:`NonFiniteLossError`: a finite loss can still give
    an update that overflows). A full disk or an unwritable folder raises UserError naming the file, and no
    ``.part`` file stays behind.
    """
    path = Path(path)
    bad = first_non_finite(state["model"])
    if bad is not None:
        raise NonFiniteLossError(f"the weights hold NaN or inf ({bad}), {path.name} not saved")
    with atomic_write(path) as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:  # torch reports a failed write (full disk, size limit) as a RuntimeError
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None  # atomic_write names the file and removes the temp file
            raise
    if link_last:
        last = path.parent / "last.pt"
        last_tmp = path.with_name(f".last.pt.{os.getpid()}.part")
        try:
            last_tmp.unlink(missing_ok=True)
            os.link(path, last_tmp)
            os.replace(last_tmp, last)
        except OSError as e:
            last_tmp.unlink(missing_ok=True)
            raise UserError(f"cannot link {last} to {path.name}: {e.strerror or e}") from e
        fsync_dir(path.parent)
    return path


def first_non_finite(weights: dict) -> str | None:
    """The name of the first floating tensor of ``weights`` that holds NaN or inf, else None (one device sync)."""
    floats = {name: t for name, t in weights.items() if torch.is_tensor(t) and t.is_floating_point()}
    if floats and not torch.stack([t.isfinite().all() for t in floats.values()]).all().item():
        return next(name for name, t in floats.items() if not t.isfinite().all())
    return None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; raises ``ValueError`` for a file that is not one."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated or corrupt files raise assorted errors from the zip / unpickler
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED_KEYS):
        raise ValueError(f"{path} is not a mae_timm checkpoint (needs keys {', '.join(_REQUIRED_KEYS)})")
    return ckpt


def find_latest_checkpoint(run_dir: str | Path, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint in ``run_dir`` that loads, with its contents; unreadable ones are skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except ValueError as e:
            print(f"skipping {e}")
    return None


def prune_checkpoints(run_dir: str | Path, keep_last: int, up_to: int | None = None) -> None:
    """Delete all but the newest ``keep_last`` numbered checkpoints (0 keeps all).

    With ``up_to`` (the running step) only checkpoints of steps <= ``up_to`` are considered: files numbered
    higher are not this run's past, and deleting them is not this run's call.
    """
    for path in list_checkpoints(run_dir, up_to)[:-keep_last] if keep_last > 0 else []:
        path.unlink(missing_ok=True)


def remove_partial_files(run_dir: str | Path) -> None:
    """Delete temp files that a killed run left behind."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for path in run_dir.glob("*.part"):
            path.unlink(missing_ok=True)


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states as plain values and tensors."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (bit_generator, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state`` (CUDA states only where the device count matches)."""
    random.setstate(_to_tuple(state["python"]))
    bit_generator, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((bit_generator, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_tuple(value):
    """``random.setstate`` wants nested tuples; keep them tuples after any round trip through lists."""
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_model(path: str | Path, map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the pretext model of a checkpoint (a registered ``model_name`` or a ``pretext`` over a timm
    ``encoder``, see :func:`mae_timm.models.factory.create_model_from_record`), strict load.

    Returns ``(model in eval mode, checkpoint dict)``. A model name that is not registered, kwargs the model does
    not take, weights of another model, or a model larger than this process may allocate raise UserError in one
    line; the sizes are compared on the meta device, before any weight is allocated.
    """
    ckpt = load_checkpoint(path, map_location)
    name = ckpt["model_name"]
    check_record_is_data(ckpt, f"checkpoint {path}")  # building the model reads nothing but this file
    bad = first_non_finite(ckpt["model"])  # NaN weights give a kNN accuracy, a figure or an export that mean nothing
    if bad is not None:
        raise UserError(f"checkpoint {path}: the weights hold NaN or inf ({bad}); it cannot be evaluated, drawn or "
                        "exported")
    try:
        elements, _, meta_model, full = record_size(ckpt)
        stored = sum(t.numel() for t in ckpt["model"].values() if torch.is_tensor(t))
        if full:
            check_weights_fit(meta_model, ckpt["model"], path)  # names and shapes, checked without allocating
        elif elements != stored:  # a record that describes another (maybe far larger) model than its weights
            raise UserError(f"checkpoint {path}: its model_kwargs describe {name} with {elements:,} weights, its "
                            f"weights hold {stored:,}; is it a checkpoint of another model or other model_kwargs?")
        have, bound = available_memory(torch.device("cpu"))
        if 4 * elements > have:
            raise UserError(f"checkpoint {path}: {name} needs {4 * elements / 2**30:.1f} GiB, more than the "
                            f"{have / 2**30:.1f} GiB of {bound}")
        model = create_model_from_record(ckpt)
    except TypeError as e:  # an unexpected keyword argument
        raise UserError(f"checkpoint {path}: {name} cannot be built with its model_kwargs ({e})") from None
    load_weights(model, ckpt["model"], path)
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval(), ckpt


def load_weights(model: torch.nn.Module, state_dict: dict, path: str | Path) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, or UserError in one line saying how they differ."""
    check_weights_fit(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)


def check_weights_fit(model: torch.nn.Module, state_dict: dict, path: str | Path) -> None:
    """UserError in one line unless ``state_dict`` has exactly ``model``'s tensor names and shapes (``model`` may
    live on the meta device)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(keys)} {what} (first {keys[0]})" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if keys]
        raise UserError(f"the weights in {path} do not fit {type(model).__name__}: tensors {', '.join(parts)}; "
                        "is it a checkpoint of another model or other model_kwargs?")
