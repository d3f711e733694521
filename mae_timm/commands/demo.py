"""``mae-timm demo``: a small compare (raw pixels, scratch, MAE) on the bundled Fashion-MNIST sample, with figures."""

from __future__ import annotations

import argparse

from mae_timm.demo import DemoConfig, run_demo
from mae_timm.utils.settings import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_config_arguments(parser, DemoConfig)


def run(args: argparse.Namespace, name: str) -> int:
    result = run_demo(config_from_args(DemoConfig, args))
    return 130 if result["interrupted"] else 0  # 130: the shell's code for a run stopped by a signal
