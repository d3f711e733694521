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
from mae_timm.utils import NonFiniteLossError


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
        finetune_evaluate(model, [batch], [batch], 4, cfg, "cpu", log=lambda line: None)


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
