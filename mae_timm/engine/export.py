"""Artifacts that timm and transformers load with no glue.

* :func:`export_timm_folder`: the encoder as a timm ``local-dir`` folder (``config.json`` + ``model.safetensors``,
  written by timm's own ``save_for_hf``): ``timm.create_model('local-dir:DIR', pretrained=True, num_classes=N)``
  and timm's ``train.py --model local-dir:DIR --pretrained --num-classes N`` rebuild the encoder's architecture
  (``encoder_architecture()`` + ``encoder_kwargs()``, pooling included) and read mean/std, input size, crop and
  interpolation from the config.
* :func:`save_timm_folder`: any timm model (e.g. a fine-tuned classifier, with its label names) in that format.
* :func:`export_hf_folder`: the encoder as a plain transformers ViT (``ViTModel`` / ``ViTForImageClassification``
  / ``pipeline('image-feature-extraction')``, processor converting to RGB).
* :func:`export_hf_mae_folder`: a late-mask MAE as a ``ViTMAEForPreTraining`` folder (reconstruction).
* :func:`export_safetensors`: the encoder's plain state dict as one ``.safetensors`` file.

Folders carry a model card ``README.md`` (:mod:`mae_timm.engine.model_card`). A 1-channel encoder is written for
RGB into folders (the patch kernel replicated over RGB and divided by 3, mean/std replicated): every timm and
transformers client feeds 3 channels, and a gray image converted to RGB gives the 1-channel features.

Every writer checks what it wrote by loading it the way a user will, and only a checked artifact gets its name
(a folder is written under a temporary name beside ``out`` and renamed; a file through ``mae_timm.utils.atomic_write``).
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
from mae_timm.engine.model_card import ModelCard, model_card
from mae_timm.models.convert import encoder_pretrained_cfg, gray_to_rgb, vit_input_size
from mae_timm.utils import UserError, atomic_write, fsync_dir

__all__ = [
    "atomic_folder",
    "check_export_folder",
    "create_model_line",
    "encoder_pretrained_cfg",
    "export_hf_folder",
    "export_hf_mae_folder",
    "loader_label_names",
    "export_safetensors",
    "export_timm_folder",
    "save_finetuned",
    "save_timm_folder",
    "train_py_line",
]

# what the folders may hold: a folder with anything else is never replaced
_TIMM_FILES = {"config.json", "model.safetensors", "README.md"}
_HF_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
# a gray image converted to RGB gives the 1-channel encoder's outputs to float rounding (three thirds summed)
GRAY_TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def check_export_folder(out: str | Path, allowed: set[str] = _TIMM_FILES) -> Path:
    """``out`` may become an export: absent, empty, or an earlier export (only ``allowed`` file names)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; name a folder for the export")
    if out.is_dir() and not {p.name for p in out.iterdir()} <= allowed:
        raise UserError(f"{out} holds other files than an export ({sorted(allowed)}); name a new or empty folder")
    return out


@contextlib.contextmanager
def atomic_folder(out: str | Path, allowed: set[str]) -> Iterator[Path]:
    """Yield an empty temp folder beside ``out``; on a clean exit it replaces ``out``.

    ``out`` must be absent, empty, or an earlier artifact (only ``allowed`` file names): anything else is refused
    before writing. An exception leaves ``out`` as it was and removes the temp folder.
    """
    out = check_export_folder(out, allowed)
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


