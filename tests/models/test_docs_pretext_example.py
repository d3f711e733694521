"""The "Adding a pretext model" example in docs/models.md is code that works: it registers with timm, honours the
contract, trains (a backward pass), exports strictly into the timm model it names, and the engine builds it."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import timm
import torch

import mae_timm
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.model_setup import build_model
from mae_timm.models import is_pretext_model

DOCS = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def test_adding_a_pretext_model_example_runs(tmp_path, monkeypatch):
    section = DOCS.read_text().split("## Adding a pretext model", 1)[1].split("\n## ", 1)[0]
    (tmp_path / "simmim_doc_example.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("simmim_doc_example")  # registers simmim_vit_test
    try:
        model = timm.create_model("simmim_vit_test")
        imgs = torch.randn(2, 3, 32, 32)
        loss, pred, mask = model(imgs, mask_ratio=0.6)
        loss.backward()
        assert is_pretext_model(model) and model.predicts_pixels and model.takes_mask_ratio
        assert pred.shape == (2, 16, 192) and mask.sum(1).tolist() == [10.0, 10.0]
        model.eval()
        vit = timm.create_model(model.encoder_architecture(), **model.encoder_kwargs()).eval()
        vit.load_state_dict(mae_timm.export_encoder(model), strict=True)
        expected = mae_timm.create_timm_encoder(model).eval().forward_features(imgs)
        torch.testing.assert_close(vit.forward_features(imgs), expected)
        # the engine admits it as it admits its own models: it honours the contract, wherever it is defined
        pretrained, _ = build_model(PretrainConfig(model="simmim_vit_test"))
        assert type(pretrained) is type(model) and pretrained.input_size() == 32
    finally:
        sys.modules.pop("simmim_doc_example", None)
