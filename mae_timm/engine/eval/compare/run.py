"""``mae-timm compare``: does pretraining help on these images? Arms x seeds, choices on a hold-out, test once.

For every arm (:mod:`~mae_timm.engine.eval.compare.arms`) and seed: pretrain (arms that do, for the arm's budget),
then on a hold-out carved from the training split choose kNN (features, standardisation, k), linear-probe (features,
lr, epochs), fine-tune and partial fine-tune (the epoch) settings; write ``runs/<arm>/seed<s>/choices.json``. When
every arm-seed has its choices, the test split is read once and each is measured with its choices (``test.json``);
then ``compare.json``, ``compare.md`` and ``accuracy_vs_updates.png`` (:mod:`~mae_timm.engine.eval.compare.report`).
A killed compare picks up: finished files are not redone and pretraining resumes from its checkpoints.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

import mae_timm
from mae_timm.data.shards import read_info
from mae_timm.engine.checkpoint import list_checkpoints, load_model
from mae_timm.engine.eval.compare import choose
from mae_timm.engine.eval.compare.arms import Arm
from mae_timm.engine.eval.compare.budget import arm_model, arm_updates, budget_rates, encoder_kwargs, pretrain_config
from mae_timm.engine.eval.compare.config import CompareConfig, check_same_settings, split_ints
from mae_timm.engine.eval.features import extract_features, normalizer, progress, select_blocks
from mae_timm.engine.eval.knn import KnnConfig, knn_on_features
from mae_timm.engine.eval.splits import Images, MemoryLoader, SealedSplit, draw_holdout, load_split
from mae_timm.engine.train.pretrain import pretrain
from mae_timm.utils import UserError, atomic_write, resolve_device

__all__ = ["run_compare"]


def _cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _write(path: Path, payload: dict) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps(payload, indent=2, default=str) + "\n")


@dataclass
class TrainSplit:
    """The decoded training split and its one hold-out draw (positions into ``images``)."""

    images: Images
    holdout: torch.Tensor
    bank: torch.Tensor


class _Context:
    """What every arm-seed shares: the config, the shards' info (mean / std), the device, the training split."""

    def __init__(self, cfg: CompareConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.info = read_info(cfg.data)
        if cfg.train_split not in self.info["splits"] or cfg.test_split not in self.info["splits"]:
            raise UserError(f"{cfg.data} needs splits {cfg.train_split!r} and {cfg.test_split!r}; it has "
                            f"{', '.join(self.info['splits'])}")
        self.device = resolve_device(None if cfg.device == "auto" else cfg.device)
        self.encoder = encoder_kwargs(cfg, self.info.get("channels") or 3)

    def read(self, split: str) -> Images:
        return load_split(self.cfg.data, split, self.encoder["img_size"], self.encoder["in_chans"],
                          self.cfg.num_workers)

    @cached_property
    def train(self) -> TrainSplit:
        """Decoded on first use (a compare whose choices are all done never decodes it)."""
        images = self.read(self.cfg.train_split)
        return TrainSplit(images, *draw_holdout(len(images), self.cfg.holdout))

    def mean_std(self) -> None:
        """The shards' recorded mean / std, else those of the bank's images (measured once, in train_stats.json)."""
        path = self.out / "train_stats.json"
        if self.info.get("mean") and self.info.get("std"):
            return
        if not path.is_file():
            pixels = self.train.images.images[self.train.bank].float().div(255).transpose(0, 1).flatten(1)
            _write(path, dict(mean=pixels.mean(1).tolist(), std=pixels.std(1).tolist()))
        self.info.update(json.loads(path.read_text()))

    def folder(self, arm: Arm, seed: int) -> Path:
        return self.out / "runs" / arm.name / f"seed{seed}"


def _pretrained_model(ctx: _Context, arm: Arm, seed: int, updates: int, record: dict) -> nn.Module:
    """The arm-seed's model: pretrained for ``updates`` (resumed from its checkpoints), else at its random init."""
    folder = ctx.folder(arm, seed)
    pcfg = pretrain_config(ctx.cfg, arm, seed, ctx.info, max(updates, 1), folder)
    if not updates:
        return arm_model(pcfg, seed)
    print(f"compare: {arm.name} seed {seed}: pretraining for {updates} updates of {pcfg.batch_size}")
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = pretrain(pcfg)
    if result.interrupted:
        raise SystemExit(f"compare: {arm.name} seed {seed} stopped at update {result.step}; rerun to resume")
    record.update(pretrain_wall_s=time.perf_counter() - wall, pretrain_cpu_s=_cpu_seconds() - cpu)
    return load_model(result.checkpoint)[0]


def _features(ctx: _Context, model: nn.Module | None, images: Images, norm: nn.Module, variants: list,
              blocks: int) -> dict:
    """{variant: (N, blocks, width)} of ``images`` through the package's one extractor (``model=None``: pixels)."""
    loader = progress(MemoryLoader(images, 256, train=False), "features")
    return extract_features(model, loader, norm, ctx.device, variants, blocks)[0]


def _curve(ctx: _Context, folder: Path, norm: nn.Module, model: nn.Module | None) -> list[dict]:
    """kNN (avg pool, last block, k=20) on the hold-out at each kept checkpoint, bank: ``curve_bank`` images. An arm
    that does not pretrain (``model``: its random init, or None for raw pixels) gets one point at update 0, measured
    alike, so the figure sets the curve beside baselines on the same queries and bank."""
    train = ctx.train
    bank, queries = train.bank[: ctx.cfg.curve_bank], train.holdout
    subset = train.images.subset(torch.cat([bank, queries]))  # features of these images only

    def knn_top1(model: nn.Module | None) -> float:
        variant = choose.variants(["avg"], model)[0]
        x = select_blocks(_features(ctx, model, subset, norm, [variant], 1)[variant], 1)
        y = subset.labels
        return knn_on_features(x[: len(bank)], y[: len(bank)], x[len(bank):], y[len(bank):], subset.num_classes,
                               KnnConfig(), ctx.device)["top1"]

    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        return [dict(updates=0, knn_top1=knn_top1(model), bank=len(bank))]
    return [dict(updates=ckpt["step"], knn_top1=knn_top1(loaded), bank=len(bank))
            for loaded, ckpt in (load_model(path) for path in checkpoints)]


class _Ticker:
    """Prints each finished stage of an arm-seed with its wall seconds (progress a user can follow)."""

    def __init__(self, prefix: str):
        self.prefix, self.last = prefix, time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        print(f"{self.prefix} {stage} done in {now - self.last:.0f} s", flush=True)
        self.last = now


def _choose_frozen(ctx: _Context, arm: Arm, seed: int, model: nn.Module | None, norm: nn.Module, record: dict,
                   tick: _Ticker) -> dict:
    """kNN and probe choices on the hold-out; returns the bank features of each choice (for the test)."""
    cfg, train = ctx.cfg, ctx.train
    depth = 1 if model is None else len(mae_timm.create_timm_encoder(model).blocks)
    blocks = sorted({min(b, depth) for b in split_ints(cfg.feature_blocks)})
    features = _features(ctx, model, train.images, norm, choose.variants(cfg.pools.split(","), model), max(blocks))
    tick("frozen features of the training split")
    args = (train.images.labels, train.bank, train.holdout, train.images.num_classes, blocks)
    knn, knn_rows = choose.choose_knn(features, *args, split_ints(cfg.knn_k), ctx.device)
    tick(f"kNN choices on the hold-out ({len(knn_rows)} settings)")
    probe, probe_rows = choose.choose_linprobe(features, *args, [float(v) for v in cfg.probe_blr.split(",")],
                                               split_ints(cfg.probe_epochs), seed, ctx.device)
    tick(f"linear-probe choices on the hold-out ({len(probe_rows)} settings)")
    record.update(knn=knn, linprobe=probe, knn_holdout=knn_rows, linprobe_holdout=probe_rows)
    return {name: select_blocks(features[tuple(c["variant"])], c["blocks"])[train.bank].clone()
            for name, c in (("knn", knn), ("linprobe", probe))}


def _choose_finetunes(ctx: _Context, arm: Arm, seed: int, model: nn.Module, record: dict, tick: _Ticker) -> None:
    """Fine-tune and partial fine-tune on the bank; the best epoch on the hold-out is kept (``<protocol>.pt``)."""
    cfg, train = ctx.cfg, ctx.train
    bank = train.images.subset(train.bank[: cfg.finetune_images] if cfg.finetune_images else train.bank)
    for protocol, tune in (("finetune", None), ("partial_finetune", cfg.partial_blocks or None)):
        if protocol == "partial_finetune" and tune is None:
            continue
        ft = choose.finetune_config(cfg.finetune_epochs, cfg.finetune_batch_size, seed, tune)
        chosen, state = choose.finetune_on_holdout(model, bank, train.images.subset(train.holdout), ft, ctx.device)
        torch.save(state, ctx.folder(arm, seed) / f"{protocol}.pt")
        record[protocol] = dict(chosen, tune_last_blocks=tune, train_images=len(bank))
        tick(protocol)
        print(f"compare: {arm.name} seed {seed}: {protocol} hold-out top-1 {chosen['top1']:.2f} at epoch "
              f"{chosen['epoch']}")


def run_arm_seed(ctx: _Context, arm: Arm, seed: int, rates: dict) -> dict:
    """Pretrain (if the arm does) and make every choice on the hold-out; ``choices.json`` of the arm-seed."""
    folder = ctx.folder(arm, seed)
    path = folder / "choices.json"
    if path.is_file():
        print(f"compare: {arm.name} seed {seed}: choices done before ({path})")
        return json.loads(path.read_text())
    updates = arm_updates(ctx.cfg, arm, rates)
    record = dict(arm=arm.name, seed=seed, updates=updates, budget=arm.budget, settings=arm.settings,
                  flops_per_update=rates.get(arm.name, {}).get("flops_per_update"),
                  load_average_start=os.getloadavg()[0])
    _ = ctx.train  # decoded before the timed stages
    folder.mkdir(parents=True, exist_ok=True)
    model = _pretrained_model(ctx, arm, seed, updates, record)
    norm = normalizer(model, ctx.device)
    features_of = None if arm.pretext == "raw_pixels" else model
    record["curve"] = _curve(ctx, folder, norm, features_of)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    tick = _Ticker(f"compare: {arm.name} seed {seed}:")
    cache = _choose_frozen(ctx, arm, seed, features_of, norm, record, tick)
    if features_of is not None and ctx.cfg.finetune_epochs > 0:
        _choose_finetunes(ctx, arm, seed, model, record, tick)
    record.update(choose_wall_s=time.perf_counter() - wall, choose_cpu_s=_cpu_seconds() - cpu,
                  load_average_end=os.getloadavg()[0])
    torch.save(dict(cache, labels=ctx.train.images.labels[ctx.train.bank].clone()), folder / "bank_features.pt")
    _write(path, record)
    knn, probe = record["knn"], record["linprobe"]
    print(f"compare: {arm.name} seed {seed}: hold-out kNN {knn['top1']:.2f} ({knn['variant']}, {knn['blocks']} "
          f"blocks, standardise {knn['standardize']}, k {knn['k']}), probe {probe['top1']:.2f}")
    return record


def test_arm_seed(ctx: _Context, test: SealedSplit, arm: Arm, seed: int) -> dict:
    """The test top-1 of each protocol of an arm-seed, with the choices made on the hold-out."""
    folder = ctx.folder(arm, seed)
    path = folder / "test.json"
    if path.is_file():
        return json.loads(path.read_text())
    choices = json.loads((folder / "choices.json").read_text())
    if choices["updates"]:
        model, _ = load_model(folder / "last.pt")
    else:
        model = arm_model(pretrain_config(ctx.cfg, arm, seed, ctx.info, 1, folder), seed)
    images, norm = test.read(), normalizer(model, ctx.device)
    features_of = None if arm.pretext == "raw_pixels" else model
    cached = torch.load(folder / "bank_features.pt", weights_only=True)
    result = dict(arm=arm.name, seed=seed)
    for protocol in ("knn", "linprobe"):
        c = choices[protocol]
        variant = tuple(c["variant"])
        x = select_blocks(_features(ctx, features_of, images, norm, [variant], c["blocks"])[variant], c["blocks"])
        if protocol == "knn":
            result["knn"] = choose.knn_test(cached["knn"], cached["labels"], x, images.labels, images.num_classes,
                                            c, ctx.device)
        else:
            result["linprobe"] = choose.linprobe_test(cached["linprobe"], cached["labels"], x, images.labels,
                                                      images.num_classes, c, seed, ctx.device)
    for protocol in ("finetune", "partial_finetune"):
        if protocol in choices:
            state = torch.load(folder / f"{protocol}.pt", weights_only=True)
            ft = choose.finetune_config(ctx.cfg.finetune_epochs, ctx.cfg.finetune_batch_size, seed,
                                        choices[protocol]["tune_last_blocks"])
            result[protocol] = choose.finetuned_top1(model, state, ft, images, ctx.device)
    _write(path, result)
    print(f"compare: {arm.name} seed {seed}: test " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()
                                                                 if isinstance(v, float)))
    return result


