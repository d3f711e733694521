"""The training step on CPU: the compile setting, one graph without breaks, no recompiles across updates, mask draws
and accumulation, compiled losses equal to eager ones, and update statistics read one update late (no host sync).

The compiled tests use the ``aot_eager`` backend: dynamo's graph and AOTAutograd's forward + backward graphs, run by
eager kernels. Inductor would add minutes of C++ compiling per test on a busy CPU; the graphs it gets are these.
"""

from __future__ import annotations

import copy
import json
import sys
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import mae_timm.engine.train.execution as execution
import mae_timm.engine.train.pretrain as pretrain_module
import mae_timm.engine.train.trainer as trainer_module
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.execution import choose_compile
from mae_timm.engine.train.stats import PendingStats
from mae_timm.engine.train.trainer import COMPILE_MODES, compile_model
from mae_timm.utils.settings import load_config

MODELS = ["mae_vit_test", "mae_vit_test_early_mask"]  # late mask (gather + restore) and early mask (mask tokens)
ACCUMULATION = (2, 2, 1)  # micro-batches per update: the last update accumulates fewer (the loss divisor changes)


@pytest.fixture(autouse=True)
def one_thread_fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def synthetic_config(out, **overrides) -> PretrainConfig:
    """mae_vit_test on synthetic images: 20 per epoch in batches of 4 (the 5th batch is left over), 2 per update."""
    settings = dict(model="mae_vit_test", synthetic=True, synthetic_samples=20, batch_size=4, accum_steps=2,
                    epochs=2, warmup_epochs=1, blr=0.1, save_every_steps=0, viz_every_epochs=0, tensorboard=False,
                    progress=False, out=str(out))
    return PretrainConfig(**dict(settings, **overrides))


def logged_losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_compile_setting(tmp_path):
    """The setting is checked once, by PretrainConfig: YAML booleans read as default / off, anything else refused."""
    cuda = torch.device("cuda", 0)
    assert PretrainConfig().compile == "auto"
    assert all(PretrainConfig(compile=mode).compile == mode for mode in COMPILE_MODES)
    assert PretrainConfig(compile=True).compile == "default" and PretrainConfig(compile=False).compile == "off"
    (tmp_path / "bool.yaml").write_text("compile: true\n")
    assert load_config(PretrainConfig, tmp_path / "bool.yaml").compile == "default"
    assert load_config(PretrainConfig, overrides={"compile": "False"}).compile == "off"
    with pytest.raises(ValueError, match=r"^compile 'fast' is unknown; choose auto, off, default, max-autotune, "
                                         r"reduce-overhead \(or true / false\)$"):
        PretrainConfig(compile="fast")
    assert choose_compile("auto", cuda, planned_updates=10, eager_seconds=None)[0] == "default"
    assert all(choose_compile(mode, cuda, planned_updates=10, eager_seconds=None)[0] == mode for mode in COMPILE_MODES)


def test_compile_auto_on_the_cpu_pays_back_within_the_plan():
    """Compile when the measured compile time is below the measured gain x eager update x planned updates."""
    cpu = torch.device("cpu")
    assert choose_compile("auto", cpu, planned_updates=10, eager_seconds=None)[0] == "off"  # not even timed
    pays = execution.COMPILE_SECONDS / execution.COMPILE_GAIN  # update-seconds
    mode, note = choose_compile("auto", cpu, planned_updates=1000, eager_seconds=lambda: 1.1 * pays / 1000)
    assert mode == "default" and note.startswith("compile auto: default (eager update")
    assert choose_compile("auto", cpu, planned_updates=1000, eager_seconds=lambda: 0.9 * pays / 1000)[0] == "off"


def images(draw: int) -> torch.Tensor:
    """A normalised-looking batch (4, 3, 32, 32), a function of ``draw``."""
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(draw))


