"""The demo's bundled Fashion-MNIST sample (the demo itself: tests/cli/test_demo.py)."""

from __future__ import annotations

from mae_timm.data import read_idx
from mae_timm.demo import ASSETS


def test_bundled_fashion_mnist_sample():
    train_labels = read_idx(ASSETS / "train-labels-idx1-ubyte.gz")
    test_images = read_idx(ASSETS / "t10k-images-idx3-ubyte.gz")
    assert len(train_labels) == 5000 and test_images.shape == (1000, 28, 28)
    assert set(train_labels.tolist()) == set(range(10)) and (ASSETS / "LICENSE-fashion-mnist.txt").is_file()
