"""What the constructor refuses in the user's model kwargs is one line (UserError), never a traceback; a model
too large for the machine is refused before any weight is allocated; timm's loading kwargs work but are never
recorded in the checkpoint's model record."""

from __future__ import annotations

import pytest
import torch
from fakes import tiny_pretrain_config

from mae_timm.engine.train.model_setup import build_model
from mae_timm.utils import UserError


def config(tmp_path, **overrides):
    return tiny_pretrain_config(tmp_path / "run", None, synthetic=True, **overrides)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(depth=-1), r"kwargs \{\"depth\": -1\}: RuntimeError"),
        (dict(embed_dim=0), r"kwargs \{\"embed_dim\": 0\}: ZeroDivisionError"),
        (dict(patch_size=0), r"kwargs \{\"patch_size\": 0\}: ZeroDivisionError"),
        (dict(num_heads=5), r"num_heads.*AssertionError: dim should be divisible by num_heads"),
        (dict(pretrained=True), r"RuntimeError: No pretrained weights exist for mae_vit_test"),
        (dict(checkpoint_path="/nonexistent.pth"), r"/nonexistent.pth.*FileNotFoundError: a file it names does not"),
        (dict(decoder_depth=-1), r"decoder_depth -1 of mae_vit_test must be at least 0"),
        (dict(pretrained_cfg_overlay=dict(mean="abc")), r"pretrained_cfg mean abc must be finite numbers"),
        (dict(pretrained_cfg_overlay=dict(std=[0.0, 1, 1])), r"pretrained_cfg std .* above 0"),
    ],
)
def test_model_kwargs_the_constructor_refuses_are_one_line(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message) as info:
        build_model(config(tmp_path, model_kwargs=kwargs))
    assert "\n" not in str(info.value)


def test_a_long_kwargs_mapping_is_cut_in_the_message(tmp_path):
    kwargs = dict(depth=-1, pretrained_cfg_overlay=dict(label_names=[f"class_{i}" for i in range(1000)]))
    with pytest.raises(UserError) as info:
        build_model(config(tmp_path, model_kwargs=kwargs))
    assert len(str(info.value)) < 400


def test_a_model_larger_than_the_machine_is_refused_before_allocating(tmp_path):
    with pytest.raises(UserError, match=r"at img_size 160000 needs at least \d+\.\d GiB .* more than the"):
        build_model(config(tmp_path, model="mae_vit_base_patch16", img_size=160000))


def test_checkpoint_path_loads_its_weights_and_stays_out_of_the_record(tmp_path):
    source, _ = build_model(config(tmp_path, seed=1))
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model, record = build_model(config(tmp_path, model_kwargs=dict(checkpoint_path=str(path))))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    assert "checkpoint_path" not in record["model_kwargs"]
