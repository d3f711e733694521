"""Precision on the CPU: attention runs in fp32 under CPU autocast (forward and backward kernels), only inside the
autocast region; ``precision auto`` keeps fp32 without bf16 units and otherwise follows a timing probe whose choice
a resumed run reads back; the probe leaves the RNG as it was; a bf16 update trains like an fp32 one."""

from __future__ import annotations

import json
import os
import statistics

import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mae_timm.engine.train.execution as execution
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.distributed import DistInfo
from mae_timm.engine.train.model_setup import build_model
from mae_timm.engine.train.trainer import build_trainer
from mae_timm.utils import autocast, derive_seed, seed_everything

CPU = torch.device("cpu")
NO_UNITS = dict(capability="AVX2", amx_bf16=False, avx512_bf16=False)
AMX = dict(capability="AMX", amx_bf16=True, avx512_bf16=True)
# updates of the loss-curve comparison: 100 in the suite; MAE_TIMM_CURVE_UPDATES=500 for the full check (minutes)
CURVE_UPDATES = int(os.environ.get("MAE_TIMM_CURVE_UPDATES", "100"))


class AttentionKernels(TorchDispatchMode):
    """Records the dtype of the query each aten attention kernel (forward or backward) receives."""

    def __init__(self):
        super().__init__()
        self.dtypes: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if "scaled_dot_product" in name:
            self.dtypes.setdefault("backward" if "backward" in name else "forward", set()).add(args[1].dtype
                                                                                              if "backward" in name
                                                                                              else args[0].dtype)
        return func(*args, **(kwargs or {}))


def attention_dtypes(context) -> dict[str, set]:
    """The attention kernels' dtypes of one forward + backward of a tiny MAE inside ``context``."""
    torch.manual_seed(0)
    model = timm.create_model("mae_vit_test")
    with AttentionKernels() as kernels:
        with context:
            out = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)
        out.loss.backward()
    return kernels.dtypes


def test_attention_runs_in_fp32_under_cpu_bf16_autocast():
    assert attention_dtypes(autocast(CPU, torch.bfloat16)) == {"forward": {torch.float32},
                                                               "backward": {torch.float32}}
    # the same model under plain bf16 autocast gives the kernels bf16: the check above can see the difference
    assert attention_dtypes(autocast(CPU, torch.bfloat16, fp32_attention=False)) == {"forward": {torch.bfloat16},
                                                                                     "backward": {torch.bfloat16}}
    # nothing outside the region is changed: torch's own autocast still hands sdpa bf16
    with autocast(CPU, torch.bfloat16):
        pass
    assert attention_dtypes(torch.autocast("cpu", dtype=torch.bfloat16))["forward"] == {torch.bfloat16}


def test_fp32_attention_keeps_the_dtype_around_it_and_an_additive_mask():
    q = torch.randn(2, 2, 5, 8).bfloat16()
    mask = torch.randn(5, 5).bfloat16()
    with autocast(CPU, torch.bfloat16):
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        positional = F.scaled_dot_product_attention(q, q, q, mask)
    expected = F.scaled_dot_product_attention(q.float(), q.float(), q.float(), attn_mask=mask.float())
    assert out.dtype == torch.bfloat16 and torch.equal(out, positional)
    torch.testing.assert_close(out, expected.bfloat16())


def choose(monkeypatch, units, times=None, planned=1000, **kwargs):
    """``choose_precision('auto', cpu)`` on a CPU with ``units``; the probe returns ``times`` (None: must not run)."""
    calls = []

    def time_updates(dtypes, updates):
        assert times is not None, "the probe ran where it must not"
        calls.append(updates)
        return times

    monkeypatch.setattr(execution, "cpu_bf16_units", lambda: units)
    dtype, note = execution.choose_precision("auto", CPU, planned_updates=planned, time_updates=time_updates, **kwargs)
    return dtype, note, calls


def test_precision_auto_on_the_cpu(monkeypatch, tmp_path):
    dtype, note, _ = choose(monkeypatch, NO_UNITS)
    assert dtype is None and note.startswith("precision auto: fp32 (CPU AVX2, AMX-BF16 no, AVX512-BF16 no")
    assert choose(monkeypatch, AMX, planned=10)[0] is None  # a probe would cost more than the run can win
    # faster by the margin: bf16, with what was measured in the line and in the run folder
    key = dict(model="m", batch_size=8)
    dtype, note, calls = choose(monkeypatch, AMX, dict(fp32=[0.150, 0.140, 0.145], bf16=[0.100, 0.098, 0.110]),
                                run_dir=tmp_path, key=key)
    assert dtype is torch.bfloat16 and calls == [execution.PROBE_UPDATES]
    assert "fp32 145 ms, bf16 with fp32 attention 100 ms, 1.45x" in note
    assert json.loads((tmp_path / "precision.json").read_text())["choice"] == "bf16"
    # a resumed run with the same key reads the choice back without timing; another key probes again
    dtype, again, _ = choose(monkeypatch, AMX, None, run_dir=tmp_path, key=key)
    assert dtype is torch.bfloat16 and again.startswith(note) and "kept from" in again
    slower = dict(fp32=[0.1], bf16=[0.2])
    assert choose(monkeypatch, AMX, slower, run_dir=tmp_path, key=dict(key, batch_size=16))[0] is None
    # faster, but within the margin: fp32 (noise must never pick the slower one)
    assert choose(monkeypatch, AMX, dict(fp32=[0.100], bf16=[0.097]))[0] is None
    # set precisions and CUDA are not measured
    assert execution.choose_precision("bf16", CPU, planned_updates=1, time_updates=None)[0] is torch.bfloat16
    cuda = execution.choose_precision("auto", torch.device("cuda"), planned_updates=1, time_updates=None)
    assert cuda[0] is torch.bfloat16


