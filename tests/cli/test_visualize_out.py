"""`mae-timm visualize`: it writes the file it names, refuses a folder as --out and a decompression bomb, in one
line each."""

from __future__ import annotations

import pytest
from fakes import make_shards, tiny_pretrain_config
from PIL import Image

from mae_timm import cli
from mae_timm.engine.train.pretrain import pretrain


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz")
    cfg = tiny_pretrain_config(root / "run", make_shards(root), max_steps=1)
    image = root / "x.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(image)
    return str(pretrain(cfg).checkpoint), str(image)


def test_out_without_suffix_names_the_file_written(setup, tmp_path, capsys):
    checkpoint, image = setup
    assert cli.main(["visualize", "--checkpoint", checkpoint, "--image", image, "--out", str(tmp_path / "recon")]) == 0
    assert f"wrote {tmp_path / 'recon.png'}" in capsys.readouterr().out and (tmp_path / "recon.png").is_file()


def test_a_folder_as_out_is_refused(setup, tmp_path, capsys):
    checkpoint, image = setup
    assert cli.main(["visualize", "--checkpoint", checkpoint, "--image", image, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a folder" in err and list(tmp_path.iterdir()) == []


def test_a_decompression_bomb_is_refused_before_decoding(setup, tmp_path, capsys):
    checkpoint, _ = setup
    bomb = tmp_path / "bomb.png"
    Image.frombytes("1", (9000, 9000), bytes(9000 * 9000 // 8)).save(bomb)  # 10 kB on disk, 81 M pixels
    assert bomb.stat().st_size < 1_000_000
    assert cli.main(["visualize", "--checkpoint", checkpoint, "--image", str(bomb), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "claims 9000x9000 pixels" in err and "decompression bomb" in err, err
