"""What the constructor refuses in the user's model kwargs is one line (UserError), never a traceback; a model
too large for the machine is refused before any weight is allocated; timm's loading kwargs work but are never
recorded in the checkpoint's model record."""

from __future__ import annotations

import resource
import time

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


def test_in_chans_below_one_is_refused_in_one_line(tmp_path):
    for field in ("model_kwargs", "encoder_kwargs"):
        overrides = {field: dict(in_chans=0)}
        if field == "encoder_kwargs":
            overrides.update(pretext="mae", encoder="vit_tiny_patch16_224", model_kwargs={})
        with pytest.raises(UserError, match=r"in_chans 0 of .* must be at least 1"):
            build_model(config(tmp_path, **overrides))


def test_an_encoder_without_pretext_is_pretrained_as_mae(tmp_path):
    tiny = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    model, record = build_model(config(tmp_path, encoder="vit_tiny_patch16_224", encoder_kwargs=tiny))
    assert record["model_name"] == "mae:vit_tiny_patch16_224" and record["pretext"] == "mae"
    assert model.embed_dim == 32 and len(model.blocks) == 1


@pytest.fixture
def address_space_limit():
    """Lower this process's soft address-space limit to 2 GiB above what it maps (as ``ulimit -v`` does)."""
    from mae_timm.engine.memory import _mapped_bytes

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + 2 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    yield limit
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_the_address_space_limit_bounds_the_memory_check(tmp_path, address_space_limit):
    # ~19 GiB to train: below many machines' memory, far above what the limit leaves
    cfg = config(tmp_path, img_size=32768, batch_size=1)
    with pytest.raises(UserError, match=r"at img_size 32768 needs at least .* address-space limit \(ulimit -v\)"):
        build_model(cfg)


def test_a_very_deep_model_is_sized_without_building_its_blocks(tmp_path):
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"needs at least .* GiB to train \(\d+ M weights\)"):
        build_model(config(tmp_path, model_kwargs=dict(depth=100_000, embed_dim=512, num_heads=8)))
    assert time.perf_counter() - start < 20  # building 100,000 blocks, even on the meta device, takes an hour
