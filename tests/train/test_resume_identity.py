"""A resume continues the same run: another seed or other images of the same size are refused (one line) unless
``--force-resume`` says so."""

from __future__ import annotations

import pytest
from fakes import make_shards, tiny_pretrain_config

from mae_timm.engine.checkpoint import load_checkpoint
from mae_timm.engine.train.pretrain import pretrain
from mae_timm.utils import UserError

config = tiny_pretrain_config


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    return make_shards(root / "a", seed=0), make_shards(root / "b", seed=1)


def test_resume_with_another_seed_or_other_data_is_refused(two_datasets, tmp_path):
    a, b = two_datasets
    run = tmp_path / "run"
    first = pretrain(config(run, a))
    assert load_checkpoint(first.checkpoint)["data_identity"].startswith("sha256:")
    with pytest.raises(UserError, match=r"seed 0 \(now 1\).*--force-resume"):
        pretrain(config(run, a, seed=1, max_steps=3, resume="auto"))
    with pytest.raises(UserError, match=r"data sha256:\w+ \(now sha256:\w+\)"):
        pretrain(config(run, b, max_steps=3, resume="auto"))
    assert pretrain(config(run, b, max_steps=3, resume="auto", force_resume=True)).step == 3
    # the forced checkpoint now records b: going on with b needs no flag
    assert pretrain(config(run, b, max_steps=4, resume="auto")).step == 4
