"""Grayscale input end to end: in_chans=1 from the shards (channel count, pixel statistics) through the loader,
GpuAugment, pretraining, kNN, export and figures; 3-channel models on grayscale data keep their behaviour."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors
import timm
import torch
from PIL import Image

import mae_timm
from mae_timm.cli import main
from mae_timm.data import DataError, GpuAugment, create_loader, fashion_mnist, read_idx, read_info, write_source
from mae_timm.data.decode import decode_sample
from mae_timm.data.sources import pixel_stats
from mae_timm.data.synthetic import SyntheticImages
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.model_setup import build_model
from mae_timm.utils.settings import load_config
from mae_timm.viz import is_gray, save_reconstruction_grid, to_display

ASSETS = Path(mae_timm.__file__).parent / "assets"  # Fashion-MNIST sample: 5,000 train + 1,000 test images
CONFIGS = Path(__file__).parents[2] / "mae_timm" / "configs"
GRAY_STATS = dict(mean=[0.286], std=[0.353])  # Fashion-MNIST's train statistics (see test_fashion_mnist_stats)
TINY = dict(img_size=28, patch_size=7, embed_dim=24, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2)

_SMALL_RUN = ("--model", "mae_vit_test", "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--num-workers",
              "0", "--no-tensorboard", "--no-progress")


@pytest.fixture(scope="module")
def gray_shards(tmp_path_factory):
    """200 + 200 Fashion-MNIST images of the bundled sample, as `mae-timm shards fashion-mnist` writes them."""
    out = tmp_path_factory.mktemp("fashion")
    assert main(["shards", "fashion-mnist", "--src", str(ASSETS), "--out", str(out), "--limit", "200",
                 "--min-shards", "2", "--quiet"]) == 0
    return out


def _png(mode: str, color) -> dict:
    buffer = io.BytesIO()
    Image.new(mode, (5, 4), color).save(buffer, format="PNG")
    return {"png": buffer.getvalue(), "cls": b"1"}


def test_decode_to_the_models_mode():
    image, label = decode_sample(_png("RGB", (200, 30, 30)), "L")
    assert image.mode == "L" and label == 1
    assert np.asarray(image)[0, 0] == Image.new("RGB", (1, 1), (200, 30, 30)).convert("L").getpixel((0, 0))
    image, _ = decode_sample(_png("L", 77))  # the default stays RGB: grayscale repeated
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [77, 77, 77]


def test_fashion_mnist_stats_and_info(gray_shards):
    info = read_info(gray_shards)
    images = read_idx(ASSETS / "train-images-idx3-ubyte.gz")[:200] / 255.0
    assert info["channels"] == 1
    assert info["mean"] == [round(images.mean(), 4)] and info["std"] == [round(images.std(), 4)]
    assert pixel_stats(np.array([[0, 255]], dtype=np.uint8)) == (0.5, 0.5)
    # writing one split again keeps what the source said about its images
    write_source(gray_shards, fashion_mnist(ASSETS, splits=("validation",), limit=200), min_shards=2, progress=False)
    assert {k: read_info(gray_shards)[k] for k in ("channels", "mean", "std")} == {
        k: info[k] for k in ("channels", "mean", "std")
    }


def test_loader_decodes_to_in_chans(gray_shards):
    kwargs = dict(train=False, img_size=28, num_workers=0, crop_pct=1.0)
    gray, labels = next(iter(create_loader(gray_shards, "validation", 16, in_chans=1, **kwargs)))
    rgb, rgb_labels = next(iter(create_loader(gray_shards, "validation", 16, **kwargs)))
    assert gray.shape == (16, 1, 28, 28) and gray.dtype == torch.uint8 and rgb.shape == (16, 3, 28, 28)
    assert torch.equal(rgb, gray.expand(-1, 3, -1, -1)) and torch.equal(labels, rgb_labels)
    originals = read_idx(ASSETS / "t10k-images-idx3-ubyte.gz")[:16]  # the validation split is written in order
    assert torch.equal(gray[:, 0], torch.from_numpy(originals.copy()))
    with pytest.raises(DataError, match="in_chans=2"):
        create_loader(gray_shards, "validation", 16, in_chans=2, **kwargs)


def test_gpu_augment_one_channel():
    images = torch.randint(0, 256, (4, 1, 12, 12), dtype=torch.uint8)
    out = GpuAugment((0.25,), (0.5,))(images)
    torch.testing.assert_close(out, (images.float() / 255 - 0.25) / 0.5)
    # the random crop of a 1-channel batch is the crop of any channel of the same batch repeated
    crop = dict(img_size=8, random_crop=True, scale=(0.3, 1.0))
    one = GpuAugment((0.25,), (0.5,), **crop)(images, torch.Generator().manual_seed(1))
    three = GpuAugment((0.25,) * 3, (0.5,) * 3, **crop)(images.expand(-1, 3, -1, -1), torch.Generator().manual_seed(1))
    assert one.shape == (4, 1, 8, 8) and torch.equal(one[:, 0], three[:, 1])
    with pytest.raises(ValueError, match="mean/std have 3 values but the images have 1 channel"):
        GpuAugment()(images)  # ImageNet's three means are not broadcast onto grayscale


def test_synthetic_images_take_in_chans():
    imgs, _ = SyntheticImages(8, 4, 16, in_chans=1).batch(0)
    assert imgs.shape == (4, 1, 16, 16)


def test_display_is_true_colour():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    normalised = (red - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(to_display(normalised, mean, std), red.permute(0, 2, 3, 1))
    shown = to_display(torch.zeros(2, 3, 2, 2), mean, std)  # the ImageNet mean is a colour, not gray
    assert not is_gray(shown).any() and is_gray(shown[..., :1]).all()


def _is_gray_png(path) -> bool:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return bool((rgb.max(-1) - rgb.min(-1)).max() == 0)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_reconstruction_of_gray_images_is_gray(in_chans, tmp_path):
    torch.manual_seed(0)
    stats = GRAY_STATS if in_chans == 1 else dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    model = timm.create_model("mae_vit_test", in_chans=in_chans, pretrained_cfg_overlay=stats, **TINY).eval()
    gray = torch.from_numpy(read_idx(ASSETS / "t10k-images-idx3-ubyte.gz")[:2].copy()).unsqueeze(1)  # (2, 1, 28, 28)
    imgs = GpuAugment(stats["mean"], stats["std"])(gray.expand(-1, in_chans, -1, -1))
    path = save_reconstruction_grid(model, imgs, tmp_path / "gray.png", **stats)
    assert _is_gray_png(path)  # an untrained 3-channel model predicts unequal channels; shown gray all the same
    if in_chans == 3:  # colour input stays in colour
        colour = GpuAugment(stats["mean"], stats["std"])(torch.randint(0, 256, (1, 3, 28, 28), dtype=torch.uint8))
        assert not _is_gray_png(save_reconstruction_grid(model, colour, tmp_path / "colour.png", **stats))


@pytest.mark.slow
def test_pretrain_knn_export_visualize_in_chans_1(gray_shards, tmp_path, capsys):
    """The CLI path of a 1-channel model on Fashion-MNIST shards: the data's mean/std travel in the model kwargs
    to the checkpoint, the kNN, the exported timm encoder and the figures."""
    info = read_info(gray_shards)
    kwargs = dict(TINY, in_chans=1, pretrained_cfg_overlay=dict(mean=info["mean"], std=info["std"]))
    run = tmp_path / "run"
    assert main(["pretrain", *_SMALL_RUN, "--model-kwargs", json.dumps(kwargs), "--data", str(gray_shards),
                 "--max-steps", "3", "--viz-every-epochs", "1", "--out", str(run)]) == 0
    assert _is_gray_png(next(run.glob("reconstruction-*.png")))
    checkpoint = run / "last.pt"
    model, _ = mae_timm.engine.checkpoint.load_model(checkpoint)
    assert model.input_channels() == 1 and list(model.pretrained_cfg["mean"]) == info["mean"]

    assert main(["knn", "--checkpoint", str(checkpoint), "--data", str(gray_shards), "--num-workers", "0"]) == 0
    knn = json.loads((run / "knn.json").read_text())
    assert knn["num_val"] == 200 and knn["top1"] > 10.0  # above chance for 10 classes, even after 3 updates

    out = tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    with safetensors.safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["mean"]) == info["mean"] and json.loads(metadata["std"]) == info["std"]
    line = next(s.strip() for s in capsys.readouterr().out.splitlines() if "timm.create_model(" in s)
    encoder = eval(line, {"timm": timm}).eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(encoder.forward_features(x), mae_timm.create_timm_encoder(model).forward_features(x))

    Image.fromarray(read_idx(ASSETS / "t10k-images-idx3-ubyte.gz")[0]).save(tmp_path / "shoe.png")
    Image.new("RGB", (40, 50), (200, 30, 30)).save(tmp_path / "red.png")  # colour files are read as grayscale
    figure = tmp_path / "figure.png"
    assert main(["visualize", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "shoe.png"),
                 str(tmp_path / "red.png"), "--out", str(figure)]) == 0
    assert _is_gray_png(figure)


def test_one_channel_model_with_imagenet_stats_is_a_clear_error(gray_shards, tmp_path, capsys):
    kwargs = json.dumps(dict(TINY, in_chans=1))
    assert main(["pretrain", *_SMALL_RUN, "--model-kwargs", kwargs, "--data", str(gray_shards), "--max-steps", "1",
                 "--viz-every-epochs", "0", "--out", str(tmp_path / "x")]) != 0
    assert "pretrained_cfg_overlay" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_build_their_model(path):
    """Every config loads and builds; the Fashion-MNIST ones are native 28 px, 1 channel, and normalise with the
    statistics `mae-timm shards fashion-mnist` records for the 60,000 training images."""
    cfg = load_config(PretrainConfig, path)
    model, _ = build_model(cfg)
    size, channels = model.patch_embed.img_size[0], model.input_channels()
    if path.stem.startswith("fashion_mnist"):
        assert (size, channels) == (28, 1) and cfg.img_size in (None, 28)
        cfg_mean, cfg_std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
        assert list(cfg_mean) == [0.2860] and list(cfg_std) == [0.3530]  # pixel_stats of the full train set
    x = torch.zeros(2, channels, size, size)
    assert torch.isfinite(model(x, mask_ratio=cfg.mask_ratio).loss if model.takes_mask_ratio else model(x).loss)
