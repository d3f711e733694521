"""A checkpoint that cannot continue a run is refused in one line before any update: keys a resume reads are
missing, its step is not a count, or its weights or AdamW moments hold NaN (the first update would be NaN, and the
error would blame it)."""

from __future__ import annotations

import pytest
import torch
from fakes import tiny_pretrain_config

from mae_timm.engine.train.pretrain import pretrain
from mae_timm.utils import UserError


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("refusals") / "run"
    result = pretrain(tiny_pretrain_config(run, None, synthetic=True))
    return torch.load(result.checkpoint, weights_only=False)


def _nan_moment(ckpt):
    next(iter(ckpt["optimizer"]["state"].values()))["exp_avg"].fill_(float("nan"))


def _nan_weight(ckpt):
    name = next(name for name, value in ckpt["model"].items() if value.is_floating_point())
    ckpt["model"][name] = torch.full_like(ckpt["model"][name], float("nan"))  # a copy: the fixture stays whole


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("data_position"), r"cannot be resumed: it lacks data_position"),
        (lambda c: c.pop("rng"), r"cannot be resumed: it lacks rng"),
        (lambda c: c.pop("optimizer"), r"cannot be resumed: it lacks optimizer"),
        (lambda c: c.update(step="abc"), r"its step 'abc' is not a count of updates"),
        (lambda c: c["data_position"].pop("updates_per_epoch"), r"cannot be resumed: it lacks data_position"),
        (_nan_moment, r"NaN or inf \(optimizer moment exp_avg of parameter 0\); it cannot be resumed"),
        (_nan_weight, r"NaN or inf \(cls_token\); it cannot be resumed"),
        (lambda c: c["optimizer"].update(param_groups=[]), r"scaler or rng state does not fit this run"),
    ],
)
def test_a_checkpoint_that_cannot_continue_is_refused_in_one_line(finished_run, tmp_path, edit, message):
    ckpt = {k: (dict(v) if isinstance(v, dict) else v) for k, v in finished_run.items()}
    ckpt["optimizer"] = dict(finished_run["optimizer"], state={
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in finished_run["optimizer"]["state"].items()})
    edit(ckpt)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ckpt, run / "checkpoint-0000002.pt")
    with pytest.raises(UserError, match=message) as info:
        pretrain(tiny_pretrain_config(run, None, synthetic=True, max_steps=3, resume="auto"))
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-0000002.pt", "run.lock"]  # nothing written
