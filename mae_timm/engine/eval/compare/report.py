"""The verdicts, ``compare.json``, ``compare.md`` and the accuracy-vs-updates figure of a compare.

Verdict rule: for two arms A and B and a protocol, the per-seed differences A_s - B_s (seed s of both arms: the same
hold-out, the same seed of every draw) give a mean and a 95 % Student-t interval, mean +- t(0.975, n - 1) * sd /
sqrt(n). A wins where the interval lies above 0, B where it lies below, else "level" (and always "level" with one
seed: no spread is known).
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

from mae_timm.utils import atomic_write

__all__ = ["T_975", "paired_verdict", "save_accuracy_curve", "write_holdout_report", "write_report"]

PROTOCOLS = ("knn", "linprobe", "finetune", "partial_finetune")
LABELS = dict(knn="kNN", linprobe="linear probe", finetune="fine-tune", partial_finetune="partial fine-tune")
# two-sided 95 % quantiles of Student's t, t(0.975, df), df = 1..30 (beyond: 1.96)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_verdict(a: list[float], b: list[float], name_a: str, name_b: str) -> dict:
    """The mean of the per-seed differences a - b, its 95 % t-interval and the winner (or 'level')."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return dict(diff=mean, low=None, high=None, verdict="level (one seed: no spread)")
    t = T_975[len(diffs) - 2] if len(diffs) - 1 <= len(T_975) else 1.96
    half = t * statistics.stdev(diffs) / math.sqrt(len(diffs))
    low, high = mean - half, mean + half
    verdict = f"{name_a} wins" if low > 0 else f"{name_b} wins" if high < 0 else "level"
    return dict(diff=mean, low=low, high=high, verdict=verdict)


def _pairs(arms: list[str]) -> list[tuple[str, str]]:
    """Each arm against the baselines (raw_pixels, scratch) and each pretext arm against mae."""
    pairs = []
    for arm in arms:
        for base in ("raw_pixels", "scratch", "mae"):
            if arm != base and base in arms and arm not in ("raw_pixels",) and not (arm == "scratch"
                                                                                    and base == "mae"):
                pairs.append((arm, base))
    return pairs


