"""The ``README.md`` model card written into every export folder, in the Hugging Face Hub convention.

YAML front matter (``library_name``, ``tags``, ``license``, ``datasets``, ``pipeline_tag``) and a body that says
what the weights are: the architecture, the pretext that trained them, the data, the run's command, the
evaluations recorded beside the checkpoint (with their baselines, when a result holds them), the class names of
a classifier, and how to load the folder in timm and transformers. Everything comes from the checkpoint's record
and the files beside it; nothing is invented (a missing item says so).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch.nn as nn

from mae_timm.data import read_info
from mae_timm.engine.train.config import PretrainConfig

__all__ = ["ModelCard", "model_card", "recorded_results"]

# what a pretext model class does, in one line
_PRETEXTS = {
    "MaskedAutoencoderViT": "masked autoencoder (MAE, He et al. 2021): late masking, the encoder sees the kept patches",
    "EarlyMaskViT": "early-mask autoencoder: mask tokens replace the removed patches before the encoder",
    "APLViT": "APL: predicting the positions of shuffled, partly dropped patches",
}
# shard names (`mae-timm shards <name>`) -> their Hub dataset ids
_HUB_DATASETS = {"fashion-mnist": "zalando-datasets/fashion_mnist", "tiny-imagenet": "zh-plus/tiny-imagenet"}
_PROTOCOLS = ("knn", "linprobe", "finetune")


@dataclasses.dataclass
class ModelCard:
    """What one export folder holds (the inputs of :func:`model_card`)."""

    fmt: str  # "timm" (local-dir folder), "hf" (transformers ViT) or "hf-mae" (transformers ViTMAE)
    model: nn.Module  # the pretext model the weights come from
    folder: str  # the export folder, as the load lines name it
    num_classes: int = 0  # 0: an encoder (features); N: a classifier with N classes
    label_names: list[str] | None = None  # a classifier's class names, in index order
    source: dict | None = None  # checkpoint, model_name, step (what `mae-timm export` records)
    run_config: dict | None = None  # the checkpoint's PretrainConfig as a dict (its `config` entry)
    metrics: dict | None = None  # the folder's own result (a fine-tuned classifier's accuracy)
    gray_to_rgb: bool = False  # a 1-channel encoder exported with its patch kernel replicated over RGB


def recorded_results(checkpoint: str | Path | None) -> list[dict]:
    """The evaluations written beside a checkpoint (``knn.json``, ``linprobe.json``, ``finetune.json`` by
    ``mae-timm knn|linprobe|finetune``), those that name this checkpoint's file."""
    if checkpoint is None:
        return []
    results = []
    for protocol in _PROTOCOLS:
        path = Path(checkpoint).parent / f"{protocol}.json"
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and "top1" in result:
            results.append(dict(result, protocol=result.get("protocol", protocol)))
    return results


def _data_info(run_config: dict | None) -> dict:
    data = (run_config or {}).get("data")
    if not data or "," in str(data):
        return {}
    try:
        return read_info(data)
    except (OSError, ValueError):
        return {}


