"""The markdown of throughput rows (``benchmarks.throughput``, ``benchmarks.gpu_suite``): training and inference
tables, each mae_timm row over each peer in the same config and mode, and the rows that failed."""

from __future__ import annotations

from benchmarks.common import markdown_table


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def peer_ratio(row: dict, rows: list[dict], peer: str, phase: str) -> float | None:
    """mae_timm's img/s over ``peer``'s on the same config in the SAME mode; None when that peer row is missing
    (not run, skipped, failed, or without this phase)."""
    for other in rows:
        same = other["config"] == row["config"] and other["mode"] == row["mode"]
        if same and other["implementation"] == peer and "img_per_s" in other.get(phase, {}):
            return row[phase]["img_per_s"] / other[phase]["img_per_s"]
    return None


def render(rows: list[dict], peak: float, settings: dict, datasheet: float | None = None) -> str:
    """Markdown: the matmul peaks, then training and inference tables (each mae_timm row over each peer in the same
    mode; 'missing' where that peer row is missing), then the rows that failed or were not run. ``settings``: the
    run's ``benchmarks.throughput.BenchSettings`` as a dict (as its results file holds them)."""
    sheet = "unknown for this device" if datasheet is None else f"{datasheet:.4g} TFLOP/s"
    lines = [
        f"{settings['dtype']} matmul peak ({settings['matmul_size']}^3, >= {settings['matmul_seconds']:g} s, same "
        f"run): {peak:.3g} TFLOP/s; datasheet dense peak: {sheet}. {settings['warmup']} warm-up steps per row "
        f"alone, then {settings['steps']} timed steps interleaved with the other implementations of the same config "
        f"and mode in {settings['rounds']} rounds (median round); mask ratio {settings['mask_ratio']}; random input "
        "(one batch, on the device); norm-pix loss; fused AdamW.",
    ]
    header = ["config", "implementation", "mode", "batch", "img/s", "vs official", "vs HF", "ms/step", "GFLOP/img",
              "TFLOP/s", "MFU (measured peak)", "MFU (datasheet)", "peak mem (GiB)", "first loss", "warm-up (s)"]
    for phase, title in (("train", "Training step (forward + backward + AdamW)"), ("infer", "Inference (forward)")):
        done = [r for r in rows if "img_per_s" in r.get(phase, {})]
        if not done:
            continue
        table = []
        for r in done:
            ratios = ["—"] * 2
            if r["implementation"] == "mae_timm":
                ratios = [_fmt(peer_ratio(r, rows, peer, phase), ".2f").replace("—", "missing") for peer in
                          ("official", "hf")]
            result = r[phase]
            table.append([r["config"], r["implementation"], r["mode"], r["batch_size"], f"{result['img_per_s']:.0f}",
                          *ratios, f"{result['ms_per_step']:.2f}", f"{r['gflops_per_image'][phase]:.4g}",
                          f"{result['tflops']:.3g}", f"{result['mfu']:.1%}", _fmt(result["mfu_datasheet"], ".1%"),
                          _fmt(result["peak_memory_gib"], ".2f"), f"{result['loss']:.4f}",
                          f"{r['warmup_s'][phase]:.1f}"])
        lines += ["", f"{title}:", "", markdown_table(header, table)]
    failed = [f"{r['config']} {r['implementation']} {r['mode']}: {r['error']}" for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed:", "", *[f"- {line}" for line in failed]]
    return "\n".join(lines)
