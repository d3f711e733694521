"""The demo: the bundled Fashion-MNIST sample, and one run with reduced steps."""

from __future__ import annotations

import json

import pytest

from mae_timm.cli import main
from mae_timm.data import read_idx
from mae_timm.demo import ASSETS


def test_bundled_fashion_mnist_sample():
    train_labels = read_idx(ASSETS / "train-labels-idx1-ubyte.gz")
    test_images = read_idx(ASSETS / "t10k-images-idx3-ubyte.gz")
    assert len(train_labels) == 5000 and test_images.shape == (1000, 28, 28)
    assert set(train_labels.tolist()) == set(range(10)) and (ASSETS / "LICENSE-fashion-mnist.txt").is_file()


@pytest.mark.slow
def test_demo_with_reduced_steps(tmp_path, capsys):
    tiny = dict(img_size=28, patch_size=7, embed_dim=24, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                decoder_num_heads=2)
    out = tmp_path / "demo"
    args = ["demo", "--steps", "4", "--knn-points", "2", "--finetune-epochs", "1", "--out", str(out),
            "--num-workers", "1", "--model-kwargs", json.dumps(tiny)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for name in ("summary.json", "reconstruction.png", "loss.png", "accuracy.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
        assert name in printed or name == "metrics.jsonl"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"knn_top1", "finetune_top1", "finetune_updates", "pretrain_updates", "minutes"}
    assert set(summary["knn_top1"]) == {"pretrained", "random_init", "raw_pixels"}
    assert set(summary["finetune_top1"]) == {"pretrained", "scratch"}
    assert summary["pretrain_updates"] == 4 and summary["finetune_updates"] == 5000 // 128
    assert all(0 <= v <= 100 for group in ("knn_top1", "finetune_top1") for v in summary[group].values())
    assert "wins" in printed and "raw pixels" in printed  # the verdict, in words