def _command(run_config: dict | None) -> str | None:
    """The ``mae-timm pretrain`` line of the run: the options that differ from their defaults."""
    if not run_config:
        return None
    defaults = dataclasses.asdict(PretrainConfig())
    parts = ["mae-timm pretrain"]
    for key, value in run_config.items():
        if (
            key not in defaults
            or value == defaults[key]
            or (isinstance(value, (list, tuple)) and list(value) == list(defaults[key] or []))
        ):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, dict):
            parts.append(f"{flag} '{json.dumps(value)}'")
        elif isinstance(value, (list, tuple)):
            parts.append(f"{flag} {' '.join(str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    return " \\\n    ".join(parts)


def _front_matter(card: ModelCard, info: dict) -> str:
    library = "timm" if card.fmt == "timm" else "transformers"
    task = "image-classification" if card.num_classes else "image-feature-extraction"
    pretext = type(card.model).__name__
    tags = [library, "mae-timm", "vision-transformer", "masked-image-modeling", pretext, task]
    if card.fmt == "hf-mae":
        tags.append("vit_mae")
    datasets = [_HUB_DATASETS.get(info["name"], info["name"])] if info.get("name") else []
    license_ = json.dumps(card.model.pretrained_cfg.get("license") or "other")
    lines = [
        "---",
        f"library_name: {library}",
        f"license: {license_}",
        f"pipeline_tag: {task}",
        "tags:",
        *[f"- {json.dumps(t)}" for t in dict.fromkeys(tags)],
    ]
    lines += ["datasets:", *[f"- {json.dumps(d)}" for d in datasets]] if datasets else []
    return "\n".join([*lines, "---"])


def _results_section(card: ModelCard) -> list[str]:
    rows = []
    if card.metrics and "top1" in card.metrics:
        rows.append(("this classifier (fine-tuned)", card.metrics))
    rows += [(r["protocol"], r) for r in recorded_results((card.source or {}).get("checkpoint"))]
    if not rows:
        return [
            "No evaluation was recorded beside the checkpoint (run `mae-timm knn|linprobe|finetune` or "
            "`mae-timm compare` before exporting to have it here)."
        ]
    lines = ["| evaluation | top-1 % | top-5 % | baselines (top-1 %) |", "|---|---|---|---|"]
    for name, result in rows:
        baselines = result.get("baselines") or {}
        base = ", ".join(
            f"{k} {v['top1'] if isinstance(v, dict) else v:.2f}"
            for k, v in baselines.items()
            if isinstance(v, (int, float)) or (isinstance(v, dict) and "top1" in v)
        )
        lines.append(
            f"| {name} | {result['top1']:.2f} | {result.get('top5', float('nan')):.2f} | {base or 'none recorded'} |"
        )
    return lines


def _load_section(card: ModelCard) -> list[str]:
    folder = card.folder
    n = card.num_classes or "N"
    classes = card.num_classes or 10  # an encoder's example gets a new 10-class head
    comment = "" if card.num_classes else "  # a new head: your class count"
    if card.fmt == "timm":
        return [
            "```python",
            "import timm",
            "",
            f"model = timm.create_model('local-dir:{folder}', pretrained=True, num_classes={classes}){comment}",
            "config = timm.data.resolve_data_config(model=model)  # mean/std, size, crop of this folder",
            "transform = timm.data.create_transform(**config)",
            "```",
            "Fine-tune with timm's own script, no other flag needed:",
            "```bash",
            f"python train.py --model local-dir:{folder} --pretrained --num-classes {n} --data-dir DATA",
            "```",
            "For transformers, export the same checkpoint with `mae-timm export --format hf` (class-token ViTs).",
        ]
    if card.fmt == "hf":
        return [
            "```python",
            "from transformers import AutoImageProcessor, ViTForImageClassification, pipeline",
            "",
            f"features = pipeline('image-feature-extraction', model='{folder}', pool=True)",
            f"processor = AutoImageProcessor.from_pretrained('{folder}')  # converts to RGB, resizes, normalises",
            f"classifier = ViTForImageClassification.from_pretrained('{folder}', num_labels={classes}){comment}",
            "```",
            "For timm, export the same checkpoint with `mae-timm export` (the default format).",
        ]
    return [
        "```python",
        "from transformers import AutoImageProcessor, ViTMAEForPreTraining",
        "",
        f"model = ViTMAEForPreTraining.from_pretrained('{folder}')  # reconstruction: loss, logits, mask",
        f"processor = AutoImageProcessor.from_pretrained('{folder}')",
        "```",
        "For features or fine-tuning, export with `mae-timm export --format hf` (a plain ViT).",
    ]


def model_card(card: ModelCard) -> str:
    """The ``README.md`` text of an export folder."""
    model, cfg = card.model, card.model.pretrained_cfg
    info = _data_info(card.run_config)
    kwargs = model.encoder_kwargs()
    what = f"{card.num_classes}-class classifier" if card.num_classes else "encoder (features, `num_classes=0`)"
    body = [
        f"# {model.encoder_architecture()} {what}, pretrained by mae-timm",
        "",
        "## Architecture",
        f"timm `{model.encoder_architecture()}` with `{json.dumps(kwargs)}`; {what}.",
    ]
    if card.gray_to_rgb:
        body.append(
            "Pretrained on 1-channel images; exported for RGB input: the patch kernel is replicated over the "
            "3 channels and divided by 3, mean/std replicated, so a gray image converted to RGB gives the "
            "1-channel encoder's features exactly (to float rounding)."
        )
    source = card.source or {}
    run = card.run_config or {}
    body += [
        "",
        "## Pretext",
        f"`{source.get('model_name', type(model).__name__)}`: "
        f"{_PRETEXTS.get(type(model).__name__, type(model).__name__)}.",
    ]
    if source.get("step") is not None:
        body.append(
            f"Trained for {source['step']} updates"
            + (f", mask ratio {run['mask_ratio']}" if model.takes_mask_ratio and "mask_ratio" in run else "")
            + "."
        )
    body += ["", "## Data"]
    if info:
        splits = ", ".join(f"{k} {v.get('num_samples')}" for k, v in info.get("splits", {}).items())
        body.append(f"`{info.get('name')}` shards ({info.get('num_classes')} classes; {splits} images).")
    elif run.get("data") or run.get("synthetic"):
        body.append(f"`{run.get('data') or 'synthetic images'}` (its _info.json was not readable at export).")
    else:
        body.append("Not recorded in the checkpoint.")
    body.append(
        f"Inputs are normalised with mean {list(cfg['mean'])} and std {list(cfg['std'])}"
        + (" (replicated over RGB in this export)." if card.gray_to_rgb else ".")
    )
    command = _command(card.run_config)
    body += (
        ["", "## Training command", "```bash", command, "```"]
        if command
        else ["", "## Training command", "Not recorded."]
    )
    body += ["", "## Evaluation", *_results_section(card)]
    if card.label_names:
        body += ["", "## Labels", ", ".join(f"{i}: {name}" for i, name in enumerate(card.label_names))]
    body += ["", "## How to load", *_load_section(card), ""]
    return _front_matter(card, info) + "\n\n" + "\n".join(body)
