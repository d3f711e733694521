"""Export of an encoder to safetensors: the file loads in timm with identical features, and a failed check
leaves no file."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open

import mae_timm
from mae_timm.engine.export import create_model_line, export_safetensors

PRETEXT_TEST_MODELS = [name for name in ("mae_vit_test", "mae_vit_test_early_mask", "apl_vit_test")
                       if name in timm.list_models()]


@pytest.mark.parametrize("name", PRETEXT_TEST_MODELS)
def test_export_loads_in_timm_with_identical_features(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    path = tmp_path / "encoder.safetensors"
    arch, kwargs = export_safetensors(model, path)
    loaded = eval(create_model_line(arch, kwargs, path), {"timm": timm})  # the line the command prints
    reference = mae_timm.create_timm_encoder(model).eval()
    x = torch.randn(2, 3, *reference.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().forward_features(x), reference.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.forward_head(loaded.forward_features(x), pre_logits=True),
                                   reference.forward_head(reference.forward_features(x), pre_logits=True))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["timm_architecture"] == arch and json.loads(metadata["timm_kwargs"])["num_classes"] == 0


def test_failed_export_check_leaves_no_file(tmp_path, monkeypatch):
    model = timm.create_model("mae_vit_test")
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(b"an earlier export")
    create_timm_encoder = mae_timm.create_timm_encoder

    def wrong_encoder(model, **overrides):  # the export then differs from what the check compares with
        encoder = create_timm_encoder(model, **overrides)
        torch.nn.init.zeros_(encoder.blocks[0].mlp.fc2.weight)
        return encoder

    monkeypatch.setattr(mae_timm, "create_timm_encoder", wrong_encoder)
    with pytest.raises(ValueError, match="export not written"):
        export_safetensors(model, path)
    assert path.read_bytes() == b"an earlier export" and [p.name for p in tmp_path.iterdir()] == [path.name]
