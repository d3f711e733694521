"""The streaming loader: batches, DDP/worker splitting, exact epochs, reproducible order, bad input."""

import io
import logging
import multiprocessing
import shutil
import tarfile

import numpy as np
import pytest
import torch
from fakes import make_shards, make_tiny_imagenet_zip
from PIL import Image

from mae_timm.data import (
    DataError,
    Sample,
    create_loader,
    read_info,
    shards_for_reader,
    tiny_imagenet,
    write_shards,
    write_source,
)
from mae_timm.data.decode import center_crop, center_crop_box, decode_sample


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_tiny_imagenet_zip(tmp_path_factory.mktemp("zip") / "tiny-imagenet-200.zip", per_class=8)


@pytest.fixture(scope="module")
def tiny_shards(fake, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    data = tiny_imagenet(fake.path, ("train", "validation"), md5="none", progress=False)
    write_source(out, data, min_shards=4, progress=False)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("fake"), num_classes=4, per_class=16, img_size=32, min_shards=8)


def collect(loader):
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), batches


def test_train_batches_shape_dtype_and_len(shards):
    loader = create_loader(shards, "train", 8, train=True, img_size=24, num_workers=0)
    images, labels, batches = collect(loader)
    assert len(batches) == len(loader) == 64 // 8
    assert all(b[0].shape == (8, 3, 24, 24) and b[0].dtype == torch.uint8 for b in batches)
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(4))
    assert loader.num_classes == 4 and loader.num_samples == 64


def test_eval_reads_every_sample_once_in_order(shards):
    loader = create_loader(shards, "validation", 3, train=False, img_size=32, crop_pct=1.0, num_workers=0)
    images, labels, batches = collect(loader)
    assert len(batches) == len(loader) and len(labels) == 8
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    again, _, _ = collect(loader)
    assert torch.equal(images, again)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_two_ranks_two_workers_disjoint_and_covering(shards, split):
    urls = [f"shard-{i}.tar" for i in range(len(read_info(shards)["splits"][split]["filenames"]))]
    for epoch in range(3):
        seen = []
        for rank in range(2):
            for worker in range(2):
                seen += shards_for_reader(urls, seed=0, epoch=epoch, rank=rank, world_size=2, worker=worker,
                                          num_workers=2, shuffle=split == "train")
        assert sorted(seen) == sorted(urls)  # each shard exactly once: disjoint and covering


def test_ranks_of_an_eval_split_cover_it(shards):
    labels = [collect(create_loader(shards, "train", 5, train=False, img_size=32, num_workers=0, rank=rank,
                                    world_size=2))[1] for rank in range(2)]
    assert sum(len(x) for x in labels) == 64 and torch.cat(labels).bincount().tolist() == [16] * 4


@pytest.fixture(scope="module")
def unique_shards(tmp_path_factory):
    """64 train samples in 8 shards of 8, each sample its own class: a label names its sample."""
    return make_shards(tmp_path_factory.mktemp("unique"), num_classes=64, per_class=1, img_size=16,
                       num_val_per_class=1, min_shards=8)


def test_loader_ranks_and_workers_read_disjoint_covering_passes(unique_shards):
    # 64 // (2 ranks x 6) = 5 batches per rank -> 3 per worker = 18 samples, 2 more than a worker's pass (2 shards)
    first_passes, counts = [], []
    for rank in range(2):
        loader = create_loader(unique_shards, "train", 6, train=True, img_size=16, num_workers=2, rank=rank,
                               world_size=2)
        batches = [labels for _, labels in loader]
        counts.append((len(loader), len(batches)))
        for worker in range(2):  # the DataLoader takes batches from its workers in turn
            first_passes.append(torch.cat(batches[worker::2])[:16].tolist())
    assert counts == [(6, 6), (6, 6)]
    assert sorted(sum(first_passes, [])) == list(range(64))  # each sample once across the readers' first passes


def test_train_batches_are_decoded_central_squares_without_augmentation(unique_shards, tmp_path):
    """The workers draw no crop or flip: a training image is its sample's decoded central square, as evaluation
    decodes it (the random crop + flip are GpuAugment's)."""
    loader = create_loader(unique_shards, "train", 8, train=True, img_size=12, num_workers=0, seed=5)
    images, labels, _ = collect(loader)
    reference, reference_labels, _ = collect(create_loader(unique_shards, "train", 8, train=False, img_size=12,
                                                           crop_pct=1.0, num_workers=0))
    by_label = dict(zip(reference_labels.tolist(), reference))
    assert len(set(labels.tolist())) == len(labels) == 64
    assert all(torch.equal(image, by_label[label]) for image, label in zip(images, labels.tolist()))
    tall = tmp_path / "tall"  # a non-square image: training keeps its whole central square, resized
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    write_shards(tall, {"train": [Sample(key="t", image=buffer.getvalue(), ext="png", cls=0)]}, ["a"],
                 min_shards=1, progress=False)
    image = next(iter(create_loader(tall, "train", 1, train=True, img_size=10, num_workers=0)))[0][0]
    expected = center_crop(Image.fromarray(pixels), 10, crop_pct=1.0)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_epoch_fills_its_batches_across_passes(shards):
    loader = create_loader(shards, "train", 40, train=True, img_size=16, num_workers=2)  # 32 samples a pass
    assert len(loader) == 2 and len(list(loader)) == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pass_without_a_decodable_image_raises(tmp_path, num_workers):
    samples = [Sample(key=f"s{i}", image=b"not an image", cls=0) for i in range(8)]
    write_shards(tmp_path, {"train": samples}, ["a"], min_shards=2, progress=False)
    loader = create_loader(tmp_path, "train", 2, train=True, img_size=16, num_workers=num_workers)
    children = set(multiprocessing.active_children())
    with pytest.raises(DataError, match="no image decoded") as raised:
        list(loader)
    assert "\n" not in str(raised.value)
    # the workers end with the error, not when the garbage collector reaches the traceback that holds them (which
    # took torch 5 s a worker: the collected cycle's queues closed before the workers were told to stop)
    assert set(multiprocessing.active_children()) <= children