def save_timm_folder(
    vit: nn.Module,
    out_dir: str | Path,
    *,
    pretrained_cfg: dict,
    metrics: dict | None = None,
    source: dict | None = None,
    card: ModelCard | None = None,
) -> Path:
    """Write a timm model as a ``local-dir`` folder (timm's ``save_for_hf``: ``config.json`` + ``model.safetensors``,
    and the model card ``README.md`` when ``card`` is given).

    ``pretrained_cfg`` (mean/std, input size, label names, ...) goes into ``config.json``, beside timm's
    ``model_args`` (the kwargs that rebuild ``vit``); ``metrics`` and ``source`` go into its ``mae_timm`` entry,
    which timm ignores. A 1-channel model is written for RGB input (:func:`mae_timm.models.convert.gray_to_rgb`:
    a gray image converted to RGB gives its outputs), so timm's default ``in_chans=3`` loads it.
    The folder is renamed into place only after ``timm.create_model('local-dir:...', pretrained=True)`` rebuilt it
    with identical outputs (and, for a 1-channel model, the gray-to-RGB outputs within ``GRAY_TOLERANCE``);
    otherwise ``ValueError`` and ``out_dir`` stays as it was.
    """
    vit = copy.deepcopy(vit).cpu().eval()  # the caller's model (maybe training, on a GPU) stays as it is
    vit.pretrained_cfg = dict(pretrained_cfg)  # save_for_hf reads the preprocessing from the model's cfg
    rgb = gray_to_rgb(vit)
    record = dict(version=mae_timm.__version__, source=source or {}, metrics=metrics or {})
    out_dir = Path(out_dir)
    with atomic_folder(out_dir, _TIMM_FILES) as tmp:
        save_for_hf(rgb, str(tmp), model_config=dict(mae_timm=record), model_args=dict(in_chans=3),
                    safe_serialization=True)
        loaded = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
        _check_same_outputs(rgb, loaded, out_dir)
        if rgb is not vit:
            _check_gray_to_rgb(vit, loaded, out_dir)
        if card is not None:
            (tmp / "README.md").write_text(model_card(card))
    return out_dir


def export_timm_folder(
    model: nn.Module, out_dir: str | Path, *, source: dict | None = None, run_config: dict | None = None
) -> Path:
    """``model``'s encoder (``mae_timm.create_timm_encoder``, ``num_classes=0``) as a timm ``local-dir`` folder
    with its model card (``run_config``: the checkpoint's pretraining config, for the card)."""
    vit = mae_timm.create_timm_encoder(model).cpu()
    card = ModelCard("timm", model, str(out_dir), source=source, run_config=run_config,
                     gray_to_rgb=model.input_channels() == 1)
    return save_timm_folder(vit, out_dir, pretrained_cfg=vit.pretrained_cfg, source=source, card=card)


def loader_label_names(loader) -> list[str] | None:
    """The class names of a shard loader's data (``_info.json``'s ``classes``, in index order), or None."""
    info = getattr(getattr(loader, "shard_set", None), "info", None) or {}
    classes = sorted(info.get("classes") or [], key=lambda c: c["index"]) if isinstance(info, dict) else []
    return [str(c.get("name") or c.get("id")) for c in classes] or None


def save_finetuned(
    classifier: nn.Module,
    model: nn.Module,
    out_dir: str | Path,
    metrics: dict,
    best: tuple[dict, dict] | None = None,
    label_names: list[str] | None = None,
) -> dict[str, str]:
    """A fine-tuned classifier of pretext ``model``'s encoder as timm ``local-dir`` folders with their metrics,
    class names (``label_names``: timm's ``pretrained_cfg['label_names']``) and model cards: ``out_dir/last`` (the
    final weights) and, when model selection kept one, ``out_dir/best`` (``best`` = (state dict, metrics) chosen on
    a held-out part of the training split). Returns {'last': path, 'best': path}."""
    cfg = encoder_pretrained_cfg(model, classifier)
    if label_names is not None:
        if len(label_names) != classifier.num_classes:
            raise ValueError(f"{len(label_names)} label names for a {classifier.num_classes}-class classifier")
        cfg["label_names"] = tuple(label_names)

    def save(vit: nn.Module, name: str, result: dict) -> Path:
        out = Path(out_dir) / name
        card = ModelCard("timm", model, str(out), num_classes=vit.num_classes, label_names=label_names,
                         metrics=result, gray_to_rgb=model.input_channels() == 1)
        return save_timm_folder(vit, out, pretrained_cfg=cfg, metrics=result, card=card)

    saved = {"last": save(classifier, "last", metrics)}
    if best is not None:
        best_classifier = copy.deepcopy(classifier).cpu()
        best_classifier.load_state_dict(best[0])
        saved["best"] = save(best_classifier, "best", best[1])
    return {k: str(v) for k, v in saved.items()}


@torch.no_grad()
def _check_same_outputs(reference: nn.Module, loaded: nn.Module, out: Path) -> None:
    """Raise unless ``loaded`` (what a user gets) computes what ``reference`` computes, bit for bit."""
    x = torch.randn(2, *vit_input_size(reference))
    if not torch.equal(loaded.eval()(x), reference(x)):
        raise ValueError(f"export not written: {out} reloaded gives other outputs than the model")


