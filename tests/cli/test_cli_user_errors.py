"""A user's mistake on the command line is one line on stderr and exit code 2, naming the value and what is
allowed: never a traceback, never a silently accepted value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes import jpeg_bytes, make_shards

from mae_timm import cli
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.pretrain import pretrain

QUIET = ["--num-workers", "0", "--no-progress", "--no-tensorboard", "--viz-every-epochs", "0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def checkpoint(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    pretrain(PretrainConfig(model="mae_vit_test", data=str(shards), batch_size=4, epochs=1, warmup_epochs=0,
                            max_steps=1, num_workers=0, viz_every_epochs=0, tensorboard=False, progress=False,
                            out=str(out)))
    return out / "last.pt"


def pretrain_args(shards, tmp_path, *options):
    return ["pretrain", "--model", "mae_vit_test", "--data", str(shards), "--batch-size", "4", "--epochs", "1",
            "--warmup-epochs", "0", "--max-steps", "1", *QUIET, "--out", str(tmp_path / "run"), *options]


def eval_args(protocol, checkpoint, shards, tmp_path, *options):
    return [protocol, "--checkpoint", str(checkpoint), "--data", str(shards), "--num-workers", "0",
            "--out", str(tmp_path / "eval"), *options]


def assert_one_line(argv, capsys, *expected):
    """``mae-timm argv`` exits with code 2 and one stderr line holding every ``expected`` text."""
    with torch.random.fork_rng():
        code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"mae-timm {argv[0]}: error: "), err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--batch-size", "0"], ["batch_size", "is 0", "at least 1"]),
        (["--accum-steps", "0"], ["accum_steps", "is 0", "at least 1"]),
        (["--img-size", "30"], ["img_size 30", "patch size 8"]),
        (["--model-kwargs", '{"no_such_kwarg": 1}'], ["no_such_kwarg"]),
        (["--keep-last", "-1"], ["keep_last", "-1", "at least 0"]),
        (["--save-every-steps", "-1"], ["save_every_steps", "-1", "at least 0"]),
        (["--crop-scale-min", "0"], ["crop_scale_min", "(0, 1]"]),
        (["--crop-scale-min", "1.5"], ["crop_scale_min", "(0, 1]"]),
    ],
)
def test_pretrain_mistakes(options, expected, shards, tmp_path, capsys):
    assert_one_line(pretrain_args(shards, tmp_path, *options), capsys, *expected)


def test_cuda_without_cuda_is_refused_before_any_work(shards, checkpoint, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    import mae_timm.engine.checkpoint as checkpoint_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the device was checked")

    assert_one_line(pretrain_args(shards, tmp_path, "--device", "cuda"), capsys, "CUDA is not available")
    monkeypatch.setattr(checkpoint_module, "load_model", no_loading)
    assert_one_line(eval_args("knn", checkpoint, shards, tmp_path, "--device", "cuda"), capsys, "CUDA")


def test_yaml_with_a_python_tag_is_refused(tmp_path, capsys):
    config = tmp_path / "evil.yaml"
    config.write_text("batch_size: !!python/object/apply:os.system ['echo injected']\n")
    assert_one_line(["pretrain", "--config", str(config)], capsys, str(config), "line 1")
    assert "injected" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "protocol, options, expected",
    [
        ("knn", ["--eval-batch-size", "0"], ["--eval-batch-size", "is 0"]),
        ("knn", ["--pool", "mean"], ["pool", "'mean'", "'avg'"]),
        ("linprobe", ["--pool", "mean"], ["pool", "'avg'"]),
        ("finetune", ["--batch-size", "0"], ["batch_size", "is 0"]),
        ("finetune", ["--layer-decay", "-0.5"], ["layer_decay", "-0.5", "(0, 1]"]),
        ("finetune", ["--batch-size", "1"], ["mixup", "at least 2"]),  # mixup pairs samples: NaN every step
    ],
)
def test_evaluation_mistakes(protocol, options, expected, checkpoint, shards, tmp_path, capsys):
    assert_one_line(eval_args(protocol, checkpoint, shards, tmp_path, *options), capsys, *expected)


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--shard-size", "0"], ["shard_size", "is 0"]),
        (["--shard-size", "-5"], ["shard_size", "is -5"]),
        (["--min-shards", "-1"], ["min_shards", "-1"]),
    ],
)
def test_shard_size_mistakes(options, expected, tmp_path, capsys):
    folder = tmp_path / "photos" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(jpeg_bytes(np.random.default_rng(0), 16))
    argv = ["shards", "imagefolder", "--src", str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--quiet"]
    assert_one_line(argv + options, capsys, *expected)


def test_unwritable_export_path(checkpoint, capsys):
    assert_one_line(["export", "--checkpoint", str(checkpoint), "--out", "/proc/no/such/encoder.safetensors"],
                    capsys, "cannot write /proc/no/such/encoder.safetensors")
