"""benchmarks/end_to_end.py on CPU with --tiny: every arm runs in one process, in rotated order, and the results
name them; the synthetic arm's batches live on the device and are made once."""

import json
from pathlib import Path

import pytest
import torch
from fakes import make_shards

from benchmarks import end_to_end
from mae_timm.data.synthetic import SyntheticImages


def check_results(out: Path, num_samples: int, workers: int, rounds: int = 1) -> None:
    results = json.loads((out / "end_to_end.json").read_text())
    assert results["num_samples"] == num_samples
    synthetic, shards = results["rows"]
    assert (synthetic["workers"], shards["workers"]) == (0, workers)
    for row in (synthetic, shards):
        assert len(row["timed_img_per_s"]) == end_to_end.TINY.steps * rounds and len(row["round_img_per_s"]) == rounds
        assert min(row["timed_img_per_s"]) <= row["img_per_s"] <= max(row["timed_img_per_s"])
    assert results["shards_over_synthetic"] == pytest.approx(shards["img_per_s"] / synthetic["img_per_s"])
    assert results["run"]["device"] and "webdataset" in results["run"]["versions"]
    assert "| WebDataset shards | " in (out / "end_to_end.md").read_text()


def test_end_to_end_tiny_writes_its_own_shards(tmp_path):
    assert end_to_end.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    check_results(tmp_path, end_to_end.TINY.images, workers=1)


def test_end_to_end_tiny_reads_given_shards_in_rotated_order(tmp_path, capsys):
    data = make_shards(tmp_path, img_size=32)  # 4 classes x 8 train images
    out = tmp_path / "results"
    argv = ["--tiny", "--device", "cpu", "--data", str(data), "--workers", "2", "--rounds", "2", "--out", str(out)]
    assert end_to_end.main(argv) == 0
    check_results(out, 32, workers=2, rounds=2)
    order = [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("round ")]
    assert order == ["synthetic", "WebDataset", "WebDataset", "synthetic"]  # the synthetic arm is not always first


def test_synthetic_arm_batches_are_made_once_on_the_device():
    source = SyntheticImages(num_samples=40, batch_size=8, img_size=16)
    resident = end_to_end.ResidentBatches(source, torch.device("cpu"), count=2)
    batches = list(resident)
    assert len(resident) == len(batches) == 5
    assert batches[0][0] is batches[2][0] and batches[1][0] is batches[3][0]  # handed out in turn, never rebuilt
    assert torch.equal(batches[1][0], source.batch(1)[0])
    assert [b[0] is batches[0][0] for b in resident.iter_from(4)] == [True]


def test_device_decode_arm_reads_the_shards(tmp_path):
    data = make_shards(tmp_path, img_size=32)
    out = tmp_path / "results"
    argv = ["--tiny", "--device", "cpu", "--data", str(data), "--arms", "shards-device", "--out", str(out)]
    assert end_to_end.main(argv) == 0
    (row,) = json.loads((out / "end_to_end.json").read_text())["rows"]
    assert row["arm"] == "shards-device" and row["img_per_s"] > 0