@torch.no_grad()
def _check_gray_to_rgb(gray: nn.Module, loaded: nn.Module, out: Path) -> None:
    """Raise unless ``loaded`` (RGB) gives on gray images repeated over RGB what ``gray`` gives on the gray images."""
    x = torch.randn(2, *vit_input_size(gray))
    if not torch.allclose(loaded.eval()(x.expand(-1, 3, -1, -1)), gray(x), **GRAY_TOLERANCE):
        raise ValueError(f"export not written: {out} on gray images as RGB gives other outputs than the model")


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


def export_hf_folder(
    model: nn.Module, out_dir: str | Path, *, source: dict | None = None, run_config: dict | None = None
) -> Path:
    """``model``'s encoder as a plain transformers ViT folder: ``ViTModel`` weights and config (the identity
    pooler: ``pool=True`` features are timm's), a ``ViTImageProcessor`` that converts to RGB, resizes and
    normalises, and the model card. ``ViTForImageClassification.from_pretrained(out, num_labels=N)`` adds a new
    head; ``pipeline('image-feature-extraction', model=out)`` is deterministic (no masking). A 1-channel encoder
    is written for RGB (:func:`~mae_timm.models.convert.gray_to_rgb`). An encoder HF's ViT cannot hold (no class
    token, avg pooling, LayerScale, SwiGLU, parallel blocks, ...) is a ``UserError`` naming what it lacks.

    Checked before it gets its name: ``ViTModel.from_pretrained`` gives timm's features (``GRAY_TOLERANCE``).
    """
    from mae_timm.models.hf import hf_image_processor
    from mae_timm.models.hf_vit import timm_vit_to_hf

    gray = mae_timm.create_timm_encoder(model).cpu().eval()
    vit = gray_to_rgb(gray)
    try:
        hf_model = timm_vit_to_hf(vit).eval()
    except ValueError as e:
        raise UserError(f"--format hf: {e}; export it with --format timm") from e
    card = ModelCard("hf", model, str(out_dir), source=source, run_config=run_config, gray_to_rgb=vit is not gray)
    out_dir = Path(out_dir)
    with atomic_folder(out_dir, _HF_FILES) as tmp:
        hf_model.save_pretrained(tmp)
        hf_image_processor(vit).save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(card))
        _check_hf_vit_folder(gray, tmp, out_dir)
    return out_dir


@torch.no_grad()
def _check_hf_vit_folder(gray: nn.Module, folder: Path, out: Path) -> None:
    from transformers import ViTModel

    loaded = ViTModel.from_pretrained(folder).eval()
    x = torch.randn(2, *vit_input_size(gray))
    theirs = loaded(pixel_values=x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
    if not torch.allclose(theirs.pooler_output, gray(x), **GRAY_TOLERANCE):
        raise ValueError(f"export not written: {out} loaded in transformers' ViTModel gives other features")


def export_hf_mae_folder(
    model: nn.Module,
    out_dir: str | Path,
    *,
    mask_ratio: float = 0.75,
    source: dict | None = None,
    run_config: dict | None = None,
) -> Path:
    """A late-mask MAE as a transformers folder for reconstruction: ``ViTMAEForPreTraining`` weights and config
    (``mask_ratio`` is HF's fixed masking ratio; LayerNorm eps 1e-6), a ``ViTImageProcessor`` with the model's
    mean/std and size, and the model card. A model HF's ViTMAE cannot hold is a ``UserError``.

    Checked before it gets its name: ``ViTMAEForPreTraining.from_pretrained`` gives the model's loss and prediction
    for the same ``noise``.
    """
    from mae_timm.models.convert import hf_image_processor, mae_timm_to_hf

    try:
        hf_model = mae_timm_to_hf(model.cpu(), mask_ratio=mask_ratio).eval()
    except (TypeError, ValueError) as e:
        raise UserError(f"--format hf-mae: {e}") from e
    processor = hf_image_processor(model)
    card = ModelCard("hf-mae", model, str(out_dir), source=source, run_config=run_config)
    out_dir = Path(out_dir)
    with atomic_folder(out_dir, _HF_FILES) as tmp:
        hf_model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(card))
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
