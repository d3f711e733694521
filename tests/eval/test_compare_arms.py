"""Arms as a type (spellings, arms files, budgets) and the one feature extractor shared by `mae-timm knn` and
compare."""

from __future__ import annotations

import json

import pytest
import torch

from mae_timm.cli import main
from mae_timm.engine.checkpoint import load_model
from mae_timm.engine.eval import evaluate
from mae_timm.engine.eval.compare import CompareConfig, parse_arm, parse_arms
from mae_timm.engine.eval.compare.budget import arm_updates, budget_rates, pretrain_config
from mae_timm.engine.eval.features import extract_features, normalizer
from mae_timm.engine.eval.splits import MemoryLoader, load_split
from mae_timm.utils import UserError
from tests.eval.test_compare import TINY, _imagefolder


def test_arm_spellings_parse_once_into_pretext_settings_and_budget():
    arm = parse_arm("mae{mask_ratio=0.9, decoder_depth=1}@wall")
    assert (arm.name, arm.pretext, arm.budget) == ("mae{mask_ratio=0.9,decoder_depth=1}@wall", "mae", "wall")
    assert arm.recipe == {"mask_ratio": 0.9} and arm.model_kwargs == {"decoder_depth": 1}
    assert parse_arm("mae{blr=3e-3}@compute").settings == {"blr": 0.003}  # YAML 1.1 would keep '3e-3' a string
    assert parse_arm("mae:vit_tiny_patch16_224").pretext == "mae:vit_tiny_patch16_224"
    arms = parse_arms("raw_pixels,mae,mae{mask_ratio=0.9,decoder_depth=1},mae@compute")
    assert [a.name for a in arms] == ["raw_pixels", "mae", "mae{mask_ratio=0.9,decoder_depth=1}", "mae@compute"]
    assert [a.pretrains for a in arms] == [False, True, True, True]


@pytest.mark.parametrize(("spelling", "message"), [
    ("nonsense", "unknown arm 'nonsense'"), ("mae@fast", "budget must be one of"),
    ("mae{mask_ratio}", "key=value"), ("mae{a=1,a=2}", "each key once"), ("raw_pixels{blr=1}", "no settings"),
    ("mae{mask_ratio=[1]}", "needs one value"), ("scratch@wall", "no budget"), ("mae,mae", "twice"),
])
def test_a_wrong_arm_is_one_line(spelling, message):
    with pytest.raises(UserError, match=message) as error:
        parse_arms(spelling)
    assert "\n" not in str(error.value)


def test_an_arms_file_spells_the_same_arms(tmp_path):
    path = tmp_path / "arms.yaml"
    path.write_text("- raw_pixels\n"
                    "- pretext: mae\n  settings: {mask_ratio: 0.9, norm_pix_loss: false}\n  budget: wall\n")
    assert [a.name for a in CompareConfig(data="x", arms=str(path)).arm_list] == [
        "raw_pixels", "mae{mask_ratio=0.9,norm_pix_loss=false}@wall"]
    with pytest.raises(UserError, match="does not exist"):
        parse_arms(str(tmp_path / "missing.yaml"))


def test_budgets_give_equal_flops_or_equal_wall_time():
    cfg = CompareConfig(data="x", updates=100, arms="mae,mae@compute,mae{mask_ratio=0.9}@wall,scratch")
    mae, compute, wall, scratch = cfg.arm_list
    rates = {"mae": dict(flops_per_update=10, updates_per_s=2.0), "mae@compute": dict(flops_per_update=20),
             "mae{mask_ratio=0.9}@wall": dict(flops_per_update=5, updates_per_s=3.0)}
    assert [arm_updates(cfg, a, rates) for a in cfg.arm_list] == [100, 50, 150, 0]