def run_compare(cfg: CompareConfig) -> dict:
    """Run (or resume) a compare; returns the payload of ``compare.json``."""
    from mae_timm.engine.eval.compare.report import write_holdout_report, write_report

    start, cpu = time.perf_counter(), _cpu_seconds()
    ctx = _Context(cfg)
    arms = cfg.arm_list
    ctx.out.mkdir(parents=True, exist_ok=True)
    check_same_settings(ctx.out / "config.json", cfg)
    _write(ctx.out / "config.json", asdict(cfg))
    ctx.mean_std()
    path = ctx.out / "budget.json"
    rates = budget_rates(cfg, arms, ctx.info, ctx.device, json.loads(path.read_text()) if path.is_file() else {})
    _write(path, rates)
    print(f"compare: {len(arms)} arms x {cfg.seeds} seeds on {cfg.data}; mean {ctx.info['mean']} std "
          f"{ctx.info['std']}; choices on {cfg.holdout} held-out training images")
    choices = {(arm.name, seed): run_arm_seed(ctx, arm, seed, rates) for arm in arms for seed in range(cfg.seeds)}
    if cfg.holdout_only:
        return write_holdout_report(cfg, rates, choices, wall_s=time.perf_counter() - start)
    test = SealedSplit(lambda: ctx.read(cfg.test_split))
    test.unseal()  # every arm-seed's choices.json exists: nothing below is chosen
    results = {(arm.name, seed): test_arm_seed(ctx, test, arm, seed) for arm in arms for seed in range(cfg.seeds)}
    payload = write_report(cfg, ctx.info, rates, choices, results, wall_s=time.perf_counter() - start,
                           cpu_s=_cpu_seconds() - cpu, device=str(ctx.device))
    if not cfg.keep_features:
        for path in (ctx.out / "runs").glob("*/seed*/bank_features.pt"):
            path.unlink()
    return payload
