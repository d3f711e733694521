"""The settings of ``mae-timm compare`` (arms, budget, seeds, the hold-out grids) and what a resumed compare may
change of them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mae_timm.engine.eval.compare.arms import Arm, parse_arms
from mae_timm.engine.eval.features import POOLS
from mae_timm.utils import UserError

__all__ = ["CompareConfig", "check_same_settings", "split_ints"]


def split_ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


@dataclass
class CompareConfig:
    """Arms x seeds x protocols (kNN, linear probe, fine-tune, partial fine-tune) with hold-out choices."""

    data: str | None = None  # shard directory from `mae-timm shards` (labelled train and test splits, _info.json)
    # comma-separated arms, or an arms YAML file: raw_pixels, scratch, mae, early_mask, apl, or pretext:timm_vit
    # (mae:vit_small_patch16_224); {setting=value,...} sets this arm's recipe (mask_ratio, blr, batch_size,
    # crop_scale_min, warmup_fraction, norm_pix_loss, or a keyword of its model such as decoder_depth); @compute
    # gives the arm the FLOPs of --updates mae updates, @wall their wall time on this machine (measured rates)
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
    warmup_fraction: float = 0.05  # share of each arm's pretraining updates spent in linear warmup
    curve_points: int = 2  # checkpoints per pretraining run measured by kNN on the hold-out (accuracy vs updates)
    curve_bank: int = 10000  # bank images for those curve points (a subset: the curve is a trend, not a result)
    knn_k: str = "10,20,50,100"  # kNN k candidates (chosen on the hold-out)
    feature_blocks: str = "1,2,4"  # last-N-blocks candidates for the frozen features (capped at the depth)
    # pooling candidates: avg (mean of the patch tokens), token (class token, where there is one), flat (the patch
    # tokens in grid order, spatial layout kept: patches x width features, stored in fp16)
    pools: str = "avg,token,flat"
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
    # stop once every arm-seed's hold-out choices exist and write holdout.json / holdout.md (the hold-out scores):
    # the test split is never read, so recipes can be searched; a rerun without it goes on to the test split
    holdout_only: bool = False
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
        if not self.pools or not set(self.pools.split(",")) <= set(POOLS):
            raise UserError(f"pools must be among {', '.join(POOLS[:-1])} and {POOLS[-1]}, got {self.pools!r}")
        self._arms = parse_arms(self.arms)

    @property
    def arm_list(self) -> list[Arm]:
        """The arms, parsed once when the settings are read."""
        return self._arms


# what a resumed compare may change: which arm-seeds run and where, not what they measure
_FREE_SETTINGS = frozenset({"arms", "seeds", "out", "num_workers", "device", "keep_features", "holdout_only"})


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