def run_updates(model: torch.nn.Module, forward) -> tuple[list[float], list[torch.Tensor]]:
    """AdamW updates of ``ACCUMULATION`` micro-batches, masks drawn from the reseeded global generator, as the
    engine does -> (loss of every micro-batch, its mask)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, masks = [], []
    for update, micro_batches in enumerate(ACCUMULATION):
        torch.manual_seed(update)
        for i in range(micro_batches):
            out = forward(images(10 * update + i), mask_ratio=0.75)
            (out.loss / micro_batches).backward()
            losses.append(out.loss.item())
            masks.append(out.mask)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, masks


@pytest.mark.parametrize("name", MODELS)
def test_compiled_step_one_graph_no_recompiles_equals_eager(name):
    model = timm.create_model(name, norm_pix_loss=True)
    explanation = torch._dynamo.explain(model)(images(0), mask_ratio=0.75)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch._dynamo.reset()

    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = compile_model(model, "default", backend=counter)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a second compile of the frame raises
        losses, masks = run_updates(model, compiled)
    assert counter.frame_count == 1  # one graph: forward (and, by AOTAutograd, backward) for every micro-batch
    assert len({tuple(m.flatten().tolist()) for m in masks}) == len(masks)  # a new mask draw every call
    expected, expected_masks = run_updates(eager, eager)
    assert all(torch.equal(a, b) for a, b in zip(masks, expected_masks, strict=True))
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)


def test_pretrain_compiled_equals_eager_without_recompiles(tmp_path, monkeypatch):
    """The engine's own loop: accumulation, a leftover batch per epoch, two epochs, with and without compile."""
    pretrain_module.pretrain(synthetic_config(tmp_path / "eager", compile="off"))
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(trainer_module, "compile_model", partial(compile_model, backend=counter))
    with torch._dynamo.config.patch(error_on_recompile=True):
        result = pretrain_module.pretrain(synthetic_config(tmp_path / "compiled", compile="default"))
    assert result.step == 4 and counter.frame_count == 1
    expected = logged_losses(tmp_path / "eager")
    torch.testing.assert_close(logged_losses(tmp_path / "compiled"), expected, rtol=1e-5, atol=1e-6)


def test_update_statistics_are_read_one_update_late(tmp_path, monkeypatch):
    """Update k's loss is read after update k + 1's forward passes were queued, except where a checkpoint is due
    (update 3, every 3 updates; 4, the last), and mae_timm calls no ``.item()`` (the grad norm stays a tensor)."""
    events = []
    build = pretrain_module.build_model

    item = torch.Tensor.item

    def no_item_in_mae_timm(self):  # torch.optim's CPU step counters may; mae_timm's loop must not wait on a value
        caller = Path(sys._getframe(1).f_code.co_filename)
        # saving a checkpoint copies the weights to the host, a wait anyway: its finiteness check may read a value
        if caller.name != "checkpoint.py":
            assert Path(pretrain_module.__file__).parents[2] not in caller.parents, f".item() in {caller}"
        return item(self)

    def build_and_record(*args):
        model, kwargs = build(*args)
        model.register_forward_pre_hook(lambda module, inputs: events.append("forward"))
        monkeypatch.setattr(torch.Tensor, "item", no_item_in_mae_timm)
        return model, kwargs

    read = PendingStats.read

    def record_read(self):
        events.append(f"read {self.step}")
        return read(self)

    monkeypatch.setattr(pretrain_module, "build_model", build_and_record)
    monkeypatch.setattr(PendingStats, "read", record_read)
    pretrain_module.pretrain(synthetic_config(tmp_path, save_every_steps=3, save_every_epochs=2, clip_grad=1.0,
                                              compile="off"))
    assert events == ["forward", "forward",  # update 1
                      "forward", "forward", "read 1",  # update 2, then 1's statistics
                      "forward", "forward", "read 2", "read 3",  # update 3; checkpoint 3 reads its own first
                      "forward", "forward", "read 4"]  # update 4, the last: read at the end


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_pretrain_compiled_on_cuda(mode, tmp_path):
    """On a GPU (TORCH_DEVICE=cuda): inductor in ``mode`` trains with accumulation as one graph, never recompiled."""
    counters["stats"].clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        result = pretrain_module.pretrain(synthetic_config(tmp_path, compile=mode, device="cuda"))
    assert result.step == 4 and counters["stats"]["unique_graphs"] == 1
    assert all(torch.isfinite(torch.tensor(logged_losses(tmp_path))))
