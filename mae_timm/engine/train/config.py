"""The settings of a pretraining run (defaults < ``--config`` YAML < command-line options, see
:mod:`mae_timm.utils.settings`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mae_timm.utils import UserError
from mae_timm.utils.device import PRECISIONS
from mae_timm.utils.settings import above, at_least, check_settings, check_warmup, fraction, one_of

__all__ = ["COMPILE_MODES", "PretrainConfig", "compile_setting"]

COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead")
_COMPILE_BOOLEANS = {"true": "default", "false": "off"}  # a YAML `compile: true` / `false` means default / off


@dataclass
class PretrainConfig:
    """Masked-image pretraining; defaults follow the MAE paper (He et al. 2021, appendix A.1)."""

    # model
    model: str = "mae_vit_tiny_patch8_64"  # any registered pretext model (mae_*, apl_*) by timm name
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs, e.g. {"drop_path_rate": 0.1}
    # or any timm ViT: `pretext` ("mae" / "early_mask") over the timm model `encoder` built with `encoder_kwargs`;
    # `model_kwargs` then holds the pretext options (decoder_embed_dim, decoder_depth, mask_type, ...); an `encoder`
    # without `pretext` is pretrained with mae
    pretext: str | None = None
    encoder: str | None = None  # e.g. vit_small_patch14_reg4_dinov2
    encoder_kwargs: dict = field(default_factory=dict)  # e.g. {"img_size": 56}
    norm_pix_loss: bool = True  # MAE: per-patch normalised pixel targets (paper table 1c); models without it ignore it
    mask_ratio: float = 0.75  # MAE: 75 % masked (paper fig. 5); passed to models whose forward takes mask_ratio

    # data
    data: str | None = None  # shard directory (with _info.json) or a comma-separated list of shard urls
    split: str = "train"  # split of the shard directory to pretrain on
    num_samples: int | None = None  # images in `data` when it has no _info.json (a shard pattern or url list)
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
    # linear warmup from 0, below `epochs` (MAE: 40 of 800; scaled down for short schedules); fractions of an epoch
    # are allowed: the schedule steps per update
    warmup_epochs: float = 5
    max_steps: int = 0  # stop after this many updates (0: run all epochs); the schedule still spans `epochs`
    blr: float = 1.5e-4  # MAE base lr: lr = blr * global batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0  # floor of the cosine decay
    weight_decay: float = 0.05  # MAE: 0.05, not applied to biases, norms, pos tables and tokens
    betas: tuple[float, float] = (0.9, 0.95)  # MAE: AdamW beta2 0.95 (more stable at large batch than 0.999)
    clip_grad: float | None = None  # max global grad norm; MAE pretraining does not clip

    # execution
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1
    # auto (bf16 on cuda; on a cpu with AMX-BF16 / AVX512-BF16 units, bf16 with fp32 attention when a short timing
    # probe finds it faster, else fp32), bf16, fp16 (with a grad scaler), fp32
    precision: str = "auto"
    # torch.compile the forward + backward: off, default, max-autotune, reduce-overhead (CUDA graphs), or auto
    # (default on CUDA; on the CPU only when the measured compile time is won back within the planned updates,
    # docs/training.md); true / false read as default / off
    compile: str = "auto"
    seed: int = 0  # model init, data order and masks; each rank derives its own stream from (seed, rank, step)
    # seconds a rank waits for the others (forming the process group, every collective) before the run stops
    dist_timeout: float = 600.0

    # output
    out: str = "runs/pretrain"  # run folder: checkpoints, metrics.jsonl, figures, TensorBoard events
    # None: a fresh run (stops if `out` holds checkpoints); "auto": the newest valid checkpoint in `out`, fresh if
    # none; or a checkpoint path
    resume: str | None = None
    force_resume: bool = False  # resume although the checkpoint was made with another seed or other data
    save_every_steps: int = 1000  # checkpoint every N updates (0: only at epoch ends)
    save_every_epochs: int = 1  # checkpoint at the end of every N-th epoch (the last epoch always)
    keep_last: int = 3  # numbered checkpoints kept on disk (last.pt links the newest)
    viz_every_epochs: int = 10  # reconstruction grid + loss curve every N epochs (0: off); needs matplotlib
    tensorboard: bool = True  # write TensorBoard events to out/tb when tensorboard is installed
    progress: bool = True  # tqdm progress bar on rank 0

    def __post_init__(self):
        check_settings(self, _PRETRAIN_RULES)
        check_warmup(self.warmup_epochs, self.epochs)
        self.compile = compile_setting(self.compile)


def compile_setting(value: str | bool) -> str:
    """The compile setting, checked: ``auto`` or one of :data:`COMPILE_MODES` (true / false read as default / off).
    Raises UserError for anything else."""
    name = str(value).lower()
    name = _COMPILE_BOOLEANS.get(name, name)
    if name != "auto" and name not in COMPILE_MODES:
        raise UserError(f"compile {value!r} is unknown; choose auto, {', '.join(COMPILE_MODES)} (or true / false)")
    return name


_PRETRAIN_RULES = dict(
    mask_ratio=fraction(),  # 0 would train to a loss of exactly 0 on nothing
    synthetic_samples=at_least(1), img_size=at_least(1),
    crop_scale_min=fraction(one=True), num_workers=at_least(0), batch_size=at_least(1), accum_steps=at_least(1),
    epochs=at_least(1), warmup_epochs=at_least(0), max_steps=at_least(0), blr=above(0), lr=above(0),
    min_lr=at_least(0), weight_decay=at_least(0), betas=fraction(zero=True), clip_grad=above(0),
    precision=one_of(*PRECISIONS), save_every_steps=at_least(0), save_every_epochs=at_least(0),
    keep_last=at_least(0), viz_every_epochs=at_least(0), dist_timeout=above(0),
)
