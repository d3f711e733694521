"""The benchmark scripts on CPU: FLOP counters agree with each other, both scripts run on tiny configs, and every
script runs as a module from the repository root (``python -m benchmarks.flops``; the tests import it the same way).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import mae_timm  # noqa: F401  (registers the models)
from benchmarks import flops, throughput
from benchmarks.common import counted_flops, datasheet_peak_tflops, fvcore_macs, mae_macs, vit_macs
from benchmarks.official_mae import block_without_qk_scale, load_official_mae, official_like

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("flops", "throughput", "loader", "end_to_end", "gpu_suite")
OFFICIAL_STAND_IN = REPO_ROOT / "tests" / "bench" / "official_mae"  # models_mae.py for the tests, the official API

RTOL = 0.02  # the bar for fvcore + attention handle vs FlopCounterMode vs the analytic formula


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_sdpa_handle_counts_both_attention_products():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    expected = 2 * 3 * 5 * 7 * 8 + 2 * 3 * 5 * 7 * 4  # QK^T (B, nh, Tq, Tk) from hs=8, then AV with hs_v=4
    assert fvcore_macs(Attention(), (q, k, v))[""] == expected
    assert counted_flops(lambda: Attention()(q, k, v)) == 2 * expected  # FlopCounterMode: 2 per multiply-add


def test_counters_agree_on_timm_vit():
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    analytic = 2 * sum(
        vit_macs(num_patches=16, patch_dim=3 * 8 * 8, embed_dim=32, depth=2, mlp_hidden=128, num_classes=10).values()
    )
    with torch.no_grad():
        fvcore_total = fvcore_macs(vit, (x,))[""]
        counted = counted_flops(lambda: vit(x)) / 2
    assert fvcore_total == pytest.approx(counted, rel=RTOL)
    assert fvcore_total == pytest.approx(analytic, rel=RTOL)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.75, 0.9])
def test_counters_agree_on_late_mask_mae_by_part(mask_ratio):
    row = flops.count_model("mae_vit_test", mask_ratio)
    model = timm.create_model("mae_vit_test")
    analytic = mae_macs(model, mask_ratio)
    assert row["macs"]["patch_embed"] == pytest.approx(analytic["patch_embed"], rel=RTOL)
    assert row["macs"]["encoder"] == pytest.approx(analytic["encoder"], rel=RTOL)
    assert row["macs"]["decoder/head"] == pytest.approx(analytic["decoder"], rel=RTOL)
    assert row["macs"]["total"] == pytest.approx(row["flop_counter_macs"], rel=RTOL)


@pytest.mark.parametrize(
    "model_name, mask_ratio",
    [("mae_vit_base_patch16", 0.75), ("mae_vit_small_patch8_64", 0.0), ("mae_vit_tiny_early_mask", 0.9),
     ("apl_vit_tiny_64", 0.75)],
)
def test_meta_device_counts_equal_the_committed_table(model_name, mask_ratio):
    """The fast count (FlopCounterMode on the meta device) equals the committed table, counted by fvcore and
    FlopCounterMode on real weights."""
    committed = json.loads((REPO_ROOT / "benchmarks" / "results" / "flops.json").read_text())["rows"]
    expected = next(r for r in committed if r["model"] == model_name and r["mask_ratio"] == mask_ratio)
    row = flops.count_model(model_name, mask_ratio)
    assert row["macs"] == expected["macs"] and row["flop_counter_macs"] == expected["flop_counter_macs"]
    assert row["analytic_macs"] == expected["analytic_macs"] and row["params"] == expected["params"]


def test_fvcore_cross_check_on_real_weights():
    row = flops.count_model("mae_vit_test", 0.75, fvcore=True)
    assert row["fvcore_macs"] == row["macs"]["total"]


def test_flops_script_on_test_models(tmp_path):
    argv = ["--models", "mae_vit_test*", "apl_vit_test", "--mask-ratios", "0", "0.75", "--out", str(tmp_path)]
    assert flops.main(argv) == 0
    results = json.loads((tmp_path / "flops.json").read_text())
    macs = {(r["model"], r["mask_ratio"]): r["macs"] for r in results["rows"]}
    names = ("mae_vit_test", "mae_vit_test_cross", "mae_vit_test_early_mask", "apl_vit_test")
    assert set(macs) == {(m, r) for m in names for r in (0, 0.75)}
    assert macs["mae_vit_test_cross", 0.75]["decoder/head"] < macs["mae_vit_test", 0.75]["decoder/head"]
    assert macs["mae_vit_test", 0.75]["encoder"] < macs["mae_vit_test", 0.0]["encoder"]  # late mask: fewer tokens
    assert macs["mae_vit_test_early_mask", 0.75] == macs["mae_vit_test_early_mask", 0.0]  # early mask: all tokens
    assert macs["apl_vit_test", 0.75]["encoder"] < macs["apl_vit_test", 0.0]["encoder"]  # patch dropout
    comparisons = {r["comparison"]: r for r in results["ratios"]}
    assert comparisons.keys() == {"mask tokens in encoder", "early-mask model"}
    assert comparisons["mask tokens in encoder"]["encoder_ratio"] > 1
    assert "GMACs" in (tmp_path / "flops.md").read_text()


def test_throughput_script_tiny(tmp_path):
    assert throughput.main(["--tiny", "--config", "test", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "throughput_test.json").read_text())
    rows = {r["implementation"]: r for r in results["rows"]}
    assert rows.keys() == {"mae_timm", "hf"}
    for row in rows.values():
        for phase in ("train", "infer"):
            assert row[phase]["img_per_s"] > 0 and torch.isfinite(torch.tensor(row[phase]["loss"]))
        assert 2 < row["gflops_per_image"]["train"] / row["gflops_per_image"]["infer"] < 3.5
    # the HF peer is built to the same architecture: the same forward FLOPs
    hf, ours = rows["hf"]["gflops_per_image"], rows["mae_timm"]["gflops_per_image"]
    assert hf["infer"] == pytest.approx(ours["infer"], rel=RTOL)


def test_throughput_warmup_zero_is_honoured(tmp_path):
    argv = ["--tiny", "--config", "test", "--implementations", "mae_timm", "--warmup", "0", "--steps", "1",
            "--out", str(tmp_path)]
    assert throughput.main(argv) == 0
    settings = json.loads((tmp_path / "throughput_test.json").read_text())["settings"]
    assert (settings["warmup"], settings["steps"]) == (0, 1)


def test_official_peer_is_adapted_to_todays_timm():
    """The official models_mae.py passes qk_scale=None to timm's Block (refused since timm 0.4) and its pos_embed
    uses np.float (gone since numpy 1.24); the adapted module builds, takes mae_timm's weights as they are, and
    computes the same loss from the same seed."""
    with pytest.raises(TypeError, match="qk_scale"):
        timm.models.vision_transformer.Block(8, 2, qk_scale=None)
    with pytest.raises(ValueError, match="qk_scale=0.5 has no equivalent"):
        block_without_qk_scale(8, 2, qk_scale=0.5)
    module = load_official_mae(OFFICIAL_STAND_IN)
    model = timm.create_model("mae_vit_test", norm_pix_loss=True)
    official = official_like(module, model)
    assert official.state_dict().keys() == model.state_dict().keys()
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    ours = model(imgs, mask_ratio=0.75).loss
    torch.manual_seed(3)
    theirs = official(imgs, mask_ratio=0.75)[0]
    torch.testing.assert_close(theirs, ours)
    with pytest.raises(FileNotFoundError, match="holds no models_mae.py"):
        load_official_mae(REPO_ROOT / "docs")


def test_datasheet_peak_is_none_off_gpu():
    assert datasheet_peak_tflops(torch.device("cpu"), "bfloat16") is None


@pytest.mark.gpu
def test_throughput_script_all_modes_on_gpu(tmp_path):
    argv = ["--tiny", "--config", "test", "--device", "cuda", "--modes", *throughput.MODES, "--out", str(tmp_path)]
    assert throughput.main(argv) == 0
    rows = json.loads((tmp_path / "throughput_test.json").read_text())["rows"]
    assert {(r["implementation"], r["mode"]) for r in rows} == {
        (implementation, mode) for implementation in ("mae_timm", "hf") for mode in throughput.MODES
    }
    assert all(r["train"]["peak_memory_gib"] > 0 for r in rows)


@pytest.mark.slow  # a second process importing torch, timm, fvcore and the engine: about 30 s on a busy CPU
def test_every_script_runs_as_a_module():
    """``python -m benchmarks.<script> --help`` from the repository root, no sys.path edits: one process for all."""
    code = (
        "import runpy, sys\n"
        f"for name in {SCRIPTS!r}:\n"
        "    sys.argv = [name, '--help']\n"
        "    try:\n"
        "        runpy.run_module(f'benchmarks.{name}', run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (name, e.code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("usage:")] == [
        f"{name}.py" for name in SCRIPTS
    ]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("decoder, predict_ratio", [("cross", 1 / 3), ("cross", 1.0), ("self", 0.25)])
def test_analytic_macs_follow_the_decoder_options(decoder, predict_ratio, training):
    """The formula follows the cross decoder and a predicted share (training mode; all removed in evaluation)."""
    model = timm.create_model("mae_vit_test", decoder=decoder, predict_ratio=predict_ratio).train(training)
    imgs = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        counted = counted_flops(lambda: model(imgs, mask_ratio=0.75)) / 2
    assert sum(mae_macs(model, 0.75).values()) == pytest.approx(counted, rel=RTOL)
