"""``mae-timm pretrain``: pretrain a registered pretext model on shards (or ``--synthetic`` images).

Settings are the fields of :class:`mae_timm.engine.train.config.PretrainConfig`: defaults < ``--config FILE.yaml`` <
options. Under ``torchrun --nproc-per-node N`` it runs data-parallel.
"""

from __future__ import annotations

import argparse

from mae_timm.engine.train.config import PretrainConfig
from mae_timm.utils.settings import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.epilog = (
        "examples: mae-timm pretrain --config tiny_imagenet_tiny_late --data shards/ ; "
        "mae-timm pretrain --model mae_vit_test --synthetic --epochs 1 --warmup-epochs 0 --out runs/smoke ; "
        "add --resume auto to continue a killed run"
    )
    add_config_arguments(parser, PretrainConfig)


def run(args: argparse.Namespace, name: str) -> int:
    from mae_timm.engine.train.pretrain import pretrain

    pretrain(config_from_args(PretrainConfig, args))  # user errors reach mae_timm.cli: one line, exit code 2
    return 0
