"""benchmarks/end_to_end.py on CPU with --tiny: both runs happen in one process and the results name them."""

import json
from pathlib import Path

import pytest
from fakes import make_shards

from benchmarks import end_to_end


def check_results(out: Path, num_samples: int, workers: int) -> None:
    results = json.loads((out / "end_to_end.json").read_text())
    assert results["num_samples"] == num_samples
    synthetic, shards = results["rows"]
    assert (synthetic["workers"], shards["workers"]) == (0, workers)
    for row in (synthetic, shards):
        assert len(row["timed_img_per_s"]) == end_to_end.TINY.steps
        assert min(row["timed_img_per_s"]) <= row["img_per_s"] <= max(row["timed_img_per_s"])
    assert results["shards_over_synthetic"] == pytest.approx(shards["img_per_s"] / synthetic["img_per_s"])
    assert results["run"]["device"] and "webdataset" in results["run"]["versions"]
    assert "| WebDataset shards | " in (out / "end_to_end.md").read_text()


def test_end_to_end_tiny_writes_its_own_shards(tmp_path):
    assert end_to_end.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    check_results(tmp_path, end_to_end.TINY.images, workers=1)


def test_end_to_end_tiny_reads_given_shards(tmp_path):
    data = make_shards(tmp_path, img_size=32)  # 4 classes x 8 train images
    out = tmp_path / "results"
    assert end_to_end.main(["--tiny", "--device", "cpu", "--data", str(data), "--workers", "2", "--out", str(out)]) == 0
    check_results(out, 32, workers=2)