def save_accuracy_curve(points: dict[str, list[tuple[int, float]]], path: str | Path, title: str,
                        baselines: dict[str, float] | None = None) -> Path:
    """Top-1 (%) against pretraining updates, one line per series (name -> [(updates, top1)]), and a dashed
    horizontal line per baseline (name -> top1)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    for name, series in points.items():
        ax.plot(*zip(*sorted(series)), marker="o", label=name)
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, linestyle="--", color=f"C{len(points) + i}", label=name)
    ax.set_xlabel("pretraining updates")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread} ({' / '.join(f'{v:.2f}' for v in values)})"


def write_report(cfg, info: dict, rates: dict, choices: dict, results: dict, *, wall_s: float, cpu_s: float,
                 device: str) -> dict:
    """Write compare.json, compare.md and accuracy_vs_updates.png into ``cfg.out``; returns the JSON payload."""
    out = Path(cfg.out)
    arms = [arm.name for arm in cfg.arm_list]
    flops = {name: rate["flops_per_update"] for name, rate in rates.items()}
    seeds = list(range(cfg.seeds))
    table = {}
    for arm in arms:
        table[arm] = {}
        for protocol in PROTOCOLS:
            per_seed = [results[(arm, s)][protocol] for s in seeds if protocol in results[(arm, s)]]
            if not per_seed:
                continue
            chosen = [{k: v for k, v in choices[(arm, s)][protocol].items() if k != "history"} for s in seeds]
            table[arm][protocol] = dict(
                per_seed=per_seed, mean=statistics.mean(per_seed),
                std=statistics.stdev(per_seed) if len(per_seed) > 1 else None,
                min=min(per_seed), max=max(per_seed), holdout_choices=chosen,
            )
        costs = [choices[(arm, s)] for s in seeds]
        table[arm]["cost"] = dict(
            updates=costs[0]["updates"], budget=costs[0].get("budget", "updates"), flops_per_update=flops.get(arm),
            updates_per_s=rates.get(arm, {}).get("updates_per_s"),
            pretrain_flops=(flops.get(arm) or 0) * costs[0]["updates"],
            pretrain_wall_s=[c.get("pretrain_wall_s") for c in costs],
            pretrain_cpu_s=[c.get("pretrain_cpu_s") for c in costs],
            choose_wall_s=[c["choose_wall_s"] for c in costs],
        )
    verdicts = []
    for a, b in _pairs(arms):
        for protocol in PROTOCOLS:
            if protocol in table[a] and protocol in table[b]:
                v = paired_verdict(table[a][protocol]["per_seed"], table[b][protocol]["per_seed"], a, b)
                verdicts.append(dict(a=a, b=b, protocol=protocol, **v))
    for v in verdicts:
        table[v["a"]].setdefault(v["protocol"], {}).setdefault("verdicts", []).append(v)
    payload = dict(
        config=asdict(cfg), arms=table, verdicts=verdicts, data=dict(path=cfg.data, mean=info["mean"],
        std=info["std"], splits={k: v.get("num_samples") for k, v in info["splits"].items()}),
        wall_s=wall_s, cpu_s=cpu_s, machine=dict(device=device, platform=platform.platform(),
        python=platform.python_version(), torch=torch.__version__, cpus=_cpus(), threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability()),
        curves={arm: [choices[(arm, s)]["curve"] for s in seeds] for arm in arms}, budget=rates,
        verdict_rule=__doc__.split("Verdict rule: ")[1].strip(),
    )
    payload["machine"].update(_versions())
    with atomic_write(out / "compare.json", "w") as f:
        f.write(json.dumps(payload, indent=2, default=str) + "\n")
    figure = _figure(out, arms, payload["curves"])
    markdown = render(payload, figure)
    with atomic_write(out / "compare.md", "w") as f:
        f.write(markdown)
    print(markdown)
    return dict(payload, figure=str(figure) if figure else None)


def write_holdout_report(cfg, rates: dict, choices: dict, *, wall_s: float) -> dict:
    """holdout.json and holdout.md: each arm's best hold-out top-1 per protocol (its chosen readout), per seed, with
    paired verdicts against the first pretraining arm; what a recipe search reads instead of the test split."""
    arms, seeds = [a.name for a in cfg.arm_list], range(cfg.seeds)
    table = {arm: {p: [choices[(arm, s)][p]["top1"] for s in seeds] for p in PROTOCOLS if p in choices[(arm, seeds[0])]}
             for arm in arms}
    reference = next((a.name for a in cfg.arm_list if a.pretrains), arms[0])
    verdicts = [dict(name=arm, protocol=p, **paired_verdict(table[arm][p], table[reference][p], arm, reference))
                for arm in arms if arm != reference for p in table[arm] if p in table[reference]]
    payload = dict(settings=asdict(cfg), holdout=table, verdicts=verdicts, budget=rates, wall_s=round(wall_s, 1),
                   choices={f"{arm}/seed{s}": {p: {k: v for k, v in choices[(arm, s)][p].items() if k != "history"}
                                                for p in table[arm]} for arm in arms for s in seeds})
    out = Path(cfg.out)
    with atomic_write(out / "holdout.json", "w") as f:
        json.dump(payload, f, indent=1)
    lines = [f"# Hold-out scores (test split not read): {len(arms)} arms x {cfg.seeds} seeds, top-1 (%) on "
             f"{cfg.holdout} held-out training images, mean ± std (per seed)", "",
             "| arm | " + " | ".join(LABELS[p] for p in PROTOCOLS) + " |", "|---" * (len(PROTOCOLS) + 1) + "|"]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(_fmt(table[arm][p]) if p in table[arm] else "–" for p in PROTOCOLS)
                     + " |")
    lines += ["", f"Paired against {reference} (95 % interval):", ""]
    for v in verdicts:
        interval = "" if v["low"] is None else f" [{v['low']:+.2f}, {v['high']:+.2f}]"
        lines.append(f"- {v['name']}, {LABELS[v['protocol']]}: {v['diff']:+.2f}{interval}: {v['verdict']}")
    with atomic_write(out / "holdout.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"compare: hold-out scores in {out / 'holdout.md'} (the test split was not read)")
    return payload


def _cpus() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _versions() -> dict:
    import timm

    import mae_timm

    return dict(timm=timm.__version__, mae_timm=mae_timm.__version__)


def _figure(out: Path, arms: list[str], curves: dict) -> Path | None:
    """Each pretrained arm's hold-out kNN against updates; an arm that does not pretrain (one point at update 0) is
    a dashed line measured alike (the same queries, bank and k), never a test figure."""
    points, baselines, banks = {}, {}, set()
    for arm in arms:
        by_updates: dict[int, list[float]] = {}
        for run in curves[arm]:
            for p in run:
                by_updates.setdefault(p["updates"], []).append(p["knn_top1"])
                banks.add(p.get("bank"))
        if list(by_updates) == [0]:
            baselines[f"{arm} kNN (hold-out, mean of seeds)"] = statistics.mean(by_updates[0])
        elif by_updates:
            points[f"{arm} kNN (hold-out, mean of seeds)"] = [(u, statistics.mean(v)) for u, v in by_updates.items()]
    if not points:
        return None
    bank = f"{banks.pop()} training images" if len(banks) == 1 and None not in banks else "training images"
    return save_accuracy_curve(points, out / "accuracy_vs_updates.png", f"kNN top-1 on the hold-out vs pretraining "
                               f"updates\n(bank: {bank}; dashed: arms without pretraining)", baselines)


def render(payload: dict, figure: Path | None) -> str:
    """compare.md: the table (mean ± std (per seed)), the verdicts, the choices, cost and machine."""
    cfg, table = payload["config"], payload["arms"]
    protocols = [p for p in PROTOCOLS if any(p in row for row in table.values())]
    lines = [f"# compare: {cfg['data']}", "",
             f"{cfg['seeds']} seeds; test top-1 (%) as mean ± std (per seed). Every choice on {cfg['holdout']} "
             f"held-out training images; the test split ({cfg['test_split']}) read once, at the end.", "",
             "| arm | updates | GFLOPs / update | " + " | ".join(LABELS[p] for p in protocols) + " |",
             "|" + "---|" * (3 + len(protocols))]
    for arm, row in table.items():
        flops = row["cost"]["flops_per_update"]
        cells = [arm, str(row["cost"]["updates"]), f"{flops / 1e9:.1f}" if flops else "–"]
        cells += [_fmt(row[p]["per_seed"]) if p in row else "–" for p in protocols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Verdicts", "", payload["verdict_rule"], ""]
    for v in payload["verdicts"]:
        interval = f"95 % CI [{v['low']:+.2f}, {v['high']:+.2f}]" if v["low"] is not None else "no interval"
        lines.append(f"- {LABELS[v['protocol']]}: {v['a']} - {v['b']} = {v['diff']:+.2f} ({interval}): "
                     f"**{v['verdict']}**")
    lines += ["", "## Hold-out choices (per seed)", ""]
    for arm, row in table.items():
        for p in protocols:
            if p in row:
                lines.append(f"- {arm}, {LABELS[p]}: " + "; ".join(_choice(c) for c in row[p]["holdout_choices"]))
    lines += ["", "## Cost", ""]
    for arm, row in table.items():
        c = row["cost"]
        wall = [round(w) for w in c["pretrain_wall_s"] if w is not None]
        cpu = [round(w) for w in c["pretrain_cpu_s"] if w is not None]
        lines.append(f"- {arm}: {c['updates']} updates, pretraining wall s {wall or '–'}, CPU s {cpu or '–'}; "
                     f"choices (hold-out) wall s {[round(w) for w in c['choose_wall_s']]}")
    m = payload["machine"]
    lines += ["", f"Whole compare: {payload['wall_s'] / 60:.1f} wall min, {payload['cpu_s'] / 60:.1f} CPU min "
              f"(this process and its loader workers; a resumed compare counts only its last call). Machine: "
              f"{m['platform']}, {m['cpus']} cores, {m['threads']} torch threads, device {m['device']}; python "
              f"{m['python']}, torch {m['torch']}, timm {m['timm']}, mae_timm {m['mae_timm']}. Mean / std from the "
              f"training split: {payload['data']['mean']} / {payload['data']['std']}."]
    if figure is not None:
        lines += ["", f"![accuracy vs updates]({figure.name})"]
    return "\n".join(lines) + "\n"


def _choice(c: dict) -> str:
    keep = ("variant", "blocks", "standardize", "k", "blr", "epochs", "epoch", "tune_last_blocks", "top1")
    shown = {k: round(c[k], 2) if isinstance(c[k], float) and k == "top1" else c[k] for k in keep
             if k in c and c[k] is not None}
    if "variant" in shown:
        pool, final_norm = shown["variant"]
        shown["variant"] = pool if pool == "pixels" else f"{pool}{'' if final_norm else ' without the final norm'}"
    return ", ".join(f"{k}={v}" for k, v in shown.items()).replace("top1=", "hold-out top-1=")
