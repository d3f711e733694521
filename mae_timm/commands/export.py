"""``mae-timm export``: write a checkpoint's encoder as safetensors that ``timm.create_model`` loads."""

from __future__ import annotations

import argparse

from mae_timm.engine.checkpoint import load_model
from mae_timm.engine.export import create_model_line, export_safetensors


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint of a pretext model (runs/x/last.pt)")
    parser.add_argument("--out", required=True, help="output file, *.safetensors")


def run(args: argparse.Namespace, name: str) -> int:
    model, ckpt = load_model(args.checkpoint)
    source = dict(checkpoint=str(args.checkpoint), model_name=ckpt["model_name"], step=ckpt["step"])
    arch, kwargs = export_safetensors(model, args.out, source=source)
    print(f"wrote {args.out}; load it with:")
    print(f"  {create_model_line(arch, kwargs, args.out)}")
    mean, std = tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"])
    print(f"  inputs normalised with mean={mean}, std={std}")
    return 0
