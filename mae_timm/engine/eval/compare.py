"""``mae-timm compare``: does pretraining help on these images? Arms x seeds, choices on a hold-out, test once.

For every arm (raw pixels, scratch, a pretext model) and seed: pretrain (arms that do), then on a hold-out carved
from the training split choose kNN (features, standardisation, k), linear-probe (features, lr, epochs), fine-tune and
partial fine-tune (the epoch) settings; write ``runs/<arm>/seed<s>/choices.json``. When every arm-seed has its
choices, the test split is read once and each is measured with its choices (``test.json``); then
``compare.json``, ``compare.md`` and ``accuracy_vs_updates.png`` (:mod:`~mae_timm.engine.eval.compare_report`).
A killed compare picks up: finished files are not redone and pretraining resumes from its checkpoints.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

import mae_timm
from mae_timm.data.shards import read_info
from mae_timm.engine.checkpoint import list_checkpoints, load_model
from mae_timm.engine.eval import holdout as ho
from mae_timm.engine.eval.common import normalizer
from mae_timm.engine.eval.compare_config import BUILTIN_ARMS, CompareConfig, check_same_settings, split_ints
from mae_timm.engine.eval.finetune import FinetuneConfig
from mae_timm.engine.eval.knn import KnnConfig, knn_on_features
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.model_setup import build_model
from mae_timm.engine.train.pretrain import pretrain
from mae_timm.utils import UserError, atomic_write, resolve_device, seed_everything

__all__ = ["BUILTIN_ARMS", "CompareConfig", "run_compare"]

def _encoder(cfg: CompareConfig, in_chans: int) -> dict:
    base = dict(img_size=28, patch_size=7, embed_dim=192, depth=4, num_heads=6)
    return dict(base if cfg.encoder is None else cfg.encoder, in_chans=in_chans)


def pretrain_config(cfg: CompareConfig, arm: str, seed: int, info: dict, updates: int, out: Path) -> PretrainConfig:
    """The pretraining run of an arm-seed (scratch / raw_pixels: the mae arm's, never run, for the architecture)."""
    chans = info.get("channels") or 3
    encoder = _encoder(cfg, chans)
    stats = dict(pretrained_cfg_overlay=dict(mean=list(info["mean"]), std=list(info["std"])))
    decoder = cfg.decoder or dict(decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=4)
    base = arm.split("@")[0]
    pair = dict()
    if ":" in base:
        pretext, vit = base.split(":", 1)
        model, kwargs = "mae_vit_tiny_patch8_64", dict(decoder)
        pair = dict(pretext=pretext, encoder=vit, encoder_kwargs=dict(encoder, **stats))
    elif base == "apl":
        model = BUILTIN_ARMS["apl"]
        kwargs = dict({k: v for k, v in encoder.items() if k != "patch_size"}, crop=1, **stats,
                      grid_size=encoder["img_size"] // encoder["patch_size"])
    else:
        model = BUILTIN_ARMS[base] or BUILTIN_ARMS["mae"]
        kwargs = dict(encoder, **decoder, mae_init=False, **stats)
    epochs = -(-updates // max(info["splits"][cfg.train_split]["num_samples"] // cfg.batch_size, 1))
    return PretrainConfig(
        model=model, model_kwargs=kwargs, **pair, img_size=encoder["img_size"], data=cfg.data,
        split=cfg.train_split, batch_size=cfg.batch_size, blr=cfg.blr, mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss, crop_scale_min=cfg.crop_scale_min, epochs=epochs,
        warmup_epochs=min(round(cfg.warmup_fraction * epochs), epochs - 1), max_steps=updates, device=cfg.device,
        num_workers=cfg.num_workers, seed=seed, out=str(out), resume="auto",
        save_every_steps=max(updates // max(cfg.curve_points, 1), 1), save_every_epochs=10**6,
        keep_last=max(cfg.curve_points, 1), viz_every_epochs=0, tensorboard=False, progress=False,
    )


def update_flops(pcfg: PretrainConfig) -> int:
    """FLOPs of one pretraining update (forward + backward of a full batch), from ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = build_model(pcfg)
    size, chans = model.input_size(), model.input_channels()
    imgs = torch.randn(2, chans, size, size)
    with FlopCounterMode(display=False) as counter:
        out = model(imgs, mask_ratio=pcfg.mask_ratio) if "mask_ratio" in _forward_args(model) else model(imgs)
        (out[0] if isinstance(out, tuple) else out.loss).backward()
    return counter.get_total_flops() * pcfg.batch_size // 2


def _forward_args(model) -> tuple:
    import inspect

    return tuple(inspect.signature(model.forward).parameters)


def _cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _write(path: Path, payload: dict) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps(payload, indent=2, default=str) + "\n")


class _Context:
    """What every arm-seed shares: the config, the shards' info, the decoded train split, hold-out, device."""

    def __init__(self, cfg: CompareConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.info = read_info(cfg.data)
        if cfg.train_split not in self.info["splits"] or cfg.test_split not in self.info["splits"]:
            raise UserError(f"{cfg.data} needs splits {cfg.train_split!r} and {cfg.test_split!r}; it has "
                            f"{', '.join(self.info['splits'])}")
        self.device = resolve_device(None if cfg.device == "auto" else cfg.device)
        self.encoder = _encoder(cfg, self.info.get("channels") or 3)
        self._train = None

    def train(self) -> ho.Images:
        if self._train is None:
            e = self.encoder
            self._train = ho.load_split(self.cfg.data, self.cfg.train_split, e["img_size"], e["in_chans"],
                                        self.cfg.num_workers)
            n = len(self._train)
            if self.cfg.holdout >= n:
                raise UserError(f"holdout {self.cfg.holdout} must be below the {n} training images")
            order = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # one draw for every arm and seed
            self.holdout, self.bank = order[: self.cfg.holdout], order[self.cfg.holdout:]
            if not self.info.get("mean") or not self.info.get("std"):  # statistics of the training images
                pixels = self._train.images[self.bank].float().div(255).transpose(0, 1).flatten(1)
                self.info["mean"] = pixels.mean(1).tolist()
                self.info["std"] = pixels.std(1).tolist()
        return self._train


def _mean_std(ctx: _Context) -> None:
    """The shards' recorded mean / std, else those of the bank's images (measured once, kept in train_stats.json)."""
    path = ctx.out / "train_stats.json"
    if ctx.info.get("mean") and ctx.info.get("std"):
        return
    if path.is_file():
        ctx.info.update(json.loads(path.read_text()))
        return
    ctx.train()
    _write(path, dict(mean=ctx.info["mean"], std=ctx.info["std"]))


def arm_updates(ctx: _Context, arm: str, flops: dict) -> int:
    """--updates, or for ``@compute`` arms the updates whose FLOPs match --updates of the mae arm."""
    if not arm.endswith("@compute"):
        return ctx.cfg.updates
    return max(round(ctx.cfg.updates * flops["mae"] / flops[arm]), 1)


def _flops(ctx: _Context, arms: list[str]) -> dict:
    path = ctx.out / "flops.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    for arm in [*arms, "mae"]:
        if arm not in known and arm.split("@")[0] not in ("raw_pixels", "scratch"):
            known[arm] = update_flops(pretrain_config(ctx.cfg, arm, 0, ctx.info, 1, ctx.out / "unused"))
    _write(path, known)
    return known


def run_arm_seed(ctx: _Context, arm: str, seed: int, flops: dict) -> dict:
    """Pretrain (if the arm does) and make every choice on the hold-out; ``choices.json`` of the arm-seed."""
    cfg, folder = ctx.cfg, ctx.out / "runs" / arm / f"seed{seed}"
    path = folder / "choices.json"
    if path.is_file():
        print(f"compare: {arm} seed {seed}: choices done before ({path})")
        return json.loads(path.read_text())
    base = arm.split("@")[0]
    updates = arm_updates(ctx, arm, flops) if base not in ("raw_pixels", "scratch") else 0
    pcfg = pretrain_config(cfg, arm, seed, ctx.info, max(updates, 1), folder)
    record = dict(arm=arm, seed=seed, updates=updates, flops_per_update=flops.get(arm), curve=[],
                  load_average_start=os.getloadavg()[0])
    train = ctx.train()
    folder.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    if updates:
        print(f"compare: {arm} seed {seed}: pretraining {pcfg.model if not pcfg.pretext else arm} for {updates} "
              f"updates of {cfg.batch_size}")
        result = pretrain(pcfg)
        if result.interrupted:
            raise SystemExit(f"compare: {arm} seed {seed} stopped at update {result.step}; rerun to resume")
        model, _ = load_model(result.checkpoint)
        record.update(pretrain_wall_s=time.perf_counter() - wall, pretrain_cpu_s=_cpu_seconds() - cpu)
    else:
        seed_everything(seed)
        model, _ = build_model(pcfg)
    norm = normalizer(model, ctx.device)
    record["curve"] = _curve(ctx, folder, train, norm, None if base == "raw_pixels" else model)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    depth = 1 if base == "raw_pixels" else len(mae_timm.create_timm_encoder(model).blocks)
    blocks = sorted({min(b, depth) for b in split_ints(cfg.feature_blocks)})
    variants = [("pixels", False)] if base == "raw_pixels" else _variants(cfg, model)
    features = ho.block_features(None if base == "raw_pixels" else model, train, variants, max(blocks), norm,
                                 ctx.device)
    tick = _Ticker(f"compare: {arm} seed {seed}:")
    tick("frozen features of the training split")
    args = (train.labels, ctx.bank, ctx.holdout, train.num_classes, blocks)
    knn, knn_rows = ho.choose_knn(features, *args, split_ints(cfg.knn_k), ctx.device)
    tick(f"kNN choices on the hold-out ({len(knn_rows)} settings)")
    probe, probe_rows = ho.choose_linprobe(features, *args, [float(v) for v in cfg.probe_blr.split(",")],
                                           split_ints(cfg.probe_epochs), seed, ctx.device)
    tick(f"linear-probe choices on the hold-out ({len(probe_rows)} settings)")
    record.update(knn=knn, linprobe=probe, knn_holdout=knn_rows, linprobe_holdout=probe_rows)
    cache = {name: ho.select_features(features, tuple(c["variant"]), c["blocks"])[ctx.bank].clone()
             for name, c in (("knn", knn), ("linprobe", probe))}
    del features
    if base != "raw_pixels" and cfg.finetune_epochs > 0:
        bank = train.subset(ctx.bank[: cfg.finetune_images] if cfg.finetune_images else ctx.bank)
        for protocol, tune in (("finetune", None), ("partial_finetune", cfg.partial_blocks or None)):
            if protocol == "partial_finetune" and tune is None:
                continue
            ft = _finetune_config(cfg, seed, tune)
            chosen, state = ho.finetune_on_holdout(model, bank, train.subset(ctx.holdout), ft, ctx.device)
            torch.save(state, folder / f"{protocol}.pt")
            record[protocol] = dict(chosen, tune_last_blocks=tune, train_images=len(bank))
            tick(protocol)
            print(f"compare: {arm} seed {seed}: {protocol} hold-out top-1 {chosen['top1']:.2f} at epoch "
                  f"{chosen['epoch']}")
    record.update(choose_wall_s=time.perf_counter() - wall, choose_cpu_s=_cpu_seconds() - cpu,
                  load_average_end=os.getloadavg()[0])
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(dict(cache, labels=train.labels[ctx.bank].clone()), folder / "bank_features.pt")
    _write(path, record)
    print(f"compare: {arm} seed {seed}: hold-out kNN {knn['top1']:.2f} ({knn['variant']}, {knn['blocks']} blocks, "
          f"standardise {knn['standardize']}, k {knn['k']}), probe {probe['top1']:.2f}")
    return record


class _Ticker:
    """Prints each finished stage of an arm-seed with its wall seconds (progress a user can follow)."""

    def __init__(self, prefix: str):
        self.prefix, self.last = prefix, time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        print(f"{self.prefix} {stage} done in {now - self.last:.0f} s", flush=True)
        self.last = now


def _variants(cfg: CompareConfig, model) -> list:
    has_token = bool(getattr(model, "cls_token", None) is not None)
    pools = [p for p in cfg.pools.split(",") if p != "token" or has_token]
    # each pooling after the final norm; the patch-token poolings also before it (the class token is read after it)
    before_norm = [pool for pool in dict.fromkeys(["avg", *pools]) if pool != "token"]
    return [(pool, True) for pool in pools] + [(pool, False) for pool in before_norm]


def _finetune_config(cfg: CompareConfig, seed: int, tune: int | None) -> FinetuneConfig:
    return FinetuneConfig(epochs=cfg.finetune_epochs, batch_size=cfg.finetune_batch_size,
                          warmup_epochs=min(5, cfg.finetune_epochs - 1), seed=seed, tune_last_blocks=tune)


def _curve(ctx: _Context, folder: Path, train: ho.Images, norm, model: nn.Module | None) -> list[dict]:
    """kNN (avg pool, last block, k=20) on the hold-out at each kept checkpoint, bank: ``curve_bank`` images. An arm
    that does not pretrain (``model``: its random init, or None for raw pixels) gets one point at update 0, measured
    alike, so the figure sets the curve beside baselines on the same queries and bank."""
    bank, queries = ctx.bank[: ctx.cfg.curve_bank], ctx.holdout
    subset = train.subset(torch.cat([bank, queries]))  # features of these images only

    def knn_top1(model: nn.Module | None) -> float:
        variant = ("pixels", False) if model is None else ("avg", True)
        x = ho.block_features(model, subset, [variant], 1, norm, ctx.device)[variant][:, -1]
        y = subset.labels
        return knn_on_features(x[: len(bank)], y[: len(bank)], x[len(bank):], y[len(bank):], train.num_classes,
                               KnnConfig(), ctx.device)["top1"]

    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        return [dict(updates=0, knn_top1=knn_top1(model), bank=len(bank))]
    return [dict(updates=ckpt["step"], knn_top1=knn_top1(loaded), bank=len(bank))
            for loaded, ckpt in (load_model(path) for path in checkpoints)]


def test_arm_seed(ctx: _Context, test: ho.SealedSplit, arm: str, seed: int) -> dict:
    """The test top-1 of each protocol of an arm-seed, with the choices made on the hold-out."""
    folder = ctx.out / "runs" / arm / f"seed{seed}"
    path = folder / "test.json"
    if path.is_file():
        return json.loads(path.read_text())
    choices = json.loads((folder / "choices.json").read_text())
    base = arm.split("@")[0]
    pcfg = pretrain_config(ctx.cfg, arm, seed, ctx.info, max(choices["updates"], 1), folder)
    if choices["updates"]:
        model, _ = load_model(folder / "last.pt")
    else:
        seed_everything(seed)
        model, _ = build_model(pcfg)
    images = test.read()
    norm = normalizer(model, ctx.device)
    cached = torch.load(folder / "bank_features.pt", weights_only=True)
    result = dict(arm=arm, seed=seed)
    for protocol in ("knn", "linprobe"):
        c = choices[protocol]
        variants = [tuple(c["variant"])]
        x = ho.block_features(None if base == "raw_pixels" else model, images, variants, c["blocks"], norm,
                              ctx.device)[variants[0]].flatten(1)
        if protocol == "knn":
            result["knn"] = ho.knn_test(cached["knn"], cached["labels"], x, images.labels, images.num_classes, c,
                                        ctx.device)
        else:
            result["linprobe"] = ho.linprobe_test(cached["linprobe"], cached["labels"], x, images.labels,
                                                  images.num_classes, c, seed, ctx.device)
    for protocol in ("finetune", "partial_finetune"):
        if protocol in choices:
            state = torch.load(folder / f"{protocol}.pt", weights_only=True)
            ft = _finetune_config(ctx.cfg, seed, choices[protocol]["tune_last_blocks"])
            result[protocol] = ho.finetuned_top1(model, state, ft, images, ctx.device)
    _write(path, result)
    print(f"compare: {arm} seed {seed}: test " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()
                                                            if isinstance(v, float)))
    return result


def run_compare(cfg: CompareConfig) -> dict:
    """Run (or resume) a compare; returns the payload of ``compare.json``."""
    from mae_timm.engine.eval.compare_report import write_report

    start, cpu = time.perf_counter(), _cpu_seconds()
    ctx = _Context(cfg)
    arms = cfg.arm_names()
    ctx.out.mkdir(parents=True, exist_ok=True)
    check_same_settings(ctx.out / "config.json", cfg)
    _write(ctx.out / "config.json", asdict(cfg))
    _mean_std(ctx)
    flops = _flops(ctx, arms)
    print(f"compare: {len(arms)} arms x {cfg.seeds} seeds on {cfg.data}; mean {ctx.info['mean']} std "
          f"{ctx.info['std']} (from the training split); choices on {cfg.holdout} held-out training images")
    choices = {(arm, seed): run_arm_seed(ctx, arm, seed, flops) for arm in arms for seed in range(cfg.seeds)}
    e = ctx.encoder
    test = ho.SealedSplit(lambda: ho.load_split(cfg.data, cfg.test_split, e["img_size"], e["in_chans"],
                                                cfg.num_workers))
    test.unseal()  # every arm-seed's choices.json exists: nothing below is chosen
    results = {key: test_arm_seed(ctx, test, *key) for key in choices}
    payload = write_report(cfg, ctx.info, flops, choices, results, wall_s=time.perf_counter() - start,
                           cpu_s=_cpu_seconds() - cpu, device=str(ctx.device))
    if not cfg.keep_features:
        for path in (ctx.out / "runs").glob("*/seed*/bank_features.pt"):
            path.unlink()
    return payload
