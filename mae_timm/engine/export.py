"""Artifacts that timm and transformers load with no glue.

* :func:`export_timm_folder`: the encoder as a timm ``local-dir`` folder (``config.json`` + ``model.safetensors``,
  written by timm's own ``save_for_hf``): ``timm.create_model('local-dir:DIR', pretrained=True, num_classes=N)``
  and timm's ``train.py --model local-dir:DIR --pretrained --num-classes N`` rebuild the encoder's architecture
  (``encoder_architecture()`` + ``encoder_kwargs()``, pooling included) and read mean/std, input size, crop and
  interpolation from the config.
* :func:`save_timm_folder`: any timm model (e.g. a fine-tuned classifier) in that format, with metrics.
* :func:`export_hf_folder`: a late-mask MAE as a transformers folder (``config.json``, ``model.safetensors``,
  ``preprocessor_config.json``) for ``ViTMAEForPreTraining`` / ``ViTMAEModel`` / ``AutoImageProcessor``.
* :func:`export_safetensors`: the encoder's plain state dict as one ``.safetensors`` file.

Every writer checks what it wrote by loading it the way a user will, and only a checked artifact gets its name
(a folder is written under a temporary name beside ``out`` and renamed; a file through ``runtime.atomic_write``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.models._hub import save_for_hf

import mae_timm
from mae_timm.utils import UserError, atomic_write, fsync_dir

__all__ = [
    "atomic_folder",
    "create_model_line",
    "encoder_pretrained_cfg",
    "export_hf_folder",
    "export_safetensors",
    "export_timm_folder",
    "save_finetuned",
    "save_timm_folder",
    "train_py_line",
]

# what the folders may hold: a folder with anything else is never replaced
_TIMM_FILES = {"config.json", "model.safetensors"}
_HF_FILES = {"config.json", "model.safetensors", "preprocessor_config.json"}
# pretrained_cfg keys that describe where weights came from or what timm's source model was trained on
_SOURCE_KEYS = ("url", "hf_hub_id", "file", "source", "tag", "notes", "paper_ids", "paper_name", "origin_url")


@contextlib.contextmanager
def atomic_folder(out: str | Path, allowed: set[str]) -> Iterator[Path]:
    """Yield an empty temp folder beside ``out``; on a clean exit it replaces ``out``.

    ``out`` must be absent, empty, or an earlier artifact (only ``allowed`` file names): anything else is refused
    before writing. An exception leaves ``out`` as it was and removes the temp folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; name a folder for the export")
    if out.is_dir() and not {p.name for p in out.iterdir()} <= allowed:
        raise UserError(f"{out} holds other files than an export ({sorted(allowed)}); name a new or empty folder")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        for path in tmp.iterdir():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        if out.exists():  # a folder cannot be renamed over a non-empty one: move the old export aside first
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(out.parent)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _vit_input_size(vit: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) a timm ViT is built for: its patch embedding's channels and image size."""
    return (vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)


def encoder_pretrained_cfg(model: nn.Module, vit: nn.Module) -> dict:
    """The timm ``pretrained_cfg`` of ``vit``, a timm model built from pretext ``model``'s encoder: the pretext
    model's preprocessing (mean/std, crop, interpolation, licence) under the encoder's architecture name, with
    ``vit``'s input size and class count."""
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _SOURCE_KEYS and v is not None}
    return dict(
        cfg,
        architecture=model.encoder_architecture(),
        input_size=_vit_input_size(vit),
        fixed_input_size=True,
        num_classes=vit.num_classes,
        classifier="head",
        first_conv="patch_embed.proj",
        pool_size=None,
    )


def save_timm_folder(
    vit: nn.Module,
    out_dir: str | Path,
    *,
    pretrained_cfg: dict,
    metrics: dict | None = None,
    source: dict | None = None,
) -> Path:
    """Write a timm model as a ``local-dir`` folder (timm's ``save_for_hf``: ``config.json`` + ``model.safetensors``).

    ``pretrained_cfg`` (mean/std, input size, ...) goes into ``config.json``, beside timm's ``model_args`` (the
    kwargs that rebuild ``vit``); ``metrics`` and ``source`` go into its ``mae_timm`` entry, which timm ignores.
    The folder is renamed into place only after ``timm.create_model('local-dir:...', pretrained=True)`` rebuilt it
    with identical outputs; otherwise ``ValueError`` and ``out_dir`` stays as it was.
    """
    vit = copy.deepcopy(vit).cpu().eval()  # the caller's model (maybe training, on a GPU) stays as it is
    vit.pretrained_cfg = dict(pretrained_cfg)  # save_for_hf reads the preprocessing from the model's cfg
    record = dict(version=mae_timm.__version__, source=source or {}, metrics=metrics or {})
    out_dir = Path(out_dir)
    with atomic_folder(out_dir, _TIMM_FILES) as tmp:
        save_for_hf(vit, str(tmp), model_config=dict(mae_timm=record), safe_serialization=True)
        _check_same_outputs(vit, timm.create_model(f"local-dir:{tmp}", pretrained=True), out_dir)
    return out_dir


def export_timm_folder(model: nn.Module, out_dir: str | Path, *, source: dict | None = None) -> Path:
    """``model``'s encoder (``mae_timm.create_timm_encoder``, ``num_classes=0``) as a timm ``local-dir`` folder."""
    vit = mae_timm.create_timm_encoder(model).cpu()
    return save_timm_folder(vit, out_dir, pretrained_cfg=encoder_pretrained_cfg(model, vit), source=source)


