"""``mae-timm knn | linprobe | finetune``: evaluate a checkpoint's encoder on labelled shards.

Settings of each protocol come from its dataclass (:data:`mae_timm.engine.eval.evaluate.PROTOCOLS`; one option
per field, or a YAML file with ``--config``). Top-1/top-5 are printed and written to ``<run folder>/<protocol>.json``.
"""

from __future__ import annotations

import argparse

from mae_timm.engine.eval.evaluate import PROTOCOLS, EvalData, evaluate_checkpoint
from mae_timm.utils.settings import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint of a pretext model (runs/x/last.pt)")
    parser.add_argument("--data", required=True, help="labelled shard directory (with _info.json)")
    parser.add_argument("--train-split", default="train", help="split to train on / the kNN memory bank")
    parser.add_argument("--val-split", default="validation", help="split the accuracy is measured on")
    parser.add_argument("--eval-batch-size", type=int, default=256, help="batch size of feature extraction")
    parser.add_argument("--num-workers", type=int, default=4, help="data loader processes")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--out", default=None, help="folder of the result JSON (default: the checkpoint's folder)")
    add_config_arguments(parser, PROTOCOLS[name])


def run(args: argparse.Namespace, name: str) -> int:
    data = EvalData(
        data=args.data,
        train_split=args.train_split,
        val_split=args.val_split,
        batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        device=args.device,
    )
    cfg = config_from_args(PROTOCOLS[name], args)
    evaluate_checkpoint(name, args.checkpoint, data, cfg, out_dir=args.out)
    return 0