@pytest.mark.slow
def test_equal_batches_on_every_rank_with_workers(shards):
    counts = []
    for rank in range(2):
        loader = create_loader(shards, "train", 4, train=True, img_size=16, num_workers=2, rank=rank, world_size=2)
        counts.append((len(loader), len(list(loader))))
    assert counts == [(8, 8), (8, 8)]  # 64 samples / (2 ranks x 4) per rank, exactly


def test_order_reproducible_from_seed_and_epoch(shards):
    def epoch_images(seed, epoch):
        loader = create_loader(shards, "train", 8, train=True, img_size=16, num_workers=0, seed=seed, shuffle_buffer=16)
        loader.set_epoch(epoch)
        return collect(loader)[0]

    first = epoch_images(0, 1)
    assert torch.equal(first, epoch_images(0, 1))
    assert not torch.equal(first, epoch_images(0, 2))
    assert not torch.equal(first, epoch_images(1, 1))


def test_resampled_mode_gives_len_batches_with_few_shards(shards):
    loader = create_loader(shards, "train", 2, train=True, img_size=16, num_workers=0, resampled=True,
                           rank=3, world_size=16)  # 8 shards for 16 ranks: only resampling can feed them
    assert len(list(loader)) == len(loader) == 2
    with pytest.raises(DataError, match="resampled=True"):
        create_loader(shards, "train", 2, train=True, img_size=16, num_workers=0, rank=3, world_size=16)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupted_jpeg_skipped_and_counted(fake, tiny_shards, caplog, num_workers):
    loader = create_loader(tiny_shards, "train", 4, train=False, img_size=64, crop_pct=1.0, num_workers=num_workers)
    with caplog.at_level(logging.WARNING, logger="mae_timm.data.loader"):
        _, labels, _ = collect(loader)
    assert len(labels) == len(fake.images["train"]) - 1
    # counted in a worker, read in the main process
    assert loader.errors == {"bad_images": 1, "bad_shards": 0, "reserved_members": 0}
    messages = " ".join(r.getMessage() for r in caplog.records)
    if num_workers == 0:  # worker processes log to their own stderr
        assert fake.corrupted_key in messages


def test_grayscale_jpeg_decodes_to_rgb(fake):
    image, label = decode_sample({"jpg": fake.images["train"][fake.gray_keys[0]], "cls": b"2"})
    array = np.asarray(image)
    assert image.mode == "RGB" and label == 2
    assert np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])


def test_truncated_tar_loses_only_what_follows(tiny_shards, tmp_path):
    directory = tmp_path / "shards"
    shutil.copytree(tiny_shards, directory)
    name = read_info(directory)["splits"]["validation"]["filenames"][0]
    with tarfile.open(directory / name) as tar:
        members = tar.getmembers()
    jpgs = [m for m in members if m.name.endswith(".jpg")]
    cut = jpgs[1].offset_data + jpgs[1].size // 2  # inside the second image
    data = (directory / name).read_bytes()
    (directory / name).write_bytes(data[:cut])
    loader = create_loader(directory, "validation", 1, train=False, img_size=64, num_workers=0)
    _, labels, _ = collect(loader)
    total = read_info(directory)["splits"]["validation"]["num_samples"]
    shard_length = read_info(directory)["splits"]["validation"]["shard_lengths"][0]
    assert len(labels) == total - shard_length + 1  # the first sample of the damaged shard survives
    # the sample cut in half, and the shard
    assert loader.errors == {"bad_images": 1, "bad_shards": 1, "reserved_members": 0}


def test_missing_shard_and_empty_pattern_fail_before_work(shards, tmp_path):
    with pytest.raises(DataError, match=r"1 of 2 shards are missing, first .*nope-1.tar"):
        create_loader([str(shards / "train-000000.tar"), str(tmp_path / "nope-1.tar")], "train", 2, train=True,
                      img_size=16, num_samples=8, num_workers=0)
    with pytest.raises(DataError, match="no split 'test'"):
        create_loader(shards, "test", 2, train=False, img_size=16)
    with pytest.raises(DataError, match="no shards"):
        create_loader([], "train", 2, train=True, img_size=16, num_samples=8)
    with pytest.raises(DataError, match="missing"):
        create_loader(str(tmp_path / "x-{000000..000003}.tar"), "train", 2, train=True, img_size=16, num_samples=8)


def test_url_list_finds_info_beside_shards(shards):
    urls = [f"file://{shards}/train-{i:06d}.tar" for i in range(8)]
    loader = create_loader(urls, "train", 4, train=False, img_size=16, num_workers=0)
    assert loader.num_samples == 64 and len(loader) == len(list(loader)) == 16


def test_center_crop_box():
    assert center_crop_box(64, 64, 1.0) == (0, 0, 64, 64)
    assert center_crop_box(100, 50, 0.5) == (37.5, 12.5, 62.5, 37.5)