def tiny_config(tmp_path, **overrides) -> PretrainConfig:
    settings = dict(model="mae_vit_test", batch_size=8, epochs=10, warmup_epochs=1, blr=1e-2, compile="off",
                    num_workers=0, out=str(tmp_path))
    return PretrainConfig(**dict(settings, **overrides))


def test_probe_times_real_updates_and_leaves_the_rng_alone(monkeypatch, tmp_path):
    """On a CPU said to have bf16 units, ``build_trainer`` times both precisions on copies of the model; the
    model's weights and the global RNG stream are what they were, and the choice is written to the run folder."""
    monkeypatch.setattr(execution, "cpu_bf16_units", lambda: AMX)
    seed_everything(0)
    cfg = tiny_config(tmp_path)
    model, _ = build_model(cfg)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    trainer = build_trainer(cfg, model, DistInfo(), lr=1e-3, updates_per_epoch=10, planned_updates=100,
                            run_dir=tmp_path)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    saved = json.loads((tmp_path / "precision.json").read_text())
    assert len(saved["seconds"]["fp32"]) == len(saved["seconds"]["bf16"]) == execution.PROBE_UPDATES
    assert trainer.notes[0] == saved["note"] and trainer.autocast_dtype == {"bf16": torch.bfloat16}.get(
        saved["choice"])


def smooth_images(count: int, size: int = 32) -> torch.Tensor:
    """uint8 (count, 3, size, size) images of smooth blobs: something an MAE can learn to fill in."""
    coarse = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    return (255 * F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(0, 1)).to(torch.uint8)


def loss_curve(tmp_path, precision: str, seed: int, updates: int) -> list[float]:
    """Losses of ``updates`` engine updates (``Trainer.step``) of mae_vit_test on 64 smooth images."""
    seed_everything(seed)
    cfg = tiny_config(tmp_path / f"{precision}{seed}", precision=precision, seed=seed)
    model, _ = build_model(cfg)
    trainer = build_trainer(cfg, model, DistInfo(), lr=2e-3, updates_per_epoch=max(updates // 10, 1))
    images = smooth_images(64)
    losses = []
    for update in range(updates):
        seed_everything(derive_seed(seed, 0, 0, update))
        batch = images[torch.randperm(len(images))[: cfg.batch_size]]
        losses.append(trainer.step(update, [batch])["loss"].item())
    return losses


def test_bf16_update_trains_like_fp32(tmp_path):
    """Over CURVE_UPDATES updates, every fifth of the run's mean loss in bf16 (attention in fp32) is as close to fp32
    with the same seed as two fp32 seeds are to each other, and both learn."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        curves = [loss_curve(tmp_path, p, s, CURVE_UPDATES) for p, s in (("fp32", 0), ("bf16", 0), ("fp32", 1))]
    finally:
        torch.set_num_threads(threads)
    width = CURVE_UPDATES // 5
    fp32, bf16, other_seed = ([statistics.mean(c[i:i + width]) for i in range(0, 5 * width, width)] for c in curves)
    seed_spread = max(abs(a - b) for a, b in zip(fp32, other_seed))
    gaps = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert max(gaps) <= seed_spread, (gaps, seed_spread)
    assert bf16[-1] < 0.9 * bf16[0] and fp32[-1] < 0.9 * fp32[0], (bf16, fp32)


def test_inference_autocast_follows_the_bf16_units(monkeypatch):
    import mae_timm.utils.device as device_module

    linear = torch.nn.Linear(8, 8)
    monkeypatch.setattr(device_module, "cpu_bf16_units", lambda: NO_UNITS)
    with device_module.inference_autocast(CPU):
        assert linear(torch.randn(2, 8)).dtype == torch.float32
    monkeypatch.setattr(device_module, "cpu_bf16_units", lambda: AMX)
    assert attention_dtypes(device_module.inference_autocast(CPU))["forward"] == {torch.float32}
    with device_module.inference_autocast(CPU):
        assert linear(torch.randn(2, 8)).dtype == torch.bfloat16
