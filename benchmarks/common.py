"""What the benchmarks share: FLOP counting three ways, one timer, and one report writer (the run header that names
where a figure came from, then ``<stem>.md`` and ``<stem>.json``).

FLOP convention. fvcore counts one multiply-add as one flop; torch's ``FlopCounterMode`` (and hardware peaks)
count two. In this project ``MACs`` always means multiply-adds (fvcore's number) and ``FLOPs`` means
``2 * MACs``. Only matrix products are counted: linear layers, the patch-embedding convolution and the two
attention products (QK^T and AV). Norms, activations, softmax and the loss are left out of every count, which is
also what ``FlopCounterMode`` counts, so the three counters below can be compared op for op:

- ``fvcore_macs``: fvcore's ``FlopCountAnalysis`` (per module) plus a handle for
  ``aten::scaled_dot_product_attention``, which fvcore does not know and would otherwise count as zero.
- ``counted_flops`` (:mod:`mae_timm.engine.flops`, the one counter compare uses too): ``FlopCounterMode`` over any
  callable (forward, or forward + backward), with attention run
  through the math backend so that every device (the CPU included) counts it.
- ``vit_macs`` / ``mae_macs``: the analytic formula for a ViT and a late-mask MAE.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from math import prod
from pathlib import Path

import timm
import torch
from torch import nn

from mae_timm.engine.flops import counted_flops
from mae_timm.layers import num_predicted

__all__ = [
    "attention_macs",
    "block_macs",
    "counted_flops",
    "datasheet_peak_tflops",
    "describe_run",
    "environment",
    "interleaved_seconds",
    "fvcore_macs",
    "mae_macs",
    "markdown_table",
    "sdpa_flop_jit",
    "seconds",
    "synchronize",
    "vit_macs",
    "write_results",
]


def sdpa_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: multiply-adds of QK^T plus those of AV."""
    from fvcore.nn.jit_handles import get_shape

    query, key, value = (get_shape(v) for v in inputs[:3])
    *batch_heads, len_q, dim_qk = query  # (B, nh, Tq, hs); grouped key/value heads broadcast to the query's
    len_k, dim_v = key[-2], value[-1]
    return prod(batch_heads) * len_q * len_k * (dim_qk + dim_v)


