"""Settings files and values that used to be read silently (or exhaust memory) are refused in one line."""

from __future__ import annotations

import pytest

from mae_timm.engine.train.config import PretrainConfig
from mae_timm.utils import UserError
from mae_timm.utils.settings import load_config


@pytest.mark.parametrize("text, message", [
    ("batch_size: 4\nbatch_size: 8\n", r"the key 'batch_size' is given twice, at line 2"),
    ("a: &a [1, 1, 1, 1]\nb: &b [*a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n", r"aliases \(\*a\) are not read"),
    ("batch_size: true\n", r"setting 'batch_size': cannot read True as int"),
    ("mask_ratio: .nan\n", r"setting 'mask_ratio': cannot read nan as float"),
    ("blr: .inf\n", r"setting 'blr': cannot read inf as float"),
    ("synthetic_samples: 100000000000000000000\n", r"setting 'synthetic_samples': cannot read 1000+ as int"),
])
def test_hostile_yaml_is_refused_in_one_line(text, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        load_config(PretrainConfig, path)
    assert "\n" not in str(e.value)


def test_mask_ratio_zero_is_refused():  # it trained to a loss of exactly 0
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):  # (0, 1): something masked, something kept
        with pytest.raises(UserError, match=r"mask_ratio \(--mask-ratio\) is .*; it must be in \(0, 1\)"):
            PretrainConfig(mask_ratio=bad)


def test_command_line_nan_is_refused():
    with pytest.raises(UserError, match="cannot read 'nan' as float"):
        load_config(PretrainConfig, None, {"mask_ratio": "nan"})


def test_integers_beyond_int64_are_refused():  # 1e20 synthetic samples: an OverflowError deep in torch
    with pytest.raises(UserError, match="cannot read '100000000000000000000' as int"):
        load_config(PretrainConfig, None, {"synthetic_samples": str(10**20)})
    assert load_config(PretrainConfig, None, {"synthetic_samples": str(2**40)}).synthetic_samples == 2**40


@pytest.mark.parametrize("name", ["fashion_mnist_late", "fashion_mnist_late.yaml", "configs/fashion_mnist_late.yaml"])
def test_shipped_configs_resolve_by_name_from_any_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository
    cfg = load_config(PretrainConfig, name)
    assert cfg.model == "mae_vit_tiny_patch8_64" and cfg.model_kwargs["in_chans"] == 1


def test_an_unknown_config_names_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nor is it a shipped config .*fashion_mnist_late"):
        load_config(PretrainConfig, "no_such_config")


@pytest.mark.parametrize("name", ["meta", "mps", "xpu"])
def test_unsupported_devices_are_refused_before_work(name):
    from mae_timm.utils.device import resolve_device

    with pytest.raises(UserError, match=f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N"):
        resolve_device(name)
