"""What timm and transformers users meet first: the plain transformers ViT (``--format hf``), the ViTMAE folder
(``--format hf-mae``), one-line refusals, the model card, the class names of fine-tuned exports and the truthful
``pretrained_cfg`` of ``create_timm_encoder``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image

import mae_timm
from mae_timm.cli import main
from mae_timm.engine.checkpoint import checkpoint_path, save_checkpoint
from mae_timm.engine.export import GRAY_TOLERANCE, export_hf_folder, export_timm_folder

ASSETS = Path(mae_timm.__file__).parent / "assets"
needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the hf extra")


def randomized(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def checkpoint(tmp_path: Path, name: str, config: dict | None = None, **kwargs) -> Path:
    model = randomized(name, **kwargs)
    state = dict(model=model.state_dict(), model_name=name, model_kwargs=kwargs, step=3, epoch=1, optimizer={},
                 scheduler={}, scaler={}, rng={}, config=config or {}, version=mae_timm.__version__)
    return save_checkpoint(state, checkpoint_path(tmp_path / "run", 3))


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def card_code(readme: Path) -> dict:
    """Run the ```python block of a model card; its namespace."""
    namespace: dict = {}
    exec(readme.read_text().split("```python\n", 1)[1].split("```", 1)[0], namespace)
    return namespace


def test_create_timm_encoder_states_its_real_input():
    for name, size in (("mae_vit_test", 32), ("mae_vit_test_early_mask", 32), ("apl_vit_test", None)):
        model = timm.create_model(name)
        vit = mae_timm.create_timm_encoder(model)
        side = size or model.input_size()
        assert vit.pretrained_cfg["input_size"] == (3, side, side)
        config = timm.data.resolve_data_config(model=vit)
        assert config["input_size"] == (3, side, side) and config["mean"] == tuple(model.pretrained_cfg["mean"])
    gray = timm.create_model("mae_vit_test", in_chans=1, pretrained_cfg_overlay=dict(mean=[0.3], std=[0.4]))
    assert timm.data.resolve_data_config(model=mae_timm.create_timm_encoder(gray))["input_size"] == (1, 32, 32)


@needs_hf
def test_hf_folder_is_a_plain_vit_with_timm_features(tmp_path, monkeypatch):
    from transformers import ViTForImageClassification, ViTModel, pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = randomized("mae_vit_test")
    out = export_hf_folder(model, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                      "preprocessor_config.json"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ViTModel"]
    assert json.loads((out / "preprocessor_config.json").read_text())["do_convert_rgb"] is True
    x = torch.randn(2, 3, 32, 32)
    vit = mae_timm.create_timm_encoder(model).eval()
    with torch.no_grad():
        hf = ViTModel.from_pretrained(out).eval()(pixel_values=x)
        torch.testing.assert_close(hf.pooler_output, vit(x), **GRAY_TOLERANCE)
        torch.testing.assert_close(hf.last_hidden_state, vit.forward_features(x), **GRAY_TOLERANCE)
    classifier, info = ViTForImageClassification.from_pretrained(out, num_labels=7, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"} and not info["mismatched_keys"]
    assert info["unexpected_keys"] <= {"pooler.dense.weight", "pooler.dense.bias"}  # the feature pooler, unused
    assert card_code(out / "README.md")["classifier"].num_labels == 10  # the card's load lines run as written
    extract = pipeline("image-feature-extraction", model=str(out), device="cpu", pool=True)
    image = Image.new("L", (28, 28), 90)  # a grayscale file: the processor converts it to RGB
    assert torch.equal(torch.tensor(extract(image)), torch.tensor(extract(image)))


@needs_hf
@pytest.mark.parametrize(("name", "fmt", "says"), [
    ("mae_vit_test_early_mask", "hf", "one class token"),  # the registered early-mask ViT pools 'avg', no cls token
    ("apl_vit_test", "hf", "one class token"),
    ("mae_vit_test_early_mask", "hf-mae", "only the late-mask"),
    ("apl_vit_test", "hf-mae", "only the late-mask"),
])
def test_formats_that_cannot_hold_a_model_refuse_in_one_line(name, fmt, says, tmp_path, capsys):
    path = checkpoint(tmp_path, name)
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "out"), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mae-timm export: error: --format {fmt}: ") and says in err and "\n" not in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_model_card_in_the_hub_convention(tmp_path):
    data = tmp_path / "fashion"
    assert main(["shards", "fashion-mnist", "--src", str(ASSETS), "--out", str(data), "--limit", "40",
                 "--min-shards", "1", "--quiet"]) == 0
    config = dict(model="mae_vit_test", data=str(data), epochs=7, batch_size=16, mask_ratio=0.6)
    path = checkpoint(tmp_path, "mae_vit_test", config, in_chans=1,
                      pretrained_cfg_overlay=dict(mean=[0.286], std=[0.353]))
    knn = dict(protocol="knn", top1=41.25, top5=88.5, baselines=dict(raw_pixels=dict(top1=37.0), scratch=30.5))
    (path.parent / "knn.json").write_text(json.dumps(knn))
    out = tmp_path / "encoder"
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 0
    meta = front_matter(out / "README.md")
    assert meta["library_name"] == "timm" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["zalando-datasets/fashion_mnist"] and "MaskedAutoencoderViT" in meta["tags"]
    text = (out / "README.md").read_text()
    for section in ("## Architecture", "## Pretext", "## Data", "## Training command", "## Evaluation",
                    "## How to load"):
        assert section in text
    assert "--epochs 7" in text and "--mask-ratio 0.6" in text and f"--data {data}" in text
    assert "| knn | 41.25 | 88.50 | raw_pixels 37.00, scratch 30.50 |" in text
    assert "divided by 3" in text and f"timm.create_model('local-dir:{out}'" in text
    assert "`fashion-mnist` shards (10 classes" in text
    namespace = card_code(out / "README.md")  # the card's load lines run as written
    assert namespace["model"].num_classes == 10 and namespace["config"]["input_size"] == (3, 32, 32)


def test_a_card_without_records_says_so(tmp_path):
    out = export_timm_folder(randomized("apl_vit_test"), tmp_path / "encoder")
    text = (out / "README.md").read_text()
    assert "No evaluation was recorded" in text and "## Training command\nNot recorded." in text
    assert "datasets" not in front_matter(out / "README.md")


def test_finetuned_export_carries_the_class_names(tmp_path):
    data = tmp_path / "fashion"
    assert main(["shards", "fashion-mnist", "--src", str(ASSETS), "--out", str(data), "--limit", "40",
                 "--min-shards", "1", "--quiet"]) == 0
    path = checkpoint(tmp_path, "mae_vit_test", in_chans=1, img_size=28, patch_size=7,
                      pretrained_cfg_overlay=dict(mean=[0.286], std=[0.353]))
    assert main(["finetune", "--checkpoint", str(path), "--data", str(data), "--num-workers", "0", "--device", "cpu",
                 "--epochs", "1", "--batch-size", "8", "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0",
                 "--rand-augment", "", "--val-split", "validation"]) == 0
    out = path.parent / "finetuned" / "last"
    names = [c["name"] for c in json.loads((data / "_info.json").read_text())["classes"]]
    assert len(names) == 10 and names[0] == "T-shirt/top"
    classifier = timm.create_model(f"local-dir:{out}", pretrained=True)  # 3 channels, timm's default
    assert classifier.pretrained_cfg["label_names"] == names and classifier.num_classes == 10
    text = (out / "README.md").read_text()
    assert "## Labels\n0: T-shirt/top, 1: Trouser" in text and "| this classifier (fine-tuned) |" in text
    assert front_matter(out / "README.md")["pipeline_tag"] == "image-classification"