def fvcore_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Multiply-adds of ``model(*inputs)`` per module name (``''`` is the total), matrix products only."""
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import (
        addmm_flop_jit,
        bmm_flop_jit,
        conv_flop_jit,
        einsum_flop_jit,
        linear_flop_jit,
        matmul_flop_jit,
    )

    analysis = FlopCountAnalysis(model, inputs).clear_op_handles()
    analysis.set_op_handle(
        **{
            "aten::addmm": addmm_flop_jit,
            "aten::bmm": bmm_flop_jit,
            "aten::_convolution": conv_flop_jit,
            "aten::einsum": einsum_flop_jit,
            "aten::linear": linear_flop_jit,
            "aten::matmul": matmul_flop_jit,
            "aten::mm": matmul_flop_jit,
            "aten::scaled_dot_product_attention": sdpa_flop_jit,
        }
    )
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return dict(analysis.by_module())


def attention_macs(tokens: int, dim: int) -> int:
    """Multiply-adds of QK^T and AV over ``tokens`` tokens of width ``dim`` (summed over heads)."""
    return 2 * tokens * tokens * dim


def block_macs(tokens: int, dim: int, mlp_hidden: int) -> int:
    """Multiply-adds of one transformer block: qkv, attention, output projection, two-layer MLP."""
    return tokens * dim * 3 * dim + attention_macs(tokens, dim) + tokens * dim * dim + 2 * tokens * dim * mlp_hidden


def vit_macs(
    *,
    num_patches: int,
    patch_dim: int,
    embed_dim: int,
    depth: int,
    mlp_hidden: int,
    num_prefix_tokens: int = 1,
    num_classes: int = 0,
) -> dict[str, int]:
    """Analytic multiply-adds of a timm ``VisionTransformer`` forward on one image, split by part.

    ``patch_dim`` is ``p * p * in_chans``; the head is a pooled linear layer (absent when ``num_classes=0``).
    """
    tokens = num_patches + num_prefix_tokens
    return {
        "patch_embed": num_patches * patch_dim * embed_dim,
        "encoder": depth * block_macs(tokens, embed_dim, mlp_hidden),
        "head": embed_dim * num_classes,
    }


def mae_macs(model: nn.Module, mask_ratio: float) -> dict[str, int]:
    """Analytic multiply-adds of one image through a late-mask MAE (``mae.py`` layout), split by part.

    The encoder sees the prefix tokens and ``int(L * (1 - mask_ratio))`` visible patches. The official decoder
    embeds those, then runs on all ``L`` patches plus the prefix tokens and predicts a patch for each. A decoder
    that predicts ``K`` removed patches (``predict_ratio`` < 1 in training mode; every removed patch for a cross
    decoder in evaluation mode) runs self-attention over prefix + visible + ``K`` tokens and predicts ``K``, or
    (``decoder="cross"``) ``K`` queries cross-attend to the prefix + visible tokens.
    """
    num_patches = model.patch_embed.num_patches
    num_prefix = model.num_prefix_tokens  # timm VisionTransformer: cls token (+ register tokens)
    embed_dim, patch_dim = model.patch_embed.proj.out_channels, model.patch_embed.proj.weight[0].numel()
    decoder_dim = model.decoder_embed.out_features
    len_keep = int(num_patches * (1 - mask_ratio))
    encoder = vit_macs(
        num_patches=len_keep,
        patch_dim=patch_dim,
        embed_dim=embed_dim,
        depth=len(model.blocks),
        mlp_hidden=model.blocks[0].mlp.fc1.out_features,
        num_prefix_tokens=num_prefix,
    )["encoder"]
    depth = len(model.decoder_blocks)
    mlp_hidden = model.decoder_blocks[0].mlp.fc1.out_features if depth else 0
    memory = len_keep + num_prefix
    official = model.decoder_type == "self" and (model.predict_ratio == 1.0 or not model.training)
    predicted = num_patches + num_prefix if official else num_predicted(
        num_patches - len_keep, model.predict_ratio if model.training else 1.0)
    if model.decoder_type == "cross":
        blocks = depth * (predicted * decoder_dim * 2 * decoder_dim  # q and output projections
                          + memory * decoder_dim * 2 * decoder_dim  # k and v projections
                          + 2 * predicted * memory * decoder_dim  # QK^T and AV
                          + 2 * predicted * decoder_dim * mlp_hidden)
    else:
        tokens = predicted if official else memory + predicted
        blocks = depth * block_macs(tokens, decoder_dim, mlp_hidden)
    decoder = memory * embed_dim * decoder_dim + blocks + predicted * decoder_dim * model.decoder_pred.out_features
    return {"patch_embed": num_patches * patch_dim * embed_dim, "encoder": encoder, "decoder": decoder}


# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by a name fragment of
# torch.cuda.get_device_name; the first fragment found wins (more specific names first).
DATASHEET_PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},  # SXM; TF32 for float32
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0},
    "H100 NVL": {"bfloat16": 835.5, "float16": 835.5, "float32": 417.5},
    "H100": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
}


def datasheet_peak_tflops(device: torch.device, dtype: str) -> float | None:
    """The datasheet dense peak of ``device`` in ``dtype`` ('bfloat16', 'float16', 'float32' as TF32), or None
    when the device is not in :data:`DATASHEET_PEAK_TFLOPS` (the CPU included)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in DATASHEET_PEAK_TFLOPS.items():
        if fragment in name:
            return peaks.get(dtype)
    return None


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a no-op off CUDA): every timer below calls it at both ends."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device | str, repeats: int = 1) -> float:
    """Wall seconds per call of ``fn`` over ``repeats`` calls, the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / max(repeats, 1)


def interleaved_seconds(
    calls: dict, device: torch.device | str, rounds: int, repeats: int = 1, rotate: bool = True
) -> dict[object, list[float]]:
    """Seconds per call of every arm of ``calls``, timed A B C A B C ... over ``rounds`` rounds (``repeats`` calls
    per arm per round; the order rotated each round when ``rotate``), so a drifting machine slows all arms alike.
    Returns the per-round figures of each arm; report their median (``statistics.median``)."""
    keys = list(calls)
    times: dict[object, list[float]] = {key: [] for key in keys}
    for round_index in range(rounds):
        turn = round_index % len(keys) if rotate and keys else 0
        for key in keys[turn:] + keys[:turn]:
            times[key].append(seconds(calls[key], device, repeats))
    return times


def environment(device: torch.device) -> dict[str, str]:
    """Everything about the machine a figure depends on, cheap to read: :func:`describe_run` plus the GPU driver
    and CUDA version, torchvision / transformers / webdataset versions, ``/dev/shm`` size and CPU count."""
    run = describe_run(device)
    for name in ("torchvision", "transformers", "webdataset"):
        try:
            module = __import__(name)
            run["versions"] += f", {name} {getattr(module, '__version__', '?')}"
        except ImportError:
            run["versions"] += f", {name} absent"
    run["cuda"] = f"torch built with CUDA {torch.version.cuda}; driver {_nvidia_driver()}"
    try:
        shm = shutil.disk_usage("/dev/shm")
        run["/dev/shm"] = f"{shm.total / 2**30:.1f} GiB ({shm.free / 2**30:.1f} GiB free)"
    except OSError as error:
        run["/dev/shm"] = f"unreadable ({error})"
    return run


def _nvidia_driver() -> str:
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].split("Kernel Module")[-1].split()[0]
    except (OSError, IndexError):
        return "unknown (no /proc/driver/nvidia/version)"


def describe_run(device: torch.device) -> dict[str, str]:
    """Where and how a figure was taken: device, library versions, the command line, the time (UTC)."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{_cpu_model()} ({torch.get_num_threads()} threads)"
    device_name += f"; {os.cpu_count()} CPU cores visible"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    for name in ("fvcore", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return {
        "device": device_name,
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "command": _command_line(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _command_line() -> str:
    """The command that ran this process: ``python -m benchmarks.flops ...`` when run as a module."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # None for a script, `python -c` or a REPL
    program = f"-m {spec.name}" if spec is not None else shlex.quote(sys.argv[0])
    return f"python {program} {shlex.join(sys.argv[1:])}".rstrip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table; numbers are already formatted by the caller."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, stem: str, run: dict[str, str], results: dict, markdown: str) -> None:
    """Write ``<stem>.json`` (run header + results) and ``<stem>.md`` (header lines + ``markdown``) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"run": run, **results}, indent=2) + "\n")
    header = "\n".join(f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}" for key, value in run.items())
    (out_dir / f"{stem}.md").write_text(f"{header}\n\n{markdown}\n")
