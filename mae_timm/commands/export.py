"""``mae-timm export``: write a checkpoint's encoder as a timm ``local-dir`` folder (default), a transformers folder
(``--format hf``, late-mask MAE only) or a plain safetensors state dict (``--format safetensors``)."""

from __future__ import annotations

import argparse

FORMATS = ("timm", "hf", "safetensors")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint of a pretext model (runs/x/last.pt)")
    parser.add_argument("--out", required=True, help="output folder (timm, hf) or *.safetensors file")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="timm: local-dir folder for timm.create_model / train.py (default); hf: transformers "
                             "ViTMAE folder; safetensors: the encoder state dict (default when --out ends in "
                             ".safetensors)")  # fmt: skip
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="--format hf: ViTMAE's fixed mask ratio")


def run(args: argparse.Namespace, name: str) -> int:
    from mae_timm.engine.checkpoint import load_model
    from mae_timm.engine.export import (
        create_model_line,
        export_hf_folder,
        export_safetensors,
        export_timm_folder,
        train_py_line,
    )

    fmt = args.format or ("safetensors" if str(args.out).endswith(".safetensors") else "timm")
    model, ckpt = load_model(args.checkpoint)
    source = dict(checkpoint=str(args.checkpoint), model_name=ckpt["model_name"], step=ckpt["step"])
    if fmt == "safetensors":
        arch, kwargs = export_safetensors(model, args.out, source=source)
        mean, std = tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"])
        print(f"wrote {args.out}; load it with:\n  {create_model_line(arch, kwargs, args.out)}")
        print(f"  inputs normalised with mean={mean}, std={std}")
    elif fmt == "hf":
        out = export_hf_folder(model, args.out, mask_ratio=args.mask_ratio)
        print(f"wrote {out} (transformers ViTMAE); load it with:")
        print(f"  transformers.ViTMAEForPreTraining.from_pretrained({str(out)!r})")
        print(f"  transformers.AutoImageProcessor.from_pretrained({str(out)!r})")
    else:
        out = export_timm_folder(model, args.out, source=source)
        print(f"wrote {out} ({model.encoder_architecture()}, mean/std and input size in config.json); use it with:")
        print(f"  {create_model_line(f'local-dir:{out}', {})}")
        print(f"  {train_py_line(out)}")
    return 0
