"""Evaluation protocols on CPU: the shared pieces (accuracy, features and pooling, the warmup rule, errors), kNN,
the linear probe (BatchNorm without affine, LARS), the baselines (raw pixels, scratch) and fine-tuning (layer decay,
mixup, drop path, crops on the device, the short-budget rule, a non-finite loss)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from fakes import make_shards

import mae_timm
import mae_timm.engine.eval.finetune as finetune
import mae_timm.engine.eval.knn as knn
import mae_timm.engine.eval.linprobe as linprobe
from mae_timm.data import GpuAugment, read_idx
from mae_timm.demo import ASSETS
from mae_timm.engine.eval.evaluate import (
    EvalData,
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    evaluate_frozen,
    evaluate_model,
    extract_features,
    finetune_evaluate,
    frozen_features,
    knn_on_features,
    knn_scores,
    linprobe_on_features,
    topk_accuracy,
)
from mae_timm.utils import NonFiniteLossError, UserError
from tests.fakes import Batches


def knn_evaluate(model, train, val, num_classes, cfg, device):
    """kNN of a model's frozen features, through the package's API (what `mae-timm knn` runs)."""
    cached = frozen_features(model, train, val, device, pool=cfg.pool, final_norm=cfg.final_norm,
                             blocks=cfg.feature_blocks)
    return knn_on_features(*cached, num_classes, cfg, device)


def linprobe_evaluate(model, train, val, num_classes, cfg, device):
    """The linear probe of a model's frozen features, through the package's API (what `mae-timm linprobe` runs)."""
    cached = frozen_features(model, train, val, device, pool=cfg.pool, final_norm=cfg.final_norm,
                             blocks=cfg.feature_blocks)
    return linprobe_on_features(*cached, num_classes, cfg, device)

CREATE_OPTIMIZER = finetune.create_optimizer_v2  # the real one, for tests that wrap it
LINPROBE_OPTIMIZER = linprobe.create_optimizer_v2
PRETEXT_TEST_MODELS = [
    name for name in ("mae_vit_test", "mae_vit_test_early_mask", "apl_vit_test") if name in timm.list_models()
]
PALETTE = torch.tensor([[230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40]], dtype=torch.uint8)


def _colour_images(num_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 clearly separable classes of 32 px uint8 images: a class colour plus per-pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(num_per_class)
    noise = torch.randint(0, 50, (len(labels), 3, 32, 32), generator=generator, dtype=torch.uint8)
    return PALETTE[labels].view(-1, 3, 1, 1) // 5 * 4 + noise, labels  # (N, 3, 32, 32), (N,)


def _batches(imgs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> list:
    return list(zip(imgs.split(batch_size), labels.split(batch_size)))


@pytest.fixture(scope="module")
def separable():
    train = _batches(*_colour_images(12, seed=0), batch_size=16)
    val = _batches(*_colour_images(5, seed=1), batch_size=16)
    return train, val


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("eval"))  # 4 colour classes, 32 train + 8 validation, 32 px


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([1, 1, 0, 2])
    assert topk_accuracy(scores, labels, ks=(1, 2, 5)) == {"top1": 25.0, "top2": 50.0, "top5": 100.0}


def test_knn_votes_are_temperature_weighted():
    # two fairly similar neighbours of class 0 are outvoted by one very similar neighbour of class 1
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 2])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_scores(bank, labels, query, num_classes=3, k=3, temperature=0.07)
    assert scores.argmax().item() == 1
    expected = torch.tensor([[2 * math.exp(0.6 / 0.07), math.exp(1 / 0.07), 0.0]])
    torch.testing.assert_close(scores, expected)
    flat = knn_scores(bank, labels, query, num_classes=3, k=3, temperature=100.0)  # ~ majority vote
    assert flat.argmax().item() == 0


@pytest.mark.parametrize("name", PRETEXT_TEST_MODELS)
def test_knn_and_linprobe_separate_clear_classes(name, separable):
    train, val = separable
    torch.manual_seed(0)
    model = timm.create_model(name)
    result = knn_evaluate(model, train, val, 4, KnnConfig(), "cpu")
    assert result["top1"] >= 90.0 and result["top5"] == 100.0 and result["num_val"] == 20
    cfg = LinprobeConfig(epochs=30, batch_size=16, blr=100.0, warmup_epochs=2)  # LARS at the official lr 6.25
    probe = linprobe_evaluate(model, train, val, 4, cfg, "cpu")
    assert probe["top1"] >= 90.0, probe


@pytest.mark.gpu
def test_knn_votes_on_the_eval_device(separable, device, monkeypatch):
    train, val = separable
    devices = []

    def knn_scores_on(bank, labels, queries, num_classes, **kwargs):
        devices.extend(t.device.type for t in (bank, labels, queries))
        return knn_scores(bank, labels, queries, num_classes, **kwargs)

    monkeypatch.setattr(knn, "knn_scores", knn_scores_on)
    model = timm.create_model("mae_vit_test")
    result = knn_evaluate(model, train, val, 4, KnnConfig(), device)
    on_cpu = knn_evaluate(model.cpu(), train, val, 4, KnnConfig(), "cpu")
    # the device changes where the votes are counted, not their result (one flipped vote of 20 allowed)
    assert devices == [device.type] * 3 and abs(result["top1"] - on_cpu["top1"]) <= 5.0


def test_finetune_two_steps_with_layer_decay_mixup_and_drop_path(separable, monkeypatch):
    train, val = separable
    model = timm.create_model("mae_vit_test")
    seen = {}

    def create_optimizer(classifier, **kwargs):
        seen.update(classifier=classifier, optimizer=CREATE_OPTIMIZER(classifier, **kwargs))
        return seen["optimizer"]

    class SoftTarget(finetune.SoftTargetCrossEntropy):
        def forward(self, x, target):
            seen["soft_targets"] = target.shape == x.shape  # mixed one-hot targets, not class indices
            return super().forward(x, target)

    monkeypatch.setattr(finetune, "create_optimizer_v2", create_optimizer)
    monkeypatch.setattr(finetune, "SoftTargetCrossEntropy", SoftTarget)
    cfg = FinetuneConfig(epochs=1, batch_size=16, warmup_epochs=0, drop_path_rate=0.2, mixup=0.8,
                         full_recipe_updates=2)  # two updates get the full recipe
    logs = []
    result = finetune_evaluate(model, Batches(train[:2]), val, 4, cfg, "cpu", log=logs.append)
    num_val = sum(len(labels) for _, labels in val)
    assert result["top1"] in [100 * i / num_val for i in range(num_val + 1)] and math.isfinite(result["train_loss"])
    assert len(result["history"]) == 1 and logs[0]["epoch"] == 1 and "best_top1" not in result
    assert result["recipe_strength"] == 1.0 and result["updates"] == 2
    classifier = seen["classifier"]
    assert len({group["lr_scale"] for group in seen["optimizer"].param_groups}) > 1  # layer decay
    assert classifier.blocks[-1].drop_path1.drop_prob == pytest.approx(cfg.drop_path_rate)
    assert seen["soft_targets"]
    # average pooling, then the final LayerNorm (fc_norm), as the MAE fine-tune; no norm before the pool
    assert classifier.global_pool == "avg" and isinstance(classifier.norm, torch.nn.Identity)
    assert isinstance(classifier.fc_norm, torch.nn.LayerNorm)


def test_finetune_fc_norm_starts_from_the_trained_norm_and_head_near_zero(separable, monkeypatch):
    train, val = separable
    torch.manual_seed(0)
    model = timm.create_model("mae_vit_test")
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)  # a trained-looking final norm
    seen = {}

    def create_optimizer(classifier, **kwargs):
        seen.update(
            fc_norm=classifier.fc_norm.weight.detach().clone(),
            head=classifier.head.weight.detach().clone(),
            bias=classifier.head.bias.detach().clone(),
        )
        return CREATE_OPTIMIZER(classifier, **kwargs)

    monkeypatch.setattr(finetune, "create_optimizer_v2", create_optimizer)
    cfg = FinetuneConfig(epochs=1, batch_size=16, warmup_epochs=0, mixup=0.0, cutmix=0.0)
    finetune_evaluate(model, Batches(train[:1]), val[:1], 4, cfg, "cpu", log=lambda _: None)
    torch.testing.assert_close(seen["fc_norm"], model.norm.weight.detach())  # a documented deviation
    assert 1e-5 < seen["head"].std() < 4e-5 and not seen["bias"].any()  # trunc_normal_(std=2e-5), bias 0


def test_finetune_crops_and_flips_training_batches_on_the_device(separable, monkeypatch):
    """The loader only decodes; RandomResizedCrop(crop_scale_min, 1) + flip run in GpuAugment, on training
    batches only (validation batches are only normalised)."""
    train, val = separable
    crops = []
    crop_and_flip = GpuAugment.crop_and_flip

    def recorded(self, x, generator=None):
        crops.append((x.shape, self.scale, self.img_size))
        return crop_and_flip(self, x, generator)

    monkeypatch.setattr(GpuAugment, "crop_and_flip", recorded)
    cfg = FinetuneConfig(epochs=2, batch_size=16, warmup_epochs=0, mixup=0.0, cutmix=0.0, crop_scale_min=0.5,
                         full_recipe_updates=8)  # 4 updates: half the recipe, crops of (1 - 0.5 * 0.5, 1)
    finetune_evaluate(timm.create_model("mae_vit_test"), Batches(train[:2]), val[:1], 4, cfg, "cpu", log=lambda _: None)
    assert crops == [(torch.Size([16, 3, 32, 32]), (0.75, 1.0), 32)] * 4  # 2 epochs x 2 training batches


def test_finetune_is_reproducible_under_its_seed(separable):
    """RandAugment, crops, flips, erasing, mixup draws, drop path and the head init all follow ``cfg.seed``."""
    train, val = separable
    cfg = FinetuneConfig(epochs=1, batch_size=16, warmup_epochs=0, seed=3, full_recipe_updates=1)
    losses = []
    for global_seed in (1, 2):
        torch.manual_seed(0)  # the same pretext model
        model = timm.create_model("mae_vit_test")
        torch.manual_seed(global_seed)  # a different global state before each run: cfg.seed must take over
        result = finetune_evaluate(model, Batches(train[:2]), val[:1], 4, cfg, "cpu", log=lambda _: None)
        losses.append(result["train_loss"])
    assert losses[0] == losses[1]


@pytest.mark.parametrize(
    "protocol, cfg, data, match",
    [
        ("linprobe", LinprobeConfig(epochs=0), {}, "epochs must be >= 1"),
        ("finetune", FinetuneConfig(epochs=0, batch_size=8), {}, "epochs must be >= 1"),
        ("knn", KnnConfig(k=0), {}, "k >= 1"),
        ("knn", KnnConfig(temperature=0.0), {}, "temperature > 0"),
        ("knn", KnnConfig(), dict(val_split="train"), "measured on the training data"),
        ("knn", KnnConfig(), dict(device="cuda"), "CUDA is not available"),
    ],
)
def test_evaluation_errors_are_one_line(protocol, cfg, data, match, shards):
    if data.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    model = timm.create_model("mae_vit_test")
    with pytest.raises(ValueError, match=match) as error:
        evaluate_model(protocol, model, EvalData(data=str(shards), num_workers=0, **data), cfg)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("protocol", ["knn", "linprobe", "finetune"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_unlabelled_samples_are_a_clear_error(protocol, split, separable):
    train, val = separable
    imgs, labels = val[0]
    unlabelled = [(imgs, torch.full_like(labels, -1))]
    train, val = (unlabelled, val) if split == "train" else (train[:1], unlabelled)
    cfg = dict(knn=KnnConfig(), linprobe=LinprobeConfig(epochs=1, warmup_epochs=0),
               finetune=FinetuneConfig(epochs=1, warmup_epochs=0, mixup=0.0))
    run = dict(knn=knn_evaluate, linprobe=linprobe_evaluate, finetune=finetune_evaluate)[protocol]
    with pytest.raises(ValueError, match="unlabelled samples"):
        run(timm.create_model("mae_vit_test"), Batches(train), val, 4, cfg[protocol], "cpu")


@pytest.mark.parametrize("warmup_epochs", [2, 10, -1])
def test_warmup_not_below_the_epochs_is_an_error(warmup_epochs, separable):
    """The one warmup rule (check_warmup): 0 <= warmup < epochs, else a one-line error before any work."""
    train, val = separable
    model = timm.create_model("mae_vit_test")
    match = f"warmup of {warmup_epochs} epochs must be at least 0 and below the 2 epochs"
    with pytest.raises(UserError, match=match):
        linprobe_evaluate(model, train, val, 4, LinprobeConfig(epochs=2, warmup_epochs=warmup_epochs), "cpu")
    if warmup_epochs < 0:  # the fine-tune caps its warmup at a part of the run: only a negative one is wrong
        with pytest.raises(UserError, match="warmup_epochs"):
            FinetuneConfig(epochs=2, warmup_epochs=warmup_epochs)


def test_warmup_of_all_but_one_epoch_trains(separable, monkeypatch):
    """Warmup 1 of 2 epochs: the lr rises from 0 over the first epoch's updates, then decays."""
    train, val = separable
    lrs = []
    step = linprobe.optimizer_step

    def recording(optimizer, loss, module, clip_grad=None):
        lrs.append(optimizer.param_groups[0]["lr"])
        step(optimizer, loss, module, clip_grad)

    monkeypatch.setattr(linprobe, "optimizer_step", recording)
    cfg = LinprobeConfig(epochs=2, batch_size=16, blr=1.0, warmup_epochs=1)
    result = linprobe_evaluate(timm.create_model("mae_vit_test"), train, val, 4, cfg, "cpu")
    per_epoch, peak = len(lrs) // 2, 16 / 256
    assert lrs[0] == 0.0 and lrs[:per_epoch] == sorted(lrs[:per_epoch]) and max(lrs) <= peak + 1e-9
    assert lrs[per_epoch] == pytest.approx(peak) and lrs[per_epoch:] == sorted(lrs[per_epoch:], reverse=True)
    assert math.isfinite(result["train_loss"]) and len(lrs) == 2 * per_epoch


