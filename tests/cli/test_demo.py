"""`mae-timm demo`: bad settings refused at once in one line; a reduced demo writes compare's files and verdicts."""

from __future__ import annotations

import json
import time

import pytest

from mae_timm.cli import main


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--finetune-epochs", "0"], ["--steps", "0"],
                                    ["--seeds", "0"], ["--mask-ratio", "1.5"]])
def test_demo_refuses_bad_settings_at_once(option, tmp_path, capsys, monkeypatch):
    import mae_timm.demo as demo

    monkeypatch.setattr(demo, "write_source", lambda *a, **k: pytest.fail("work began first"))
    start = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path / "demo"), *option]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mae-timm demo: error:") and "\n" not in err and option[0].lstrip("-").split("-")[0] in err
    assert time.perf_counter() - start < 5 and not (tmp_path / "demo").exists()


def test_reduced_demo_runs_compare_and_says_level_inside_the_spread(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--steps", "3", "--seeds", "2", "--finetune-epochs", "1", "--probe-epochs", "2",
            "--holdout", "500", "--batch-size", "64", "--out", str(out), "--num-workers", "0",
            "--encoder", json.dumps(dict(img_size=28, patch_size=7, embed_dim=16, depth=1, num_heads=2)),
            "--decoder", json.dumps(dict(decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2))]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for name in ("compare.json", "compare.md", "summary.json", "reconstruction.png", "reconstruction_no_leak.png",
                 "loss.png", "accuracy_vs_updates.png"):
        assert (out / name).is_file(), name
    payload = json.loads((out / "compare.json").read_text())
    for arm in ("raw_pixels", "scratch", "mae"):
        assert len(payload["arms"][arm]["knn"]["per_seed"]) == 2
    assert len(payload["arms"]["mae"]["finetune"]["per_seed"]) == 2
    summary = json.loads((out / "summary.json").read_text())
    for v in payload["verdicts"]:  # a win only where the interval excludes 0
        if v["verdict"].endswith("wins"):
            assert v["low"] > 0 or v["high"] < 0
        else:
            assert v["low"] <= 0 <= v["high"]
    assert any(line.startswith("kNN: MAE") for line in summary["verdicts"]) and "fine-tune" in printed
