"""Export to a timm ``local-dir`` folder: what ``timm.create_model('local-dir:DIR', pretrained=True, num_classes=N)``
and timm's ``train.py`` read, for late-mask, early-mask, APL and a factory model over a ViT with register tokens;
the folder is replaced only by a checked export; the ``mae-timm export`` command prints lines that work."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from timm.data import resolve_data_config

import mae_timm
from mae_timm.cli import main
from mae_timm.engine.checkpoint import checkpoint_path, save_checkpoint
from mae_timm.engine.export import export_timm_folder, save_timm_folder
from mae_timm.utils import UserError
from tests.fakes import Batches

MODELS = {
    "late": lambda: timm.create_model("mae_vit_test"),
    "early": lambda: timm.create_model("mae_vit_test_early_mask"),
    "apl": lambda: timm.create_model("apl_vit_test"),
    "factory_dinov2_reg4": lambda: mae_timm.create_pretext_model(
        "mae", "vit_small_patch14_reg4_dinov2", dict(img_size=28, embed_dim=32, depth=2, num_heads=2),
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
    ),
}


def randomized(name: str) -> torch.nn.Module:
    """Non-trivial weights everywhere (zero biases would hide a wrong export)."""
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    model = randomized(request.param)
    out = export_timm_folder(model, tmp_path_factory.mktemp(request.param) / "encoder")
    return request.param, model, out


def test_folder_loads_with_only_the_new_head_missing(exported):
    name, model, out = exported
    state = safetensors.torch.load_file(out / "model.safetensors")
    assert set(state) == set(mae_timm.export_encoder(model))
    vit = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=10)
    result = vit.load_state_dict(state, strict=False)  # what timm's loader did, with the keys visible
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    assert vit.head.out_features == 10 and type(vit).__name__ == "VisionTransformer"


def test_folder_gives_the_encoder_features(exported):
    name, model, out = exported
    vit = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=10).eval()
    x = torch.randn(2, *resolve_data_config(model=vit)["input_size"])
    with torch.no_grad():
        features = vit.forward_features(x)
        if model.predicts_pixels:  # the contract: the pretext encoder's tokens (same ops for the pixel models)
            assert torch.equal(features, model.forward_features(x))
        else:  # APL's crop + linear map runs as a conv with a zero border: equal up to summation order
            torch.testing.assert_close(features, model.forward_features(x), atol=1e-4, rtol=1e-4)
        if name in ("late", "factory_dinov2_reg4"):  # the MAE encoder at mask ratio 0, patches kept in order
            noise = torch.arange(model.patch_embed.num_patches, dtype=torch.float).expand(2, -1)
            latent = model.forward_encoder(x, 0.0, noise)[0]
            torch.testing.assert_close(features, latent, atol=1e-5, rtol=1e-5)
        assert vit(x).shape == (2, 10)


def test_config_carries_preprocessing_and_pooling(exported):
    """What train.py reads: architecture, model_args (pooling included), mean/std, input size, crop, interpolation."""
    name, model, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == model.encoder_architecture() and config["num_classes"] == 0
    kwargs = mae_timm.encoder_kwargs(model)
    args = config["model_args"]  # the encoder's kwargs, plus what timm records of every model (in_chans, pool)
    assert all(args[k] == v for k, v in kwargs.items() if k != "img_size")
    assert args["global_pool"] == mae_timm.create_timm_encoder(model).global_pool
    cfg, pretext_cfg = config["pretrained_cfg"], model.pretrained_cfg
    assert cfg["mean"] == list(pretext_cfg["mean"]) and cfg["std"] == list(pretext_cfg["std"])
    assert cfg["input_size"] == [3, *model.patch_embed.img_size] and cfg["fixed_input_size"]
    assert cfg["crop_pct"] == pretext_cfg["crop_pct"] and cfg["interpolation"] == pretext_cfg["interpolation"]
    assert cfg["num_classes"] == 0 and "hf_hub_id" not in cfg and "tag" not in cfg
    vit = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=10)
    data = resolve_data_config(model=vit)  # the resolver train.py uses
    assert tuple(data["mean"]) == tuple(pretext_cfg["mean"]) and tuple(data["input_size"]) == tuple(cfg["input_size"])
    assert vit.global_pool == args["global_pool"]


def test_export_refuses_a_folder_with_other_files_and_replaces_an_earlier_export(tmp_path):
    model = randomized("late")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        export_timm_folder(model, busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    out = tmp_path / "encoder"
    export_timm_folder(randomized("early"), out)
    export_timm_folder(model, out)  # an earlier export is replaced
    assert json.loads((out / "config.json").read_text())["model_args"]["class_token"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "encoder"]  # no temp folders left


def test_failed_check_leaves_the_earlier_export(tmp_path, monkeypatch):
    out = export_timm_folder(randomized("late"), tmp_path / "encoder")
    before = (out / "model.safetensors").read_bytes()
    real = timm.create_model

    def corrupted(name, **kwargs):  # what a broken writer would hand to the user
        model = real(name, **kwargs)
        if str(name).startswith("local-dir:"):
            torch.nn.init.zeros_(model.blocks[0].mlp.fc2.weight)
        return model

    monkeypatch.setattr(timm, "create_model", corrupted)
    with pytest.raises(ValueError, match="export not written"):
        export_timm_folder(randomized("early"), out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]


def test_save_timm_folder_keeps_a_classifier_and_its_metrics(tmp_path):
    model = randomized("late")
    classifier = mae_timm.create_timm_encoder(model, num_classes=4, global_pool="avg", fc_norm=True)
    from mae_timm.engine.export import encoder_pretrained_cfg

    out = save_timm_folder(classifier, tmp_path / "ft", pretrained_cfg=encoder_pretrained_cfg(model, classifier),
                           metrics=dict(top1=50.0))
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 4 and config["mae_timm"]["metrics"] == {"top1": 50.0}
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), classifier.eval()(x)) and loaded.global_pool == "avg"


def test_export_command_prints_lines_that_work(tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("apl_vit_test")
    state = dict(model=model.state_dict(), model_name="apl_vit_test", model_kwargs={}, step=3, epoch=1,
                 optimizer={}, scheduler={}, scaler={}, rng={}, config={}, version=mae_timm.__version__)
    path = save_checkpoint(state, checkpoint_path(tmp_path / "run", 3))
    out = tmp_path / "encoder"
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(s.strip() for s in printed.splitlines() if s.strip().startswith("timm.create_model("))
    assert eval(line, {"timm": timm}).num_classes == 0
    assert f"python train.py --model local-dir:{out} --pretrained --num-classes N" in printed
    assert json.loads((out / "config.json").read_text())["mae_timm"]["source"]["step"] == 3


def test_finetune_saves_its_classifier_with_the_metrics(tmp_path):
    from mae_timm.engine.eval.finetune import FinetuneConfig, finetune_evaluate

    model = timm.create_model("mae_vit_test")
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator),
                torch.arange(8) % 4) for _ in range(2)]
    cfg = FinetuneConfig(epochs=1, warmup_epochs=0, batch_size=8, mixup=0, cutmix=0, save_dir=str(tmp_path / "ft"))
    result = finetune_evaluate(model, Batches(batches), batches, 4, cfg, "cpu", log=lambda line: None)
    out = tmp_path / "ft" / "last"
    assert result["saved"] == {"last": str(out)}
    config = json.loads((out / "config.json").read_text())
    assert config["mae_timm"]["metrics"]["top1"] == result["top1"] and config["num_classes"] == 4
    assert config["model_args"]["global_pool"] == "avg" and config["model_args"]["fc_norm"] is True
    classifier = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert classifier.head.out_features == 4 and classifier.pretrained_cfg["mean"] == list(model.pretrained_cfg["mean"])


def test_save_finetuned_writes_best_beside_last(tmp_path):
    from mae_timm.engine.export import save_finetuned

    model = randomized("early")
    classifier = mae_timm.create_timm_encoder(model, num_classes=3)
    best_state = {k: v.clone() for k, v in classifier.state_dict().items()}
    torch.nn.init.ones_(classifier.head.weight)  # training went on after the best epoch
    saved = save_finetuned(classifier, model, tmp_path / "ft", dict(top1=1.0), best=(best_state, dict(top1=2.0)))
    assert saved == {"last": str(tmp_path / "ft" / "last"), "best": str(tmp_path / "ft" / "best")}
    best = timm.create_model(f"local-dir:{saved['best']}", pretrained=True)
    assert torch.equal(best.head.weight, best_state["head.weight"])
    assert json.loads((tmp_path / "ft" / "best" / "config.json").read_text())["mae_timm"]["metrics"] == {"top1": 2.0}
