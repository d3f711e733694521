"""The CPU quality benchmarks (``benchmarks/quality.py``, ``benchmarks/late_vs_early.py``): one smoke run each,
and the GPU configuration loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mae_timm.demo import ASSETS


@pytest.mark.slow
def test_quality_benchmark_smoke(tmp_path):
    from benchmarks import quality

    args = ["--root", str(ASSETS), "--limit", "256", "--out", str(tmp_path), "--arms", "raw_pixels,scratch,mae_early",
            "--pretrain-steps", "2", "--eval-points", "2", "--batch-size", "64", "--linprobe-epochs", "2",
            "--finetune-epochs", "1", "--finetune-batch-size", "64", "--num-workers", "1", "--feature-blocks", "1",
            "--model-kwargs", json.dumps(dict(embed_dim=16, depth=1, num_heads=2))]  # fmt: skip
    assert quality.main(args) == 0
    result = json.loads((tmp_path / "quality_cpu.json").read_text())
    rows = {row["arm"]: row for row in result["rows"]}
    assert set(rows) == {"raw_pixels", "scratch", "mae_early"}
    assert set(rows["mae_early"]) == {"arm", "knn_top1", "linprobe_top1", "finetune_top1", "pretrain_updates",
                                      "pretrain_minutes", "pretrain_cpu_minutes"}  # fmt: skip
    assert rows["raw_pixels"]["finetune_top1"] is None and rows["scratch"]["pretrain_updates"] is None
    assert rows["mae_early"]["pretrain_updates"] == 2 and len(result["curves"]["mae_early"]) == 2
    assert all(0 <= row[k] <= 100 for row in rows.values() for k in ("knn_top1", "linprobe_top1") if row[k])
    assert {"split", "protocols", "run", "wall_minutes", "verdict"} <= set(result)
    assert "wins" in (tmp_path / "quality_cpu.md").read_text()
    assert (tmp_path / "accuracy_vs_updates.png").is_file()


@pytest.mark.slow
def test_late_vs_early_benchmark_smoke(tmp_path):
    from benchmarks import late_vs_early

    args = ["--root", str(ASSETS), "--limit", "256", "--out", str(tmp_path), "--seeds", "0", "1",
            "--pretrain-steps", "2", "--eval-points", "1", "--batch-size", "64", "--linprobe-epochs", "2",
            "--finetune-epochs", "0", "--feature-blocks", "1", "--num-workers", "0",
            "--model-kwargs", json.dumps(dict(embed_dim=16, depth=1, num_heads=2))]  # fmt: skip
    assert late_vs_early.main(args) == 0
    result = json.loads((tmp_path / "late_vs_early_cpu.json").read_text())
    late, early = result["arms"]["mae_late"], result["arms"]["mae_early"]
    assert len(late["knn"]["per_seed"]) == len(early["linprobe"]["per_seed"]) == 2  # one value per seed
    assert late["finetune"]["mean"] is None  # --finetune-epochs 0: no fine-tune
    assert result["macs_ratio"] > 1  # the encoder sees every token under early masking
    assert (tmp_path / "seed1" / "mae_early" / "arm.json").is_file()


def test_gpu_quality_config_loads():
    from benchmarks.quality import ARMS, QualityConfig
    from mae_timm.utils.settings import load_config

    cfg = load_config(QualityConfig, Path(__file__).resolve().parents[2] / "benchmarks/configs/quality_gpu.yaml", {})
    assert cfg.device == "cuda" and set(cfg.arms.split(",")) <= set(ARMS)
    assert cfg.feature_blocks <= cfg.encoder["depth"]  # a valid feature choice for its encoder
