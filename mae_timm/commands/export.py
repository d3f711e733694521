"""``mae-timm export``: write a checkpoint's encoder as a timm ``local-dir`` folder (default), a plain transformers
ViT folder (``--format hf``), a transformers ViTMAE folder for reconstruction (``--format hf-mae``, late-mask MAE
only) or a plain safetensors state dict (``--format safetensors``). Folders carry a model card (README.md)."""

from __future__ import annotations

import argparse

FORMATS = ("timm", "hf", "hf-mae", "safetensors")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint of a pretext model (runs/x/last.pt)")
    parser.add_argument("--out", required=True, help="output folder (timm, hf, hf-mae) or *.safetensors file")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="timm: local-dir folder for timm.create_model / train.py (default); hf: transformers "
                             "ViTModel folder (features, ViTForImageClassification); hf-mae: transformers ViTMAE "
                             "folder (reconstruction); safetensors: the encoder state dict (default when --out ends "
                             "in .safetensors)")
    parser.add_argument("--mask-ratio", type=float, default=None,
                        help="--format hf-mae only: ViTMAE's fixed mask ratio, in (0, 1) (default 0.75)")


def run(args: argparse.Namespace, name: str) -> int:
    from mae_timm.engine.checkpoint import load_model
    from mae_timm.engine.export import (
        create_model_line,
        export_hf_folder,
        export_hf_mae_folder,
        export_safetensors,
        export_timm_folder,
        train_py_line,
    )

    fmt = args.format or ("safetensors" if str(args.out).endswith(".safetensors") else "timm")
    mask_ratio = _mask_ratio(args.mask_ratio, fmt)  # refused before the checkpoint is read
    model, ckpt = load_model(args.checkpoint)
    source = dict(checkpoint=str(args.checkpoint), model_name=ckpt["model_name"], step=ckpt["step"])
    run_config = ckpt.get("config")
    if fmt == "safetensors":
        arch, kwargs = export_safetensors(model, args.out, source=source)
        mean, std = tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"])
        print(f"wrote {args.out}; load it with:\n  {create_model_line(arch, kwargs, args.out)}")
        print(f"  inputs normalised with mean={mean}, std={std}")
    elif fmt == "hf":
        out = export_hf_folder(model, args.out, source=source, run_config=run_config)
        print(f"wrote {out} (transformers ViT, model card in README.md); load it with:")
        print(f"  transformers.pipeline('image-feature-extraction', model={str(out)!r}, pool=True)")
        print(f"  transformers.ViTForImageClassification.from_pretrained({str(out)!r}, num_labels=N)")
    elif fmt == "hf-mae":
        out = export_hf_mae_folder(model, args.out, mask_ratio=mask_ratio, source=source, run_config=run_config)
        print(f"wrote {out} (transformers ViTMAE, model card in README.md); load it with:")
        print(f"  transformers.ViTMAEForPreTraining.from_pretrained({str(out)!r})")
        print(f"  transformers.AutoImageProcessor.from_pretrained({str(out)!r})")
    else:
        out = export_timm_folder(model, args.out, source=source, run_config=run_config)
        print(f"wrote {out} ({model.encoder_architecture()}, mean/std and input size in config.json, model card in "
              "README.md); use it with:")
        print(f"  {create_model_line(f'local-dir:{out}', {})}")
        print(f"  {train_py_line(out)}")
    return 0


def _mask_ratio(value: float | None, fmt: str) -> float:
    """``--mask-ratio`` of ``--format hf-mae`` (0.75 when not given), in (0, 1); any other format masks nothing and
    refuses it."""
    from mae_timm.utils import UserError

    if value is not None and fmt != "hf-mae":
        raise UserError(f"--mask-ratio is an option of --format hf-mae (ViTMAE's fixed mask ratio); --format {fmt} "
                        "exports an encoder, which masks nothing: drop --mask-ratio")
    if value is None:
        return 0.75
    if not 0 < value < 1:  # nan fails this too
        raise UserError(f"--mask-ratio {value} must be in (0, 1): the share of patches ViTMAE removes")
    return value