def test_linear_probe_is_batchnorm_without_affine_and_lars(separable, monkeypatch):
    train, val = separable
    seen = {}

    def create_optimizer(groups, opt, **kwargs):
        seen.update(opt=opt, groups=groups, kwargs=kwargs)
        return LINPROBE_OPTIMIZER(groups, opt, **kwargs)

    head = linprobe.linear_head(32, 4)
    assert not head[0].affine and head[0].weight is None and head[1].weight.std() < 0.02
    monkeypatch.setattr(linprobe, "create_optimizer_v2", create_optimizer)
    cfg = LinprobeConfig(epochs=2, batch_size=16, blr=0.2, warmup_epochs=1)
    linprobe_evaluate(timm.create_model("mae_vit_test"), train, val, 4, cfg, "cpu")
    assert seen["opt"] == "lars" and seen["kwargs"]["weight_decay"] == 0.0
    assert seen["kwargs"]["lr"] == pytest.approx(0.2 * 16 / 256)
    matrices, vectors = seen["groups"]
    assert matrices["always_adapt"] and [p.ndim for p in matrices["params"]] == [2]  # trust ratio on the weight
    assert not vectors["always_adapt"] and [p.ndim for p in vectors["params"]] == [1]  # momentum SGD on the bias


@pytest.mark.parametrize("name", PRETEXT_TEST_MODELS)
def test_features_pool_the_last_blocks_the_same_way_for_every_model(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    x = torch.randn(3, 3, 32, 32)
    encoder = mae_timm.create_timm_encoder(model, global_pool="avg", fc_norm=False).eval()
    with torch.no_grad():
        expected = encoder.forward_head(encoder.forward_features(x), pre_logits=True)
    identity = torch.nn.Identity()
    batches = [(x, torch.arange(3))]

    def features(pool, blocks):
        got, _ = extract_features(model, batches, identity, torch.device("cpu"), [(pool, True)], blocks, torch.float32)
        return got[(pool, True)].flatten(1)

    one, two = features("avg", 1), features("avg", 2)
    torch.testing.assert_close(one, expected)
    assert two.shape == (3, 2 * one.shape[1]) and torch.equal(two[:, one.shape[1]:], one)  # the last block last
    if not encoder.has_class_token:
        with pytest.raises(UserError, match="no class token"):
            features("token", 1)
    with pytest.raises(UserError, match="feature_blocks must be in 1..2"):
        features("avg", 3)


def test_knn_reports_top1_at_several_k():
    bank = torch.randn(300, 8)
    labels = torch.randint(0, 3, (300,))
    result = knn.knn_on_features(bank, labels, bank[:50], labels[:50], 3, KnnConfig(report_k=(1, 20, 200)), "cpu")
    assert set(result["top1_by_k"]) == {"1", "20", "200"} and result["top1_by_k"]["1"] == 100.0  # its own copy
    assert result["top1_by_k"]["20"] == result["top1"]


def test_raw_pixel_baseline_runs_through_the_same_protocols(shards):
    model = timm.create_model("mae_vit_test")
    data = EvalData(data=str(shards), num_workers=0)
    cfgs = dict(knn=KnnConfig(), linprobe=LinprobeConfig(epochs=5, batch_size=8, blr=200.0, warmup_epochs=1))
    pixels = evaluate_frozen(model, data, **cfgs, raw_pixels=True)
    encoder = evaluate_frozen(model, data, **cfgs)
    for protocol in ("knn", "linprobe"):
        assert pixels[protocol]["feature_dim"] == 3 * 32 * 32 and pixels[protocol]["features"] == "raw_pixels"
        assert encoder[protocol]["feature_dim"] == 32 and pixels[protocol]["num_val"] == 8
    assert pixels["knn"]["top1"] >= 75.0  # colour classes: pixels separate them


def _fashion_mnist_sample(num_train: int, num_val: int, batch_size: int) -> tuple[list, list]:
    """Batches of the bundled Fashion-MNIST sample at 28 px, repeated to 3 channels."""
    def batches(split, n):
        imgs = torch.from_numpy(read_idx(ASSETS / f"{split}-images-idx3-ubyte.gz")[:n].copy())
        labels = torch.from_numpy(read_idx(ASSETS / f"{split}-labels-idx1-ubyte.gz")[:n].astype("int64"))
        return _batches(imgs[:, None].expand(-1, 3, -1, -1).contiguous(), labels, batch_size)
    return batches("train", num_train), batches("t10k", num_val)


TINY_VIT = dict(img_size=28, patch_size=7, embed_dim=48, depth=2, num_heads=3)


@pytest.mark.slow
def test_short_finetune_of_a_random_init_beats_chance_and_plain_adamw():
    """The default recipe, on a run too short for mixup & co (40 updates): a random init beats chance by far and is
    not worse than plain AdamW (constant lr, no augmentation or regularisation) of the same budget."""
    train, val = _fashion_mnist_sample(1280, 500, 64)
    plain = FinetuneConfig(epochs=2, batch_size=64, warmup_epochs=0, min_lr=1e-3 * 64 / 256, layer_decay=1.0,
                           drop_path_rate=0.0, label_smoothing=0.0, mixup=0.0, cutmix=0.0, rand_augment=None,
                           reprob=0.0, crop_scale_min=1.0, full_recipe_updates=1)
    results = {}
    for name, cfg in (("recipe", FinetuneConfig(epochs=2, batch_size=64)), ("plain", plain)):
        torch.manual_seed(0)  # the same random init for both
        model = timm.create_model("mae_vit_test", **TINY_VIT)
        results[name] = finetune_evaluate(model, Batches(train), val, 10, cfg, "cpu", log=lambda _: None)["top1"]
    assert results["recipe"] > 25.0, results  # chance is 10 %
    assert results["recipe"] >= results["plain"] - 1.0, results  # one point: seed noise of 500 test images


def test_non_finite_loss_stops_the_finetune(separable):
    train, val = separable
    torch.manual_seed(0)
    model = timm.create_model("mae_vit_test")
    with torch.no_grad():
        model.patch_embed.proj.weight.fill_(float("nan"))
    cfg = FinetuneConfig(epochs=1, batch_size=16, warmup_epochs=0)
    with pytest.raises(NonFiniteLossError, match="loss is nan") as error:  # optim.optimizer_step's stop
        finetune_evaluate(model, Batches(train), val, 4, cfg, "cpu")
    assert "\n" not in str(error.value)
