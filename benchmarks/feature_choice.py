"""Which frozen features of a checkpoint to probe, chosen without the test split.

kNN and the linear probe read an encoder through ``encoder_features(model, global_pool, blocks)``: the pooled
tokens of the last ``blocks`` blocks, concatenated. Picking the pooling or the number of blocks on the split the
accuracy is reported on would be model selection on test data, so this measures every choice on a hold-out of the
training split instead: features of the training split are extracted once (every block, each pooling), the first
``len - holdout`` images are the kNN bank / probe training set and the last ``holdout`` the queries. The raw
pixels (``RawPixels``, normalised as the model's input) go through the same split as the baseline row.

    python -m benchmarks.feature_choice --checkpoint runs/quality/mae_late/last.pt --data runs/quality/shards \\
        --out benchmarks/results/feature_choice_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.common import describe_run, markdown_table, write_results
from mae_timm.engine.checkpoint import load_model
from mae_timm.engine.eval.baselines import RawPixels
from mae_timm.engine.eval.common import encoder_features, normalizer, predict, progress
from mae_timm.engine.eval.evaluate import EvalData, create_loaders
from mae_timm.engine.eval.knn import KnnConfig, knn_on_features
from mae_timm.engine.eval.linprobe import LinprobeConfig, linprobe_on_features
from mae_timm.utils import resolve_device


def holdout_features(model, data: EvalData, global_pool: str, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(features of the training split (M, depth * D): every block, the last block last; labels (M,); D);
    ``global_pool='pixels'``: the raw pixels (M, C * H * W) as one block."""
    depth = 1 if global_pool == "pixels" else model.encoder_kwargs()["depth"]
    features = RawPixels() if global_pool == "pixels" else encoder_features(model, global_pool, blocks=depth)
    train_loader, _ = create_loaders(model, data)
    x, y = predict(features.to(device), progress(train_loader, f"features ({global_pool})"),
                   normalizer(model, device), device)  # fmt: skip
    return x, y, x.shape[1] // depth


def choose(checkpoint: str, data: EvalData, holdout: int, linprobe_epochs: int, pools: list[str]) -> list[dict]:
    """kNN (k=20) and linear-probe top-1 on the hold-out for each pooling and each number of last blocks."""
    model, _ = load_model(checkpoint)
    device = resolve_device(data.device)
    rows = []
    for pool in ["pixels", *pools]:
        x, y, dim = holdout_features(model, data, pool, device)
        num_classes = int(y.max()) + 1
        for blocks in range(1, x.shape[1] // dim + 1):
            last = x[:, -blocks * dim:]  # the last `blocks` blocks
            split = (last[:-holdout], y[:-holdout], last[-holdout:], y[-holdout:], num_classes)
            knn = knn_on_features(*split, KnnConfig(), device)
            probe_cfg = LinprobeConfig(epochs=linprobe_epochs, warmup_epochs=min(3, linprobe_epochs - 1))
            probe = linprobe_on_features(*split, probe_cfg, device)
            rows.append(dict(global_pool=pool, feature_blocks=blocks, knn_top1=knn["top1"],
                             linprobe_top1=probe["top1"], feature_dim=last.shape[1]))  # fmt: skip
            print(rows[-1])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="shard directory; its train split is split into bank + hold-out")
    parser.add_argument("--holdout", type=int, default=10000, help="the last N training images are the queries")
    parser.add_argument("--linprobe-epochs", type=int, default=30)
    parser.add_argument("--pools", nargs="*", default=["avg"], choices=["avg", "token"],
                        help="token: the class token (late-mask MAE only); none: only the raw-pixel row")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write <stem>.json / .md here (a .json path)")
    args = parser.parse_args(argv)
    data = EvalData(data=args.data, num_workers=args.num_workers, device=args.device)
    rows = choose(args.checkpoint, data, args.holdout, args.linprobe_epochs, args.pools)
    table = markdown_table(["global_pool", "feature_blocks", "kNN top-1 (hold-out)", "probe top-1 (hold-out)", "dim"],
                           [[r["global_pool"], r["feature_blocks"], f"{r['knn_top1']:.2f}", f"{r['linprobe_top1']:.2f}",
                             r["feature_dim"]] for r in rows])  # fmt: skip
    print(table)
    if args.out is not None:
        payload = dict(checkpoint=args.checkpoint, holdout=args.holdout, rows=rows)
        write_results(args.out.parent, args.out.stem, describe_run(resolve_device(args.device)), payload, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