def test_an_arm_warms_up_for_its_share_of_its_own_updates_however_short_the_run(tmp_path):
    cfg = CompareConfig(data="x", arms="mae,mae{batch_size=128,warmup_fraction=0.1}")
    info = dict(channels=1, mean=[0.3], std=[0.3], splits=dict(train=dict(num_samples=60000)))
    for arm, updates, batch, share in ((cfg.arm_list[0], 750, 256, 0.05), (cfg.arm_list[1], 3000, 128, 0.1)):
        pcfg = pretrain_config(cfg, arm, 0, info, updates, tmp_path)
        per_epoch = 60000 // batch
        assert pcfg.max_steps == updates and pcfg.batch_size == batch
        assert pcfg.warmup_epochs * per_epoch == pytest.approx(share * updates)  # 37.5 updates, not 0 epochs
        assert (pcfg.epochs - 1) * per_epoch < updates <= pcfg.epochs * per_epoch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("arms")
    _imagefolder(root / "images", dict(train=12, validation=4))
    assert main(["shards", "imagefolder", "--src", str(root / "images"), "--out", str(root / "shards"), "--quiet",
                 "--min-shards", "1"]) == 0
    return root / "shards"


def test_wall_rates_are_measured_and_a_bad_model_setting_is_one_line(shards):
    info = dict(mean=[0.5] * 3, std=[0.25] * 3, splits=dict(train=dict(num_samples=36)), channels=3)
    decoder = dict(decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    cfg = CompareConfig(data=str(shards), arms="mae{decoder_depth=2}@wall,mae{blr=3e-3}@wall", batch_size=8,
                        encoder=json.loads(TINY), decoder=decoder)
    rates = budget_rates(cfg, cfg.arm_list, info, torch.device("cpu"), {})
    arm, ref, lr = rates["mae{decoder_depth=2}@wall"], rates["mae"], rates["mae{blr=3e-3}@wall"]
    assert arm["updates_per_s"] > 0 and ref["updates_per_s"] > 0 and arm["flops_per_update"] > ref["flops_per_update"]
    # another lr costs nothing per update: that arm takes the reference's timing, so noise cannot split their budgets
    assert lr["updates_per_s"] == ref["updates_per_s"] and "the timing of mae " in lr["rate_measured_with"]
    assert arm["updates_per_s"] != ref["updates_per_s"]
    bad = CompareConfig(data=str(shards), arms="mae{decoder_depht=2}", encoder=json.loads(TINY))
    with pytest.raises(UserError, match="decoder_depht") as error:
        budget_rates(bad, bad.arm_list, info, torch.device("cpu"), {})
    assert "\n" not in str(error.value)


def test_knn_flat_pool_and_compare_read_the_same_features(shards, tmp_path, monkeypatch):
    """`mae-timm knn --pool flat` and compare run one extractor: the same checkpoint gives the same features."""
    run = tmp_path / "run"
    assert main(["pretrain", "--model", "mae_vit_test", "--img-size", "16", "--batch-size", "8", "--epochs", "1",
                 "--warmup-epochs", "0", "--num-workers", "0", "--no-tensorboard", "--no-progress", "--data",
                 str(shards), "--max-steps", "1", "--viz-every-epochs", "0", "--out", str(run)]) == 0
    seen = {}

    def recording(train_x, train_y, val_x, val_y, *args):
        seen.update(train=train_x)
        return knn_on_features(train_x, train_y, val_x, val_y, *args)

    knn_on_features = evaluate.knn_on_features
    monkeypatch.setattr(evaluate, "knn_on_features", recording)
    assert main(["knn", "--checkpoint", str(run / "last.pt"), "--data", str(shards), "--pool", "flat", "--k", "3",
                 "--report-k", "1", "2", "3", "--num-workers", "0", "--out", str(tmp_path / "knn")]) == 0
    model, _ = load_model(run / "last.pt")
    images = load_split(str(shards), "train", model.input_size(), 3, 0, crop_pct=model.pretrained_cfg["crop_pct"])
    cpu = torch.device("cpu")
    features, _ = extract_features(model, MemoryLoader(images, 8, train=False), normalizer(model, cpu), cpu,
                                   [("flat", True)], 1)
    ours = features[("flat", True)].flatten(1)
    # 16 px in 8-px patches: 4 tokens of width 32, float16
    assert seen["train"].dtype == ours.dtype and seen["train"].shape == ours.shape == (36, 4 * 32)
    assert sorted(map(tuple, seen["train"].tolist())) == sorted(map(tuple, ours.tolist()))  # the same rows
