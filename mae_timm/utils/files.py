"""Files that reach their final name whole: :func:`atomic_write` (temp file in the same folder, fsync, rename,
fsync of the folder) is how checkpoints, shards, metrics, results and exports are written."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from mae_timm.utils.errors import UserError

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", suffix: str = "") -> Iterator:
    """Open a temp file beside ``path``; on a clean exit it is flushed, fsynced and renamed to ``path``.

    A crash (or an exception) at any moment leaves either the old file or the complete new one, never a
    truncated ``path``; the temp file ``.<name>.<pid>.part<suffix>`` is removed on an exception, so the block
    may check the written file (``f.name``) and raise to keep ``path`` as it was. ``suffix`` serves readers that
    go by the file's ending (timm loads ``*.safetensors``). A full disk or an unwritable folder raises UserError
    naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def _remove(path: Path) -> None:
    """Delete ``path`` if it is there (it may never have been created, e.g. below a file)."""
    with contextlib.suppress(OSError):
        path.unlink()
