"""What an arm trains: its pretraining settings and model (one way to build it, pretrained or at random init), and
its budget: ``--updates`` updates, or the FLOPs (``@compute``) or wall time (``@wall``) of ``--updates`` updates of
the reference arm ``mae``."""

from __future__ import annotations

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

WARMUP_UPDATES, TIMED_UPDATES = 3, 10  # the short timed run behind an @wall budget


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


def _updates_per_second(pcfg: PretrainConfig, device: torch.device) -> float:
    """Pretraining updates per second of ``pcfg``'s model on random images (after a warm-up), as the loop runs them."""
    model = arm_model(pcfg, 0, device).to(device).train()
    trainer = build_trainer(pcfg, model, DistInfo(device=device), lr=pcfg.blr * pcfg.batch_size / 256,
                            updates_per_epoch=WARMUP_UPDATES + TIMED_UPDATES)
    size, chans = model.input_size(), model.input_channels()
    imgs = torch.randint(0, 256, (pcfg.batch_size, chans, size, size), dtype=torch.uint8)
    for update in range(WARMUP_UPDATES + TIMED_UPDATES):
        if update == WARMUP_UPDATES:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        stats = trainer.step(update, [imgs])
    stats["loss"].item()  # waits for the device
    return TIMED_UPDATES / (time.perf_counter() - start)


def budget_rates(cfg: CompareConfig, arms: list[Arm], info: dict, device: torch.device, known: dict) -> dict:
    """Per arm that pretrains and the reference: FLOPs of an update and, for @wall arms and the reference when one
    is asked for, updates per second measured here. ``known`` (a resumed compare's record) is kept as it is."""
    needs_wall = any(arm.budget == "wall" for arm in arms)
    reference = parse_arm(REFERENCE)
    for arm in [a for a in arms if a.pretrains] + [reference]:
        entry = dict(known.get(arm.name, {}))
        pcfg = pretrain_config(cfg, arm, 0, info, 1, Path(cfg.out) / "unused")
        if "flops_per_update" not in entry:
            entry["flops_per_update"] = update_flops(arm_model(pcfg, 0), pcfg.batch_size, pcfg.mask_ratio)
        if "updates_per_s" not in entry and (arm.budget == "wall" or (arm.name == REFERENCE and needs_wall)):
            entry["updates_per_s"] = _updates_per_second(pcfg, device)
            entry["rate_measured_with"] = f"{TIMED_UPDATES} updates after {WARMUP_UPDATES}, random images, {device}"
        known[arm.name] = entry
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
