"""Settings of the engine as dataclasses, read from defaults < a YAML file (``--config``) < command-line options.

Every field of a settings dataclass becomes an option: ``blr`` -> ``--blr``, ``batch_size`` -> ``--batch-size``,
booleans get ``--x/--no-x``, dicts take JSON (``--model-kwargs '{"drop_path_rate": 0.1}'``). The YAML file uses
the field names as keys. Model architecture stays in timm kwargs (``model_kwargs``), not here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from mae_timm.engine.runtime import PRECISIONS, UserError, atomic_write

__all__ = ["PretrainConfig", "add_config_arguments", "check_settings", "config_from_args", "load_config", "save_config"]


class Allowed(NamedTuple):
    """What a setting may be: a test of one value and its wording for the error message."""

    test: Callable[[object], bool]
    text: str


def at_least(low: float) -> Allowed:
    return Allowed(lambda v: v >= low, f"at least {low}")


def above(low: float) -> Allowed:
    return Allowed(lambda v: v > low, f"above {low}")


def fraction(*, zero: bool = False, one: bool = False) -> Allowed:
    """A value between 0 and 1, each end included when asked."""
    return Allowed(lambda v: (0 <= v if zero else 0 < v) and (v <= 1 if one else v < 1),
                   f"in {'[' if zero else '('}0, 1{']' if one else ')'}")


def one_of(*choices) -> Allowed:
    return Allowed(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


# timm VisionTransformer's poolings ('' : none)
GLOBAL_POOLS = one_of("", "avg", "avgmax", "max", "token", "map", "prr")


def check_settings(config, rules: dict[str, Allowed], options: dict[str, str] | None = None) -> None:
    """Raise UserError naming the first setting of ``config`` outside its rule (None passes: optional settings;
    each item of a tuple is checked). Settings dataclasses call this once, when they are built. ``options``: the
    command-line option of a field where it is not ``--field-name``."""
    for name, allowed in rules.items():
        value = getattr(config, name)
        if value is not None and not all(allowed.test(v) for v in (value if isinstance(value, tuple) else (value,))):
            option = (options or {}).get(name, _option_name(name))
            raise UserError(f"setting {name} ({option}) is {value!r}; it must be {allowed.text}")


@dataclass
class PretrainConfig:
    """Masked-image pretraining; defaults follow the MAE paper (He et al. 2021, appendix A.1)."""

    # model
    model: str = "mae_vit_tiny_patch8_64"  # any registered pretext model (mae_*, apl_*) by timm name
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs, e.g. {"drop_path_rate": 0.1}
    # or any timm ViT: `pretext` ("mae" / "early_mask") over the timm model `encoder` built with `encoder_kwargs`;
    # `model_kwargs` then holds the pretext options (decoder_embed_dim, decoder_depth, mask_type, ...)
    pretext: str | None = None
    encoder: str | None = None  # e.g. vit_small_patch14_reg4_dinov2
    encoder_kwargs: dict = field(default_factory=dict)  # e.g. {"img_size": 56}
    norm_pix_loss: bool = True  # MAE: per-patch normalised pixel targets (paper table 1c); models without it ignore it
    mask_ratio: float = 0.75  # MAE: 75 % masked (paper fig. 5); passed to models whose forward takes mask_ratio

    # data
    data: str | None = None  # shard directory (with _info.json) or a comma-separated list of shard urls
    split: str = "train"  # split of the shard directory to pretrain on
    synthetic: bool = False  # random images derived from (seed, rank, step) instead of shards: smoke tests, timing
    synthetic_samples: int = 4096  # images per synthetic epoch
    img_size: int | None = None  # None: the model's input size; else the model is built at it (a multiple of its patch)
    crop_scale_min: float = 0.2  # MAE: RandomResizedCrop(scale=(0.2, 1.0)), done on the device
    hflip: bool = True  # MAE: random horizontal flip
    num_workers: int = 4  # data loader processes per rank

    # optimisation
    batch_size: int = 256  # images per rank per micro-step (global batch = batch_size * accum_steps * world size)
    accum_steps: int = 1  # micro-steps per optimizer update (gradient accumulation)
    epochs: int = 100  # length of the cosine schedule
    warmup_epochs: int = 5  # linear warmup from 0, below `epochs` (MAE: 40 of 800; scaled down for short schedules)
    max_steps: int = 0  # stop after this many updates (0: run all epochs); the schedule still spans `epochs`
    blr: float = 1.5e-4  # MAE base lr: lr = blr * global batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0  # floor of the cosine decay
    weight_decay: float = 0.05  # MAE: 0.05, not applied to biases, norms, pos tables and tokens
    betas: tuple[float, float] = (0.9, 0.95)  # MAE: AdamW beta2 0.95 (more stable at large batch than 0.999)
    clip_grad: float | None = None  # max global grad norm; MAE pretraining does not clip

    # execution
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu), bf16, fp16 (with a grad scaler), fp32
    # torch.compile the forward + backward: off, default, max-autotune, reduce-overhead (CUDA graphs), or auto (off on
    # the CPU, default on CUDA; docs/training.md says why); true / false read as default / off
    compile: str = "auto"
    seed: int = 0  # model init, data order and masks; each rank derives its own stream from (seed, rank, step)

    # output
    out: str = "runs/pretrain"  # run folder: checkpoints, metrics.jsonl, figures, TensorBoard events
    # None: a fresh run (stops if `out` holds checkpoints); "auto": the newest valid checkpoint in `out`, fresh if
    # none; or a checkpoint path
    resume: str | None = None
    save_every_steps: int = 1000  # checkpoint every N updates (0: only at epoch ends)
    save_every_epochs: int = 1  # checkpoint at the end of every N-th epoch (the last epoch always)
    keep_last: int = 3  # numbered checkpoints kept on disk (last.pt links the newest)
    viz_every_epochs: int = 10  # reconstruction grid + loss curve every N epochs (0: off); needs matplotlib
    tensorboard: bool = True  # write TensorBoard events to out/tb when tensorboard is installed
    progress: bool = True  # tqdm progress bar on rank 0

    def __post_init__(self):
        check_settings(self, _PRETRAIN_RULES)


_PRETRAIN_RULES = dict(
    mask_ratio=fraction(zero=True), synthetic_samples=at_least(1), img_size=at_least(1),
    crop_scale_min=fraction(one=True), num_workers=at_least(0), batch_size=at_least(1), accum_steps=at_least(1),
    epochs=at_least(1), warmup_epochs=at_least(0), max_steps=at_least(0), blr=above(0), lr=above(0),
    min_lr=at_least(0), weight_decay=at_least(0), betas=fraction(zero=True), clip_grad=above(0),
    precision=one_of(*PRECISIONS), save_every_steps=at_least(0), save_every_epochs=at_least(0),
    keep_last=at_least(0), viz_every_epochs=at_least(0),
)


def _option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp):
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp, value):
    """Turn a YAML or command-line value into the field's type, with a one-line error naming the setting."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UserError(f"setting '{name}' cannot be empty")
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return tp(value)
        if tp is dict or typing.get_origin(tp) is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if typing.get_origin(tp) is tuple:
            item_types = typing.get_args(tp)
            value = value.split(",") if isinstance(value, str) else value
            if len(value) != len(item_types):
                raise ValueError(value)
            return tuple(_coerce(name, t, v) for t, v in zip(item_types, value, strict=True))
    except (TypeError, ValueError, json.JSONDecodeError):
        raise UserError(f"setting '{name}': cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    raise TypeError(f"setting '{name}': unsupported type {tp}")


def load_config(cls, path: str | Path | None = None, overrides: dict | None = None):
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``overrides`` (field name -> value)."""
    types_ = _field_types(cls)
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:  # a syntax error, or a tag (!!python/...) that safe_load refuses
            problem = getattr(e, "problem", None) or type(e).__name__
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"config file {path} is not plain YAML: {problem}{where}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {path} must hold a mapping of setting: value")
        values.update(loaded)
    values.update(overrides or {})
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(types_)}")
    return cls(**{name: _coerce(name, types_[name], value) for name, value in values.items()})


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add ``--config`` and one option per field of ``cls`` (help = the field's default)."""
    parser.add_argument("--config", default=None, help="YAML file of settings (command-line options override it)")
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for name, tp in _field_types(cls).items():
        f = defaults[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        base, _ = _strip_optional(tp)
        kwargs = dict(dest=name, default=argparse.SUPPRESS, help=f"default: {default}")
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:
            kwargs["nargs"] = len(typing.get_args(base))
            kwargs["metavar"] = tuple(t.__name__.upper() for t in typing.get_args(base))
        else:
            kwargs["metavar"] = "JSON" if base is dict else getattr(base, "__name__", "VALUE").upper()
        parser.add_argument(_option_name(name), **kwargs)


def config_from_args(cls, args: argparse.Namespace):
    """The settings given by ``--config`` plus the options the user typed (others keep the file's or defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {name: value for name, value in vars(args).items() if name in names}
    return load_config(cls, getattr(args, "config", None), overrides)


def save_config(config, path: str | Path) -> None:
    """Write ``config`` as YAML that ``load_config`` reads back to an equal object."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    with atomic_write(path, "w") as f:
        f.write(yaml.safe_dump(values, sort_keys=False))


# ---- evaluation: where the labelled data comes from, and one settings class per protocol --------------------------

__all__ += ["EvalData", "KnnConfig", "LinprobeConfig", "FinetuneConfig"]


@dataclass
class EvalData:
    """Where the labelled images come from."""

    data: str  # shard directory (with _info.json)
    train_split: str = "train"  # memory bank (kNN) / training set (linprobe, finetune)
    val_split: str = "validation"  # the split accuracies are reported on
    batch_size: int = 256  # feature extraction batch; finetune and linprobe have their own
    num_workers: int = 4  # loader worker processes
    device: str | None = None  # None / auto: cuda when available, else cpu

    def __post_init__(self):
        check_settings(self, dict(batch_size=at_least(1), num_workers=at_least(0)),
                       options=dict(batch_size="--eval-batch-size"))


# Frozen features (kNN, linear probe): the same pooling for every model, so late mask, early mask and APL are
# compared on the same definition (mae_timm.engine.eval_setup.encoder_features).


@dataclass
class KnnConfig:
    """Weighted kNN on frozen features (Wu et al. 2018, as used by DINO)."""

    k: int = 20  # neighbours that vote (the reported top1 / top5)
    temperature: float = 0.07  # a neighbour's vote is exp(cosine similarity / temperature)
    report_k: tuple[int, int, int] = (10, 20, 200)  # also report top-1 at these k (top1_by_k), from the same search
    global_pool: str = "avg"  # 'avg': mean of the patch tokens (every model has them); 'token': the class token
    feature_blocks: int = 1  # concatenate the pooled tokens of the last N blocks (each through the final norm)

    def __post_init__(self):  # k and temperature: knn_evaluate checks them
        check_settings(self, dict(global_pool=GLOBAL_POOLS))


@dataclass
class LinprobeConfig:
    """Linear probe on frozen features (MAE paper, appendix A.2; official main_linprobe.py)."""

    epochs: int = 90  # MAE paper: 90 epochs
    batch_size: int = 1024  # head batch size over cached features
    # lr = blr * batch_size / 256 with LARS (MAE paper: blr 0.1 at batch 16384, lr 6.4); at batch 1024 blr 1.0
    # (lr 4) was best of 0.1 / 1.0 / 3.0 on raw Fashion-MNIST pixels, 30 epochs, 50k train / 10k held-out train
    blr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.0  # MAE paper: no weight decay for the probe
    warmup_epochs: int = 10  # linear warmup, then cosine to 0; must be below epochs (runtime.check_warmup)
    global_pool: str = "avg"  # as KnnConfig.global_pool
    feature_blocks: int = 1  # as KnnConfig.feature_blocks
    seed: int = 0  # head init and batch order

    def __post_init__(self):  # epochs and warmup: the one warmup rule, when the probe starts
        check_settings(self, dict(batch_size=at_least(2), blr=above(0), momentum=fraction(zero=True),
                                  weight_decay=at_least(0), global_pool=GLOBAL_POOLS))


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning (MAE paper, appendix A.1; official ``main_finetune.py``).

    Short runs get a milder recipe by one rule: with ``r = min(1, updates of the run / full_recipe_updates)``,
    mixup/cutmix and RandAugment are applied with probability r, random erasing with ``reprob * r``, drop path at
    ``drop_path_rate * r``, the crop's smallest scale is ``1 - r * (1 - crop_scale_min)``, layer decay is
    ``1 - r * (1 - layer_decay)`` and the cosine ends at ``(1 - r) * lr + r * min_lr``. Warmup (from ``min_lr``) is
    ``warmup_epochs`` but at most ``max_warmup_fraction`` of the run.
    """

    epochs: int = 100  # MAE paper: 100 epochs for ViT-B
    batch_size: int = 128  # per step
    blr: float = 1e-3  # lr = blr * batch_size / 256 (MAE paper: 5e-4 for ViT-B at batch 1024)
    min_lr: float = 1e-6  # end of the cosine schedule
    warmup_epochs: int = 5  # linear warmup, then cosine; must be below epochs (runtime.check_warmup)
    max_warmup_fraction: float = 0.1  # a short run warms up for at most this part of its updates
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # lr of block i is lr * layer_decay ** (depth + 1 - i)
    drop_path_rate: float = 0.1  # at the full recipe (scaled by r)
    label_smoothing: float = 0.1
    mixup: float = 0.8  # mixup alpha; 0 disables
    cutmix: float = 1.0  # cutmix alpha; 0 disables
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment config (MAE fine-tune); None disables
    reprob: float = 0.25  # random erasing probability at the full recipe (MAE fine-tune: 0.25, 'pixel' mode)
    full_recipe_updates: int = 5000  # runs with at least this many updates get the full recipe (r = 1)
    global_pool: str = "avg"  # MAE paper fine-tunes on average-pooled tokens + fc_norm
    fc_norm: bool = True  # final LayerNorm after the pool (MAE fine-tune); False: before it, as in pretraining
    crop_scale_min: float = 0.08  # RandomResizedCrop scale (.., 1) at the full recipe + flip, on the device
    clip_grad: float | None = None  # max gradient norm; None: no clipping
    seed: int = 0  # head init, shuffling, crops, mixup draws
    # write the fine-tuned classifier here (timm local-dir folder last/, with metrics); `mae-timm finetune`
    # defaults it to <out>/finetuned
    save_dir: str | None = None

    def __post_init__(self):  # epochs and warmup: the one warmup rule, when fine-tuning starts
        check_settings(self, _FINETUNE_RULES)
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size < 2:
            raise UserError(f"setting batch_size (--batch-size) is {self.batch_size}; mixup and cutmix pair "
                            "samples, so it must be at least 2 (or set --mixup 0 --cutmix 0)")


_FINETUNE_RULES = dict(
    batch_size=at_least(1), blr=above(0), min_lr=at_least(0), weight_decay=at_least(0),
    layer_decay=fraction(one=True), drop_path_rate=fraction(zero=True), label_smoothing=fraction(zero=True),
    mixup=at_least(0), cutmix=at_least(0), global_pool=GLOBAL_POOLS, crop_scale_min=fraction(one=True),
    clip_grad=above(0),
)
