"""What an arm trains: its pretraining settings and model (one way to build it, pretrained or at random init), and
its budget: ``--updates`` updates, or the FLOPs (``@compute``) or wall time (``@wall``) of ``--updates`` updates of
the reference arm ``mae``."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from mae_timm.engine.eval.compare.arms import BUILTIN_ARMS, REFERENCE, Arm, parse_arm
from mae_timm.engine.eval.compare.config import CompareConfig
from mae_timm.engine.flops import update_flops
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.distributed import DistInfo
from mae_timm.engine.train.model_setup import build_model
from mae_timm.engine.train.trainer import build_trainer
from mae_timm.utils import seed_everything

__all__ = ["arm_model", "arm_updates", "budget_rates", "encoder_kwargs", "pretrain_config"]

WARMUP_UPDATES, ROUNDS, UPDATES_PER_ROUND = 3, 7, 2  # the timing behind an @wall budget


def encoder_kwargs(cfg: CompareConfig, in_chans: int) -> dict:
    """The encoder of every arm (timm ViT kwargs): ``cfg.encoder`` or 28 px in 7-px patches, 192 d x 4 blocks."""
    base = dict(img_size=28, patch_size=7, embed_dim=192, depth=4, num_heads=6)
    return dict(base if cfg.encoder is None else cfg.encoder, in_chans=in_chans)


def pretrain_config(cfg: CompareConfig, arm: Arm, seed: int, info: dict, updates: int, out: Path) -> PretrainConfig:
    """The pretraining run of an arm-seed (scratch / raw_pixels: the mae arm's, never run, for the architecture)."""
    recipe = replace(cfg, **arm.recipe) if arm.recipe else cfg
    encoder = encoder_kwargs(cfg, info.get("channels") or 3)
    stats = dict(pretrained_cfg_overlay=dict(mean=list(info["mean"]), std=list(info["std"])))
    decoder = dict(cfg.decoder or dict(decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=4))
    model = dict()
    if ":" in arm.pretext:
        pretext, vit = arm.pretext.split(":", 1)
        model = dict(pretext=pretext, encoder=vit, encoder_kwargs=dict(encoder, **stats),
                     model_kwargs={**decoder, **arm.model_kwargs})
    elif arm.pretext == "apl":
        grid = encoder["img_size"] // encoder["patch_size"]
        kwargs = {k: v for k, v in encoder.items() if k != "patch_size"}
        model = dict(model=BUILTIN_ARMS["apl"],
                     model_kwargs={**kwargs, "crop": 1, **stats, "grid_size": grid, **arm.model_kwargs})
    else:
        model = dict(model=BUILTIN_ARMS[arm.pretext] or BUILTIN_ARMS[REFERENCE],
                     model_kwargs={**encoder, **decoder, "mae_init": False, **stats, **arm.model_kwargs})
    per_epoch = max(info["splits"][cfg.train_split]["num_samples"] // recipe.batch_size, 1)
    epochs = -(-updates // per_epoch)
    warmup = recipe.warmup_fraction * updates / per_epoch  # in epochs, a share of this arm's updates
    return PretrainConfig(
        **model, img_size=encoder["img_size"], data=cfg.data, split=cfg.train_split, batch_size=recipe.batch_size,
        blr=recipe.blr, mask_ratio=recipe.mask_ratio, norm_pix_loss=recipe.norm_pix_loss,
        crop_scale_min=recipe.crop_scale_min, epochs=epochs, warmup_epochs=warmup, max_steps=updates,
        device=cfg.device, num_workers=cfg.num_workers, seed=seed, out=str(out), resume="auto",
        save_every_steps=max(updates // max(cfg.curve_points, 1), 1), save_every_epochs=10**6,
        keep_last=max(cfg.curve_points, 1), viz_every_epochs=0, tensorboard=False, progress=False,
    )


def arm_model(pcfg: PretrainConfig, seed: int, device: torch.device | None = None) -> nn.Module:
    """The arm's model at its random init drawn under ``seed`` (scratch; the raw-pixel arm's normalisation)."""
    with torch.random.fork_rng():
        seed_everything(seed)
        model, _ = build_model(pcfg, device)
    return model


def _timed_step(pcfg: PretrainConfig, device: torch.device):
    """A function running one pretraining update of ``pcfg``'s model on random images, as the loop runs them."""
    model = arm_model(pcfg, 0, device).to(device).train()
    trainer = build_trainer(pcfg, model, DistInfo(device=device), lr=pcfg.blr * pcfg.batch_size / 256,
                            updates_per_epoch=WARMUP_UPDATES + ROUNDS * UPDATES_PER_ROUND)
    size, chans = model.input_size(), model.input_channels()
    imgs = torch.randint(0, 256, (pcfg.batch_size, chans, size, size), dtype=torch.uint8)
    done = iter(range(10**9))

    def step() -> None:
        trainer.step(next(done), [imgs])["loss"].item()  # .item() waits for the device

    return step


def _updates_per_second(pcfgs: dict[str, PretrainConfig], device: torch.device) -> dict[str, float]:
    """Updates per second of each run, timed in turns (round r times every run once, in a rotated order), so a load
    that comes and goes on a shared machine falls on every run alike; the median round of each is kept."""
    steps = {name: _timed_step(pcfg, device) for name, pcfg in pcfgs.items()}
    for step in steps.values():
        for _ in range(WARMUP_UPDATES):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for _ in range(UPDATES_PER_ROUND):
                steps[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: UPDATES_PER_ROUND / statistics.median(s) for name, s in seconds.items()}


def budget_rates(cfg: CompareConfig, arms: list[Arm], info: dict, device: torch.device, known: dict) -> dict:
    """Per arm that pretrains and the reference: FLOPs of an update and, for @wall arms and the reference when one
    is asked for, updates per second measured here (all of them in one interleaved timing). ``known`` (a resumed
    compare's record) is kept as it is."""
    needs_wall = any(arm.budget == "wall" for arm in arms)
    reference = parse_arm(REFERENCE)
    to_time = {}
    for arm in [reference] + [a for a in arms if a.pretrains]:  # the reference first: others share its timing
        entry = known.setdefault(arm.name, {})
        pcfg = pretrain_config(cfg, arm, 0, info, 1, Path(cfg.out) / "unused")
        if "flops_per_update" not in entry:
            entry["flops_per_update"] = update_flops(arm_model(pcfg, 0), pcfg.batch_size, pcfg.mask_ratio)
        if "updates_per_s" not in entry and (arm.budget == "wall" or (arm.name == REFERENCE and needs_wall)):
            to_time[arm.name] = pcfg
    if to_time:
        # an update's time depends on the model, its batch and the mask ratio, not on lr, augmentation or schedule:
        # arms alike in those share one timing (timing noise cannot give them different budgets)
        def cost_key(pcfg: PretrainConfig) -> str:
            return repr((pcfg.model, pcfg.model_kwargs, pcfg.pretext, pcfg.encoder, pcfg.encoder_kwargs,
                         pcfg.batch_size, pcfg.mask_ratio))

        timed = {}
        for name, pcfg in to_time.items():
            timed.setdefault(cost_key(pcfg), (name, pcfg))
        rates = _updates_per_second(dict(timed.values()), device)
        how = (f"median of {ROUNDS} interleaved rounds of {UPDATES_PER_ROUND} updates after {WARMUP_UPDATES}, random "
               f"images, {device}")
        for name, pcfg in to_time.items():
            shared = timed[cost_key(pcfg)][0]
            known[name].update(updates_per_s=rates[shared], rate_measured_with=how if shared == name else
                               f"{how}; the timing of {shared} (same model, batch and mask ratio)")
    return known


def arm_updates(cfg: CompareConfig, arm: Arm, rates: dict) -> int:
    """Pretraining updates of an arm: --updates, or the FLOPs / the wall time of --updates updates of ``mae``."""
    if not arm.pretrains:
        return 0
    if arm.budget == "updates":
        return cfg.updates
    ref, own = rates[REFERENCE], rates[arm.name]
    if arm.budget == "compute":
        return max(round(cfg.updates * ref["flops_per_update"] / own["flops_per_update"]), 1)
    return max(round(cfg.updates * own["updates_per_s"] / ref["updates_per_s"]), 1)
