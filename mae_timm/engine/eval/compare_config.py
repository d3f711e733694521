"""The settings of ``mae-timm compare`` (arms, budget, seeds, the hold-out grids) and what a resumed compare may
change of them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mae_timm.utils import UserError

__all__ = ["BUILTIN_ARMS", "CompareConfig", "check_same_settings", "split_ints"]

# arm -> registered pretext model; scratch is the mae architecture at random init, raw_pixels the input itself
BUILTIN_ARMS = {"mae": "mae_vit_tiny_patch8_64", "early_mask": "mae_vit_tiny_early_mask", "apl": "apl_vit_tiny_64",
                "scratch": "mae_vit_tiny_patch8_64", "raw_pixels": None}


def split_ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


@dataclass
class CompareConfig:
    """Arms x seeds x protocols (kNN, linear probe, fine-tune, partial fine-tune) with hold-out choices."""

    data: str | None = None  # shard directory from `mae-timm shards` (labelled train and test splits, _info.json)
    # comma-separated arms: raw_pixels, scratch, mae, early_mask, apl, or pretext:timm_vit (mae:vit_small_patch16_224);
    # a suffix @compute gives that arm the FLOPs of --updates mae updates instead of --updates updates
    arms: str = "raw_pixels,scratch,mae"
    updates: int = 2000  # pretraining updates of every pretrained arm (the equal-updates budget)
    seeds: int = 3  # seeds 0..S-1 of every arm (pretraining, probe, fine-tune draws)
    out: str = "runs/compare"  # run folder: runs/<arm>/seed<s>/, compare.json, compare.md, the figure
    train_split: str = "train"  # pretraining, hold-out and protocol training images
    test_split: str = "validation"  # read once, after every choice is fixed
    holdout: int = 5000  # training images carved off (one fixed draw) on which every choice is made
    # the encoder of every arm (timm ViT kwargs; in_chans comes from the shards): default Fashion-MNIST's 28 px in
    # 7-px patches, 192 d x 4 blocks
    encoder: dict | None = None
    decoder: dict | None = None  # MAE decoder kwargs; default one block of 96 d, 4 heads
    batch_size: int = 256  # pretraining images per update
    blr: float = 1.5e-3  # pretraining lr = blr * batch / 256
    mask_ratio: float = 0.75  # share of patches removed in pretraining
    norm_pix_loss: bool = True  # MAE: per-patch normalised pixel targets
    crop_scale_min: float = 0.5  # pretraining RandomResizedCrop scale (crop_scale_min, 1)
    warmup_fraction: float = 0.05  # share of the pretraining epochs spent in linear warmup
    curve_points: int = 2  # checkpoints per pretraining run measured by kNN on the hold-out (accuracy vs updates)
    curve_bank: int = 10000  # bank images for those curve points (a subset: the curve is a trend, not a result)
    knn_k: str = "10,20,50,100"  # kNN k candidates (chosen on the hold-out)
    feature_blocks: str = "1,2,4"  # last-N-blocks candidates for the frozen features (capped at the depth)
    # pooling candidates: avg (mean of the patch tokens), token (class token, where there is one), flat (the patch
    # tokens in grid order, spatial layout kept: patches x width features)
    pools: str = "avg,token"
    probe_blr: str = "1.0,0.1,3.0"  # linear-probe base lr candidates (lr = blr * 1024 / 256)
    probe_epochs: str = "30,10"  # linear-probe epoch candidates
    finetune_epochs: int = 2  # fine-tune epochs; the best epoch on the hold-out is kept
    finetune_images: int | None = None  # train the fine-tunes on the first N bank images (None: all of them)
    finetune_batch_size: int = 128  # fine-tune images per update
    partial_blocks: int = 1  # partial fine-tune: train the last k blocks + head (MAE fig. 9); 0 skips it
    # keep each arm-seed's cached bank features (runs/<arm>/seed<s>/bank_features.pt) after the report, so a lost
    # test.json can be measured again; False deletes them (they are large)
    keep_features: bool = True
    num_workers: int = 2  # decoding / loader processes
    device: str = "auto"  # auto: cuda when available, else cpu

    def __post_init__(self):
        if not self.data:
            raise UserError("compare needs --data, a shard directory written by `mae-timm shards`")
        if self.updates < 1 or self.seeds < 1 or self.holdout < 1 or self.finetune_epochs < 0:
            raise UserError(f"updates, seeds and holdout must be >= 1 and finetune_epochs >= 0, got {self.updates}, "
                            f"{self.seeds}, {self.holdout}, {self.finetune_epochs}")
        for name in ("knn_k", "feature_blocks", "probe_epochs"):
            values = split_ints(getattr(self, name))
            if not values or min(values) < 1:
                raise UserError(f"{name} must be comma-separated integers >= 1, got {getattr(self, name)!r}")
        if not set(self.pools.split(",")) <= {"avg", "token", "flat"}:
            raise UserError(f"pools must be among avg, token and flat, got {self.pools!r}")
        for arm in self.arm_names():
            base = arm.split("@")[0]
            if base not in BUILTIN_ARMS and ":" not in base or arm.endswith("@") or "@" in arm and not arm.endswith(
                    "@compute"):
                raise UserError(f"unknown arm {arm!r}; choose from {', '.join(BUILTIN_ARMS)} or pretext:encoder, "
                                "optionally with @compute")

    def arm_names(self) -> list[str]:
        names = [a.strip() for a in self.arms.split(",") if a.strip()]
        if not names:
            raise UserError("--arms names no arm")
        return names


# what a resumed compare may change: which arm-seeds run and where, not what they measure
_FREE_SETTINGS = frozenset({"arms", "seeds", "out", "num_workers", "device", "keep_features"})


def check_same_settings(path: Path, cfg: CompareConfig) -> None:
    """A run folder's finished arm-seeds are reused, so the settings they were made with must still hold."""
    if not path.is_file():
        return
    before, now = json.loads(path.read_text()), json.loads(json.dumps(asdict(cfg)))
    differ = [f"{k} {before.get(k)!r} (now {v!r})" for k, v in now.items()
              if k not in _FREE_SETTINGS and before.get(k) != v]
    if differ:
        raise UserError(f"{path.parent} holds a compare made with {', '.join(differ)[:300]}; its finished arm-seeds "
                        "would be reused: rerun with those settings or choose a new --out")
