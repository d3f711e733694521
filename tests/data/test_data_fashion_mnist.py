"""The Fashion-MNIST source on the real Debian files (apt-get install dataset-fashion-mnist)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_timm.cli import main
from mae_timm.data import create_loader, fashion_mnist, read_idx, read_info
from mae_timm.data.sources import FASHION_MNIST_ROOT

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT).is_dir(), reason="needs apt-get install dataset-fashion-mnist"
)


def test_idx_files_and_png_samples():
    root = Path(FASHION_MNIST_ROOT)
    images = read_idx(root / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,) and labels.max() == 9
    data = fashion_mnist(splits=("validation",), limit=50)
    samples = data.splits["validation"]
    assert len(samples) == 50 and len(data.classes) == 10
    for i in (0, 49):
        decoded = np.asarray(Image.open(io.BytesIO(samples[i].image)))
        assert samples[i].ext == "png" and np.array_equal(decoded, images[i]) and samples[i].cls == labels[i]


def test_command_and_loader_give_rgb(tmp_path):
    out = tmp_path / "fmnist"
    assert main(["shards", "fashion-mnist", "--out", str(out), "--limit", "200", "--min-shards", "4", "--quiet"]) == 0
    info = read_info(out)
    assert {s: e["num_samples"] for s, e in info["splits"].items()} == {"train": 200, "validation": 200}
    assert info["classes"][9]["name"] == "Ankle boot"
    loader = create_loader(out, "validation", 50, train=False, img_size=32, crop_pct=1.0, num_workers=0)
    images, labels = next(iter(loader))
    assert images.shape == (50, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert (images[:, 0] == images[:, 1]).all() and (images[:, 0] == images[:, 2]).all()  # grayscale -> RGB
    expected = read_idx(Path(FASHION_MNIST_ROOT) / "t10k-labels-idx1-ubyte.gz")[:50]
    assert labels.tolist() == expected.tolist()
