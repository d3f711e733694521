"""``mae-timm compare``: arms x seeds on a dataset's shards, every choice on a train hold-out, the test split once."""

from __future__ import annotations

import argparse

from mae_timm.engine.eval.compare import CompareConfig, run_compare
from mae_timm.utils.settings import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_config_arguments(parser, CompareConfig)


def run(args: argparse.Namespace, name: str) -> int:
    run_compare(config_from_args(CompareConfig, args))
    return 0