def save_finetuned(
    classifier: nn.Module, model: nn.Module, out_dir: str | Path, metrics: dict, best: tuple[dict, dict] | None = None
) -> dict[str, str]:
    """A fine-tuned classifier of pretext ``model``'s encoder as timm ``local-dir`` folders with their metrics:
    ``out_dir/last`` (the final weights) and, when model selection kept one, ``out_dir/best`` (``best`` =
    (state dict, metrics) chosen on a held-out part of the training split). Returns {'last': path, 'best': path}."""
    cfg = encoder_pretrained_cfg(model, classifier)
    saved = {"last": save_timm_folder(classifier, Path(out_dir) / "last", pretrained_cfg=cfg, metrics=metrics)}
    if best is not None:
        best_classifier = copy.deepcopy(classifier).cpu()
        best_classifier.load_state_dict(best[0])
        saved["best"] = save_timm_folder(best_classifier, Path(out_dir) / "best", pretrained_cfg=cfg, metrics=best[1])
    return {k: str(v) for k, v in saved.items()}


@torch.no_grad()
def _check_same_outputs(reference: nn.Module, loaded: nn.Module, out: Path) -> None:
    """Raise unless ``loaded`` (what a user gets) computes what ``reference`` computes, bit for bit."""
    x = torch.randn(2, *_vit_input_size(reference))
    if not torch.equal(loaded.eval()(x), reference(x)):
        raise ValueError(f"export not written: {out} reloaded gives other outputs than the model")


def train_py_line(out_dir: str | Path, num_classes: str | int = "N") -> str:
    """The timm ``train.py`` command that fine-tunes an exported folder (nothing else is needed)."""
    return f"python train.py --model local-dir:{out_dir} --pretrained --num-classes {num_classes} --data-dir DATA"


def create_model_line(arch: str, kwargs: dict, checkpoint_path: str | Path | None = None) -> str:
    """The ``timm.create_model(...)`` call that rebuilds an exported encoder, as Python source: a ``local-dir``
    folder (``arch`` 'local-dir:DIR', no kwargs) or a plain file (``checkpoint_path``)."""
    args = [repr(arch)] + [f"{k}={v!r}" for k, v in kwargs.items() if k != "num_classes"]
    if checkpoint_path is None:
        args += ["pretrained=True", "num_classes=0"]
    else:
        args += ["num_classes=0", f"checkpoint_path={str(checkpoint_path)!r}"]
    return f"timm.create_model({', '.join(args)})"


def export_safetensors(model: nn.Module, path: str | Path, *, source: dict | None = None) -> tuple[str, dict]:
    """Write ``model``'s encoder state dict to ``path`` (.safetensors) and check that timm loads it to identical
    features; a failed check raises ``ValueError`` and leaves ``path`` as it was.

    The metadata records the timm architecture (``encoder_architecture()``), its kwargs (``encoder_kwargs()``), the
    mean/std and ``source``. Returns the architecture and the kwargs for ``timm.create_model`` (besides
    ``num_classes=0`` and ``checkpoint_path``).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"export writes safetensors; name the output *.safetensors, not {path.name}")
    arch, kwargs = model.encoder_architecture(), mae_timm.encoder_kwargs(model)
    kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    state = {k: v.detach().cpu().contiguous() for k, v in mae_timm.export_encoder(model).items()}
    metadata = {
        "format": "pt",
        "timm_architecture": arch,
        "timm_kwargs": json.dumps(dict(kwargs, num_classes=0)),
        "mean": json.dumps(list(model.pretrained_cfg["mean"])),
        "std": json.dumps(list(model.pretrained_cfg["std"])),
        "mae_timm_version": mae_timm.__version__,
        "source": json.dumps(source or {}),
    }
    data = safetensors.torch.save(state, metadata=metadata)
    with atomic_write(path, suffix=".safetensors") as f:  # only a checked file ever carries the name
        f.write(data)
        f.flush()
        loaded = timm.create_model(arch, **kwargs, num_classes=0, checkpoint_path=f.name)
        _check_same_outputs(mae_timm.create_timm_encoder(model).cpu().eval(), loaded, path)
    return arch, kwargs


def export_hf_folder(model: nn.Module, out_dir: str | Path, *, mask_ratio: float = 0.75) -> Path:
    """A late-mask MAE as a transformers folder: ``ViTMAEForPreTraining`` weights and config (``mask_ratio`` is
    HF's fixed masking ratio; LayerNorm eps 1e-6) and a ``ViTImageProcessor`` with the model's mean/std and size.

    Checked before it gets its name: ``ViTMAEForPreTraining.from_pretrained`` gives the model's loss and prediction
    for the same ``noise``.
    """
    from mae_timm.models.convert import hf_image_processor, mae_timm_to_hf

    hf_model = mae_timm_to_hf(model.cpu(), mask_ratio=mask_ratio).eval()
    processor = hf_image_processor(model)
    out_dir = Path(out_dir)
    with atomic_folder(out_dir, _HF_FILES) as tmp:
        hf_model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _check_hf_folder(model, tmp, mask_ratio, out_dir)
    return out_dir


@torch.no_grad()
def _check_hf_folder(model: nn.Module, folder: Path, mask_ratio: float, out: Path) -> None:
    from transformers import ViTMAEForPreTraining

    loaded = ViTMAEForPreTraining.from_pretrained(folder).eval()
    x = torch.randn(2, model.input_channels(), model.input_size(), model.input_size())
    noise = torch.rand(2, model.patch_embed.num_patches)
    theirs = loaded(pixel_values=x, noise=noise)
    ours = model.eval()(x, mask_ratio=mask_ratio, noise=noise)
    if not torch.allclose(theirs.logits, ours.pred, atol=1e-4, rtol=1e-4):
        raise ValueError(f"export not written: {out} loaded in ViTMAEForPreTraining predicts other pixels")
