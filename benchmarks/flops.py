"""Multiply-adds of every registered pretext model, split by part, at several mask ratios (see common.py).

    python -m benchmarks.flops                                  # all mae_* and apl_* models -> benchmarks/results/
    python -m benchmarks.flops --models 'mae_vit_test*' --out /tmp/flops
    python -m benchmarks.flops --fvcore                         # also fvcore on real weights (minutes per large model)

One image at the model's default input size (``pretrained_cfg['input_size']``). MAE models run
``forward(imgs, mask_ratio=r, noise=noise)`` with a fixed noise, so the traced shapes are those of ratio ``r``.
Models whose forward takes no mask ratio (``takes_mask_ratio = False``, the APL puzzle) take the ratio as their
``patch_drop_rate`` and run in training mode, where that fraction of the patches is removed from the sequence.
Models are built and run on the meta device (:class:`MetaDevice`: shapes only, no memory, no weight init, no
arithmetic), where ``FlopCounterMode`` counts every matrix product per module: the whole table takes seconds
(building ViT-H with real weights alone took minutes on the project's busy CPU). The counts do not depend on the
values, so they equal those of real weights (tested against the committed table, which fvcore counted on real
weights). Each row is counted two ways, three with ``--fvcore``: ``FlopCounterMode`` (split by part), the analytic
formula for late-mask MAE models, and fvcore on a real CPU model (total).

Parts: ``patch_embed``; ``encoder`` = the blocks and final norm (what export hands to timm);
``decoder/head`` = everything else (MAE decoder, early-mask MLP heads, APL position classifier).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils._device import DeviceContext

import mae_timm  # noqa: F401  (registers the models)
from benchmarks.common import describe_run, fvcore_macs, mae_macs, markdown_table, write_results
from mae_timm.engine.flops import flop_counter
from mae_timm.models import MaskedAutoencoderViT

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENCODER_PARTS = ("blocks", "norm")  # top-level modules that make up the exported encoder besides patch_embed
ENCODER_SHAPE_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
# the paper's setting (Table 1c): ViT-L, decoder 512 x 8, 75 % mask; mask tokens in the encoder cost 3.3x FLOPs
PAPER_MODEL, PAPER_RATIO = "mae_vit_large_patch16", 3.3


class MaskedForward(nn.Module):
    """``model(imgs, mask_ratio=r, noise=noise)`` as a module of tensor inputs only, which is what tracing needs."""

    def __init__(self, model: nn.Module, mask_ratio: float):
        super().__init__()
        self.model = model
        self.mask_ratio = mask_ratio

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model(imgs, mask_ratio=self.mask_ratio, noise=noise)


class MetaDevice(DeviceContext):
    """Tensors made without a device are meta tensors (shapes only), except ``torch.linspace``'s: timm reads those
    values with ``.item()`` while building a model (drop-path rates)."""

    def __init__(self):
        super().__init__("meta")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.linspace:
            kwargs = dict(kwargs or {}, device=(kwargs or {}).get("device", "cpu"))
        return super().__torch_function__(func, types, args, kwargs)


def build_pretext(
    model_name: str, mask_ratio: float, meta: bool = False
) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, ...]]:
    """(model, module to trace, its inputs) for one image at the model's default size and ``mask_ratio``; on the
    meta device when ``meta``."""
    with MetaDevice() if meta else contextlib.nullcontext():
        generator = None if meta else torch.Generator().manual_seed(0)
        model = (_meta_model(model_name) if meta else timm.create_model(model_name)).eval()
        imgs = torch.randn(1, *model.pretrained_cfg["input_size"], generator=generator)
        if model.takes_mask_ratio:
            noise = torch.rand(1, model.patch_embed.num_patches, generator=generator)
            return model, MaskedForward(model, mask_ratio), (imgs, noise)
        model = timm.create_model(model_name, patch_drop_rate=mask_ratio).train()  # dropout only removes in training
        return model, model, (imgs,)


@functools.lru_cache(maxsize=1)
def _meta_model(model_name: str) -> nn.Module:
    """The model on the meta device, built once for all its mask ratios (the ratio is a forward argument)."""
    with MetaDevice():
        return timm.create_model(model_name)


def module_macs(by_module: dict[str, int], name: str) -> int:
    """Multiply-adds of module ``name``: its own count, else the sum of its direct children's (a ``ModuleList`` of
    blocks is never called itself, each block is)."""
    if name in by_module:
        return by_module[name]
    children = [key for key in by_module if key.startswith(name + ".") and "." not in key[len(name) + 1:]]
    return sum(by_module[key] for key in children)


def flop_counter_macs(traced: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Multiply-adds of ``traced(*inputs)`` per module name as fvcore names them (``''`` is the total), counted by
    ``FlopCounterMode`` (2 FLOPs per multiply-add) with attention through the math backend (counted matmuls)."""
    with torch.no_grad():
        counter = flop_counter(lambda: traced(*inputs))
    root = type(traced).__name__  # FlopCounterMode names modules from the root's class name
    by_module = {"": counter.get_total_flops() // 2}
    for name, ops in counter.get_flop_counts().items():
        if name.startswith(root + "."):
            by_module[name[len(root) + 1:]] = sum(ops.values()) // 2
    return by_module


def model_kind(model: nn.Module) -> str:
    """'late mask' (MAE), 'early mask' (mask tokens in the encoder) or 'patch dropout' (APL)."""
    if isinstance(model, MaskedAutoencoderViT):
        return "late mask"
    return "early mask" if model.takes_mask_ratio else "patch dropout"


def split_macs(by_module: dict[str, int], prefix: str) -> dict[str, int]:
    """Per-module counts -> {'patch_embed', 'encoder', 'decoder/head', 'total'}."""
    total = by_module[""]
    patch_embed = module_macs(by_module, prefix + "patch_embed")
    encoder = sum(module_macs(by_module, prefix + name) for name in ENCODER_PARTS)
    decoder = total - patch_embed - encoder
    return {"patch_embed": patch_embed, "encoder": encoder, "decoder/head": decoder, "total": total}


def count_model(model_name: str, mask_ratio: float, fvcore: bool = False) -> dict:
    """One row: per-part MACs (FlopCounterMode on the meta device), their total, analytic MACs (late-mask MAE),
    fvcore's total on real weights (``fvcore``, slow; else None), parameters."""
    model, traced, inputs = build_pretext(model_name, mask_ratio, meta=True)
    prefix = "model." if traced is not model else ""
    row = {"model": model_name, "input": list(inputs[0].shape[1:]), "mask_ratio": mask_ratio}
    row["macs"] = split_macs(flop_counter_macs(traced, inputs), prefix)
    row["flop_counter_macs"] = row["macs"]["total"]
    row["fvcore_macs"] = None
    if fvcore:
        _, real, real_inputs = build_pretext(model_name, mask_ratio)
        with torch.no_grad():
            row["fvcore_macs"] = fvcore_macs(real, real_inputs)[""]
    analytic = mae_macs(model, mask_ratio) if isinstance(model, MaskedAutoencoderViT) else None
    row["analytic_macs"] = sum(analytic.values()) if analytic else None
    row["params"] = sum(p.numel() for p in model.parameters())
    row["kind"] = model_kind(model)
    row["encoder_shape"] = {k: model.encoder_kwargs()[k] for k in ENCODER_SHAPE_KEYS}
    return row


def cost_ratios(rows: list[dict], ratio: float = 0.75) -> list[dict]:
    """Mask tokens in the encoder vs not, at ``ratio``.

    ``mask tokens in encoder``: a late-mask MAE at ratio 0 has exactly the shapes of the same model with mask
    tokens in its encoder (the paper's comparison, decoder unchanged). ``early-mask model``: a registered
    early-mask model against the late-mask model with the same encoder (their decoders differ too).
    """
    by_key = {(r["model"], r["mask_ratio"]): r for r in rows}
    late = sorted({r["model"] for r in rows if r["kind"] == "late mask"})
    early = sorted({r["model"] for r in rows if r["kind"] == "early mask"})
    pairs = [("mask tokens in encoder", (name, 0.0), (name, ratio)) for name in late]
    shapes = {r["model"]: r["encoder_shape"] for r in rows}
    pairs += [("early-mask model", (e, ratio), (m, ratio)) for e in early for m in late if shapes[e] == shapes[m]]
    out = []
    for comparison, with_key, without_key in pairs:
        if with_key in by_key and without_key in by_key:
            full, masked = by_key[with_key]["macs"], by_key[without_key]["macs"]
            out.append(
                {
                    "comparison": comparison,
                    "with_mask_tokens": {"model": with_key[0], "mask_ratio": with_key[1]},
                    "without": {"model": without_key[0], "mask_ratio": without_key[1]},
                    "total_ratio": full["total"] / masked["total"],
                    "encoder_ratio": full["encoder"] / masked["encoder"],
                }
            )
    return out


def _g(macs: int | None) -> str:
    return "—" if macs is None else f"{macs / 1e9:.4f}"


def _at(model_at_ratio: dict) -> str:
    return f"{model_at_ratio['model']} @ {model_at_ratio['mask_ratio']}"


def render(rows: list[dict], ratios: list[dict]) -> str:
    """The markdown tables: MACs per part and cross-checks, then the early/late cost ratios."""
    header = ["model", "input", "mask ratio", "patch embed", "encoder", "decoder/head", "total", "fvcore",
              "analytic", "params (M)"]
    table = [
        [r["model"], "x".join(map(str, r["input"])), r["mask_ratio"], _g(r["macs"]["patch_embed"]),
         _g(r["macs"]["encoder"]), _g(r["macs"]["decoder/head"]), _g(r["macs"]["total"]),
         _g(r.get("fvcore_macs")), _g(r["analytic_macs"]), f"{r['params'] / 1e6:.2f}"]
        for r in rows
    ]
    ratio_table = [
        [r["comparison"], _at(r["with_mask_tokens"]), _at(r["without"]), f"{r['total_ratio']:.2f}x",
         f"{r['encoder_ratio']:.2f}x"]
        for r in ratios
    ]
    lines = [
        "GMACs per image (1 multiply-add = 1; FLOPs = 2 x MACs). Matrix products only: linear layers, the",
        "patch-embedding conv and attention (QK^T, AV); norms, activations, softmax and the loss are not counted.",
        "Counted by FlopCounterMode on the meta device; fvcore (real weights) only with --fvcore.",
        "",
        markdown_table(header, table),
    ]
    if ratio_table:
        lines += [
            "",
            "Cost of mask tokens in the encoder (total and encoder-only MACs, with / without):",
            "",
            markdown_table(["comparison", "with mask tokens", "without", "total", "encoder"], ratio_table),
        ]
    paper = [r for r in ratios if r["comparison"] == "mask tokens in encoder" and r["without"]["model"] == PAPER_MODEL]
    if paper:
        lines += [
            "",
            f"The paper's setting ({PAPER_MODEL}, decoder 512 x 8, 75 % mask): {paper[0]['total_ratio']:.2f}x here, "
            f"{PAPER_RATIO}x in the MAE paper (Table 1c).",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mae_*", "apl_*"], help="timm name patterns")
    parser.add_argument("--mask-ratios", nargs="+", type=float, default=[0.0, 0.75, 0.9])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where flops.json and flops.md go")
    parser.add_argument("--fvcore", action="store_true", help="also count with fvcore on real weights (slow)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = sorted({name for pattern in args.models for name in timm.list_models(pattern)})
    if not names:
        print(f"no registered model matches {args.models}", file=sys.stderr)
        return 1
    rows = []
    for name in names:
        for ratio in args.mask_ratios:
            rows.append(count_model(name, ratio, fvcore=args.fvcore))
            print(f"{name:36s} ratio {ratio:4.2f}  {rows[-1]['macs']['total'] / 1e9:10.4f} GMACs", flush=True)
    ratios = cost_ratios(rows)
    markdown = render(rows, ratios)
    print(markdown)
    write_results(args.out, "flops", describe_run(torch.device("cpu")), {"rows": rows, "ratios": ratios}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
