"""`mae-timm compare`: end to end on a tiny imagefolder, the test split read only after every choice, resuming,
the verdict rule, partial fine-tuning and kNN standardisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mae_timm.cli import main
from mae_timm.engine.eval import splits
from mae_timm.engine.eval.compare import CompareConfig, choose
from mae_timm.engine.eval.compare import run as compare_run
from mae_timm.engine.eval.compare.report import paired_verdict
from mae_timm.engine.eval.features import extract_features, normalizer
from mae_timm.utils import UserError

ARMS = ("raw_pixels", "scratch", "mae")
TINY = '{"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}'


def _imagefolder(root, per_class: dict, size: int = 16):
    rng = np.random.default_rng(0)
    colors = rng.integers(0, 256, size=(3, 3))
    for split, count in per_class.items():
        for cls in range(3):
            folder = root / split / f"class_{cls}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(colors[cls] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture
def shards(tmp_path):
    _imagefolder(tmp_path / "images", dict(train=12, validation=4))
    assert main(["shards", "imagefolder", "--src", str(tmp_path / "images"), "--out", str(tmp_path / "shards"),
                 "--quiet", "--min-shards", "1"]) == 0
    return tmp_path / "shards"


def _compare(shards, out, *extra):
    return main(["compare", "--data", str(shards), "--arms", ",".join(ARMS), "--updates", "2", "--seeds", "2",
                 "--out", str(out), "--holdout", "9", "--batch-size", "8", "--encoder", TINY,
                 "--decoder", '{"decoder_embed_dim": 8, "decoder_depth": 1, "decoder_num_heads": 2}',
                 "--probe-epochs", "2", "--probe-blr", "1.0", "--knn-k", "3,5", "--finetune-epochs", "2",
                 "--finetune-batch-size", "8", "--num-workers", "0", "--curve-points", "2", *extra])


def test_compare_end_to_end_reads_the_test_split_once_after_every_choice(shards, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    reads = []
    load = compare_run.load_split

    def recording(data, split, *args):
        if split == "validation":  # the test split: every arm-seed's choices are on disk by now
            missing = [(a, s) for a in ARMS for s in (0, 1) if not (out / "runs" / a / f"seed{s}" / "choices.json")
                       .is_file()]
            assert not missing, f"the test split was read before the choices of {missing}"
        reads.append(split)
        return load(data, split, *args)

    monkeypatch.setattr(compare_run, "load_split", recording)
    assert _compare(shards, out) == 0
    assert reads == ["train", "validation"]  # each split decoded once
    result = json.loads((out / "compare.json").read_text())
    for arm in ARMS:
        protocols = ("knn", "linprobe") if arm == "raw_pixels" else ("knn", "linprobe", "finetune", "partial_finetune")
        for protocol in protocols:
            row = result["arms"][arm][protocol]
            assert len(row["per_seed"]) == 2 and row["mean"] == pytest.approx(np.mean(row["per_seed"]))
            assert row["std"] is not None and len(row["holdout_choices"]) == 2
    assert "finetune" not in result["arms"]["raw_pixels"]
    # the curve's baselines are measured as the curve is (hold-out queries, the same bank), not taken from the test
    bank = result["data"]["splits"]["train"] - 9  # the training images less the hold-out
    for arm, updates in (("raw_pixels", [0]), ("scratch", [0]), ("mae", [1, 2])):
        for run in result["curves"][arm]:
            assert [p["updates"] for p in run] == updates and {p["bank"] for p in run} == {bank}
    assert (out / "accuracy_vs_updates.png").is_file()
    knn_choice = result["arms"]["raw_pixels"]["knn"]["holdout_choices"][0]
    assert {"k", "standardize", "blocks", "variant"} <= set(knn_choice)
    assert {v["verdict"].split()[-1] for v in result["verdicts"]} <= {"level", "wins"}
    assert result["data"]["mean"] and result["data"]["std"]  # from the training images: the shards record none
    assert result["arms"]["mae"]["cost"]["flops_per_update"] > 0
    assert (out / "compare.md").read_text().startswith("# compare")
    assert (out / "accuracy_vs_updates.png").is_file()

    # resuming: finished arm-seeds are not redone; a lost test result is measured again, nothing else
    (out / "runs" / "mae" / "seed1" / "test.json").unlink()
    monkeypatch.setattr(compare_run, "pretrain", lambda cfg: pytest.fail("a finished arm-seed was pretrained again"))
    reads.clear()
    assert _compare(shards, out) == 0
    assert reads == ["validation"]
    assert json.loads((out / "compare.json").read_text())["arms"]["mae"]["knn"]["per_seed"] == \
        result["arms"]["mae"]["knn"]["per_seed"]
    # other settings would silently reuse choices made under the old ones: refused before any work
    reads.clear()
    assert _compare(shards, out, "--probe-epochs", "3") == 2
    assert reads == [] and json.loads((out / "config.json").read_text())["probe_epochs"] == "2"


def test_a_holdout_only_compare_never_reads_the_test_split_and_a_rerun_goes_on_to_it(shards, tmp_path, monkeypatch):
    out, reads = tmp_path / "search", []
    load = compare_run.load_split
    monkeypatch.setattr(compare_run, "load_split", lambda data, split, *a: reads.append(split) or load(data, split, *a))
    assert _compare(shards, out, "--holdout-only", "--partial-blocks", "0", "--finetune-epochs", "1") == 0
    assert reads == ["train"] and not (out / "compare.json").exists()
    held = json.loads((out / "holdout.json").read_text())
    for arm in ARMS:
        for s in (0, 1):
            choice = json.loads((out / "runs" / arm / f"seed{s}" / "choices.json").read_text())
            assert held["holdout"][arm]["knn"][s] == choice["knn"]["top1"]
    assert {v["name"] for v in held["verdicts"]} == {"raw_pixels", "scratch"}  # each against the pretraining arm
    assert "| mae |" in (out / "holdout.md").read_text()
    # the same folder without the flag: the choices stand (nothing pretrained again), the test split is read once
    monkeypatch.setattr(compare_run, "pretrain", lambda cfg: pytest.fail("a finished arm-seed was pretrained again"))
    reads.clear()
    assert _compare(shards, out, "--partial-blocks", "0", "--finetune-epochs", "1") == 0
    assert reads == ["validation"] and (out / "compare.json").is_file()


def test_the_sealed_test_split_refuses_to_be_read_early():
    split = splits.SealedSplit(lambda: pytest.fail("decoded while sealed"))
    with pytest.raises(RuntimeError, match="before every choice"):
        split.read()


def test_unknown_arm_is_one_line(shards, tmp_path, capsys):
    assert main(["compare", "--data", str(shards), "--arms", "mae,nonsense", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mae-timm compare: error: unknown arm 'nonsense'") and "\n" not in err


def test_paired_verdict_names_a_winner_only_beyond_the_spread():
    assert paired_verdict([80.0, 81.0, 82.0], [79.0, 79.5, 81.5], "a", "b")["verdict"] == "level"
    win = paired_verdict([85.0, 85.5, 86.0], [80.0, 80.2, 80.9], "a", "b")
    assert win["verdict"] == "a wins" and win["low"] > 0
    assert paired_verdict([70.0, 70.4, 70.2], [75.0, 75.1, 75.3], "a", "b")["verdict"] == "b wins"
    assert paired_verdict([90.0], [10.0], "a", "b")["verdict"].startswith("level")


def test_partial_finetune_trains_only_the_last_blocks_and_head():
    import timm

    from mae_timm.engine.eval.finetune import FinetuneConfig, create_classifier

    model = timm.create_model("mae_vit_test")
    classifier = create_classifier(model, 3, FinetuneConfig(tune_last_blocks=1), 0.0)
    depth = len(classifier.blocks)
    trained = {n for n, p in classifier.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith((f"blocks.{depth - 1}.", "norm.", "fc_norm.", "head.")) for n in trained)
    assert any(n.startswith("head.") for n in trained) and not any(n.startswith("patch_embed") for n in trained)


def test_knn_standardisation_uses_train_statistics():
    from mae_timm.engine.eval.knn import KnnConfig, knn_on_features

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    informative = labels[:, None].float() * 0.1 + 0.01 * torch.randn(200, 1, generator=g)
    noise = 10 * torch.randn(200, 4, generator=g)  # large, useless dimensions dominate the cosine
    x = torch.cat([informative, noise], 1)
    args = (x[:150], labels[:150], x[150:], labels[150:], 2)
    plain = knn_on_features(*args, KnnConfig(k=5, report_k=(5,)), "cpu")["top1"]
    standard = knn_on_features(*args, KnnConfig(k=5, report_k=(5,), standardize=True), "cpu")["top1"]
    assert standard == 100.0 and plain < 90


def test_flat_pooling_keeps_every_patch_token_in_grid_order():
    import timm

    from mae_timm import create_timm_encoder

    model = timm.create_model("mae_vit_test").eval()  # 32 px, 8 px patches: 16 tokens of width 32, 2 blocks
    g = torch.Generator().manual_seed(0)
    images = splits.Images(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(3), 3)
    variants = [("flat", False), ("avg", False), ("flat", True), ("token", True), ("avg", True)]
    cpu = torch.device("cpu")
    norm = normalizer(model, cpu)
    got, labels = extract_features(model, splits.MemoryLoader(images, 2, train=False), norm, cpu, variants, 2,
                                   dtype=torch.float32)
    assert torch.equal(labels, images.labels)
    encoder = create_timm_encoder(model, fc_norm=False).eval()
    with torch.no_grad():
        outs = encoder.forward_intermediates(norm(images.images), indices=2, norm=False, output_fmt="NLC",
                                             intermediates_only=True, return_prefix_tokens=True)
    for b, (patches, prefix) in enumerate(outs):  # (3, 16, 32), (3, 1, 32)
        normed = encoder.norm(torch.cat([prefix, patches], 1))
        assert torch.allclose(got[("flat", False)][:, b], patches.flatten(1), atol=1e-6)
        assert torch.allclose(got[("flat", True)][:, b], normed[:, 1:].flatten(1), atol=1e-6)
        assert torch.allclose(got[("token", True)][:, b], normed[:, 0], atol=1e-6)
        assert torch.allclose(got[("avg", False)][:, b], patches.mean(1), atol=1e-6)
    assert got[("flat", False)].shape == (3, 2, 16 * 32) and got[("avg", True)].shape == (3, 2, 32)


@pytest.mark.parametrize(("pools", "variants"), [
    ("avg,token", [("avg", True), ("token", True), ("avg", False)]),
    ("avg,token,flat", [("avg", True), ("token", True), ("flat", True), ("avg", False), ("flat", False)]),
    ("flat", [("flat", True), ("avg", False), ("flat", False)]),
])
def test_feature_candidates_of_each_pooling(pools, variants):
    import timm

    assert choose.variants(pools.split(","), timm.create_model("mae_vit_test")) == variants
    with pytest.raises(UserError, match="pools must be among avg, token and flat"):
        CompareConfig(data="x", pools="avg,max")


def test_a_split_decodes_in_an_order_set_by_its_images_alone(tmp_path):
    """The hold-out is a draw over positions: they may not move with the loader's workers or the sharding."""
    _imagefolder(tmp_path / "images", dict(train=12, validation=4))
    for shards in (1, 4):
        assert main(["shards", "imagefolder", "--src", str(tmp_path / "images"), "--out", str(tmp_path / f"s{shards}"),
                     "--quiet", "--min-shards", str(shards)]) == 0
    one = splits.load_split(str(tmp_path / "s1"), "train", 16, 3, 0)
    for shards, workers in ((4, 0), (4, 2), (1, 2)):
        other = splits.load_split(str(tmp_path / f"s{shards}"), "train", 16, 3, workers)
        assert torch.equal(other.images, one.images) and torch.equal(other.labels, one.labels), (shards, workers)
