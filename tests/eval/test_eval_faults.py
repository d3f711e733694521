"""Evaluation under faults: a training loop stops on a non-finite loss, and the result file carries the counts of
skipped inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from fakes import jpeg_bytes, make_shards, tiny_pretrain_config

from mae_timm.data import Sample, write_shards
from mae_timm.engine.eval.evaluate import EvalData, evaluate_checkpoint
from mae_timm.engine.eval.finetune import FinetuneConfig, finetune_evaluate
from mae_timm.engine.eval.knn import KnnConfig
from mae_timm.engine.train.pretrain import pretrain
from mae_timm.utils import NonFiniteLossError, UserError
from tests.fakes import Batches


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("engine"))  # 32 train images of 32 px in 4 shards


config = tiny_pretrain_config


def test_training_loops_stop_on_a_non_finite_loss():
    model = timm.create_model("mae_vit_test")
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.fill_(float("nan"))  # every logit NaN: the loss is NaN from the first step
    rng = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=rng), torch.arange(4))
    cfg = FinetuneConfig(epochs=1, warmup_epochs=0, batch_size=4, mixup=0.0, cutmix=0.0)
    with pytest.raises(NonFiniteLossError, match="the training loss is nan"):
        finetune_evaluate(model, Batches([batch]), [batch], 4, cfg, "cpu", log=lambda line: None)


def test_result_file_carries_skipped_counts(shards, tmp_path):
    rng = np.random.default_rng(0)
    broken = jpeg_bytes(rng, 32)[:200]  # a JPEG cut short
    samples = {split: [Sample(f"{split}{i}", broken if i == 1 else jpeg_bytes(rng, 32), cls=i % 2) for i in range(6)]
               for split in ("train", "validation")}
    write_shards(tmp_path / "data", samples, ["a", "b"], min_shards=2, progress=False)
    result = pretrain(config(tmp_path / "run", shards, max_steps=1))
    evaluate_checkpoint("knn", result.checkpoint, EvalData(str(tmp_path / "data"), num_workers=0),
                        KnnConfig(k=2), out_dir=tmp_path)
    saved = json.loads((tmp_path / "knn.json").read_text())
    assert saved["num_val"] == 5 and saved["data_errors"]["validation"]["bad_images"] == 1
    assert saved["data_errors"]["train"] == dict(bad_images=1, bad_shards=0, reserved_members=0)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(reprob=-1.0), r"reprob \(--reprob\) is -1.0; it must be in \[0, 1\]"),
    (dict(reprob=2.0), r"reprob \(--reprob\) is 2.0; it must be in \[0, 1\]"),
    (dict(full_recipe_updates=-5), r"full_recipe_updates \(--full-recipe-updates\) is -5; it must be at least 1"),
    (dict(rand_augment="bogus"), r"rand_augment \(--rand-augment\) 'bogus' is not a timm RandAugment string"),
])
def test_finetune_settings_out_of_range_are_refused_when_built(settings, message):
    with pytest.raises(UserError, match=message):
        FinetuneConfig(**settings)
    FinetuneConfig(rand_augment="rand-m7-n1", reprob=0.0)  # valid ones still build


def test_a_finetune_save_dir_that_cannot_be_written_is_refused_before_training(tmp_path):
    (tmp_path / "save" / "last").mkdir(parents=True)
    (tmp_path / "save" / "last" / "notes.txt").write_text("mine")

    class Untouched:  # training would iterate it
        def __iter__(self):
            raise AssertionError("the loader was read before the save folder was checked")

        def __len__(self):
            return 1

    cfg = FinetuneConfig(epochs=1, warmup_epochs=0, batch_size=4, save_dir=str(tmp_path / "save"))
    with pytest.raises(UserError, match=r"save/last holds other files than an export"):
        finetune_evaluate(timm.create_model("mae_vit_test"), Untouched(), Untouched(), 4, cfg, "cpu")
    assert (tmp_path / "save" / "last" / "notes.txt").read_text() == "mine"
