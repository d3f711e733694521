"""The three decoders give the same pixels: torchvision's decode_jpeg == PIL exactly (both libjpeg-turbo, same
resize); the bytes path (decode='device', here on the CPU) == PIL where no resize is needed and within one level
where the device resizes. The loader with each decoder yields the same batches."""

import io

import numpy as np
import pytest
import torch
from fakes import make_shards
from PIL import Image

from mae_timm.data import DataError, Sample, create_loader, write_shards
from mae_timm.data.decode import decode_batch, decode_resized, encode_batch, resize_center
from mae_timm.data.loader import collate_encoded, default_num_workers


def encode(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colours plus pixel noise: every DCT frequency is in use."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray((np.asarray(coarse) + noise).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def jpegs() -> dict[str, bytes]:
    """JPEGs of the kinds a dataset holds: 4:2:0 and 4:4:4, progressive, grayscale, CMYK, odd sizes."""
    rng = np.random.default_rng(0)
    return {
        "rgb_64": encode(photo(rng, 64, 64), quality=90),
        "rgb_444": encode(photo(rng, 64, 64), quality=95, subsampling=0),
        "progressive": encode(photo(rng, 64, 64), progressive=True),
        "gray": encode(photo(rng, 64, 64).convert("L")),
        "cmyk": encode(photo(rng, 64, 64).convert("CMYK")),
        "landscape": encode(photo(rng, 101, 77), quality=75),
        "portrait": encode(photo(rng, 50, 83)),
        "large": encode(photo(rng, 500, 375), quality=85),
    }


SIZES = [(64, 1.0), (32, 1.0), (48, 0.875), (70, 1.0)]  # (img_size, crop_pct): none, shrink, eval crop, enlarge


@pytest.mark.parametrize("img_size, crop_pct", SIZES)
def test_decode_jpeg_in_workers_equals_pil(jpegs, img_size, crop_pct):
    for name, data in jpegs.items():
        sample = {"jpg": data, "cls": 3}
        pil, label = decode_resized(sample, img_size, crop_pct, "pil")
        fast, fast_label = decode_resized(sample, img_size, crop_pct, "torchvision")
        assert fast.shape == pil.shape == (img_size, img_size, 3) and fast.dtype == np.uint8
        np.testing.assert_array_equal(fast, pil, err_msg=name)
        assert fast_label == label == 3


@pytest.mark.parametrize("img_size, crop_pct", SIZES)
def test_bytes_path_decodes_like_pil(jpegs, img_size, crop_pct):
    names = list(jpegs)
    batch, labels = collate_encoded([(jpegs[n], i, n) for i, n in enumerate(names)])
    assert batch.data.dtype == torch.uint8 and batch.offsets.tolist()[-1] == batch.data.numel()
    assert labels.tolist() == list(range(len(names))) and batch.keys == names
    images, kept, failed = decode_batch(batch, img_size, crop_pct, "cpu")
    assert images.shape == (len(names), 3, img_size, img_size) and images.dtype == torch.uint8
    assert kept == list(range(len(names))) and failed == {}
    for name, image in zip(names, images):
        pil = torch.tensor(decode_resized({"jpg": jpegs[name]}, img_size, crop_pct, "pil")[0]).permute(2, 0, 1)
        difference = (image.int() - pil.int()).abs()
        if Image.open(io.BytesIO(jpegs[name])).size == (img_size, img_size) and crop_pct == 1.0:
            assert difference.max() == 0, name  # no resize: the decoders agree exactly
        else:  # the device resize has PIL's weights in floating point; PIL rounds fixed-point weights
            assert difference.max() <= 1 and difference.float().mean() < 0.01, name


def test_resize_center_keeps_an_image_at_size():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    assert resize_center(image, 16, 1.0) is image


def test_bytes_path_drops_and_names_a_broken_image(jpegs):
    good = jpegs["rgb_64"]
    batch = encode_batch([good, good[: len(good) // 2], good], ["a", "broken", "c"])
    images, kept, failed = decode_batch(batch, 64, 1.0, "cpu")
    assert images.shape == (2, 3, 64, 64) and kept == [0, 2] and list(failed) == ["broken"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("decode"), num_classes=4, per_class=8, img_size=32, min_shards=4)


@pytest.mark.parametrize("img_size", [32, 24])
@pytest.mark.parametrize("train", [True, False])
def test_loader_batches_agree_across_decoders(shards, img_size, train):
    split = "train" if train else "validation"
    options = dict(train=train, img_size=img_size, num_workers=2, seed=1, crop_pct=1.0)
    batches = {d: list(create_loader(shards, split, 8, decode=d, decode_device="cpu", **options))
               for d in ("pil", "torchvision", "device")}
    assert len(batches["pil"]) == len(batches["torchvision"]) == len(batches["device"]) > 0
    for (pil, labels), (fast, fast_labels), (device, device_labels) in zip(*batches.values()):
        assert torch.equal(fast, pil) and torch.equal(fast_labels, labels) and torch.equal(device_labels, labels)
        assert device.device.type == "cpu" and device.shape == pil.shape and device.dtype == torch.uint8
        assert (device.int() - pil.int()).abs().max() <= (0 if img_size == 32 else 1)


def test_device_decode_refuses_other_formats(tmp_path):
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    samples = [Sample(key=f"{i}", image=buffer.getvalue(), cls=0, ext="png") for i in range(4)]
    write_shards(tmp_path, {"train": samples}, ["c"], min_shards=1, progress=False)
    with pytest.raises(DataError, match="decode='device' reads JPEG only.*holds png"):
        next(iter(create_loader(tmp_path, "train", 2, train=True, img_size=8, num_workers=0, decode="device",
                                decode_device="cpu")))


def test_unknown_decoder_is_refused(shards):
    with pytest.raises(DataError, match="decode='nvjpeg' is unknown; choose one of pil, torchvision, device"):
        create_loader(shards, "train", 8, train=True, img_size=32, decode="nvjpeg")


def test_default_workers_follow_the_machine_and_the_shards(shards, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers() == 14  # 16 cores less the training loop and the pin-memory thread
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_num_workers() == 2  # each of 4 ranks gets 4 cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_num_workers() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    # 4 train shards: no more training workers than shards; evaluation too
    assert create_loader(shards, "train", 8, train=True, img_size=32).num_workers == 4
    assert create_loader(shards, "train", 8, train=True, img_size=32, rank=0, world_size=2).num_workers == 2
