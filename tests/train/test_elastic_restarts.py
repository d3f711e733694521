"""Runs that heal themselves under ``torchrun --max-restarts``: a rank killed after a checkpoint makes the group
restart and resume (``--resume auto``) to the weights and losses of a run never interrupted; a rank that stops
answering ends the group with one line within ``--dist-timeout`` (plus torchrun's grace for stopping the others).
``python -m benchmarks.elastic_restarts --tries 20 [--nodes 2]`` repeats the kill case."""

from __future__ import annotations

import os
import signal

import pytest

from benchmarks.elastic_restarts import run_with_signal, same_run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic") / "reference"
    result = run_with_signal(out, sig=None)
    assert result["codes"] == [0], result["output"][-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, pytest.param(2, marks=pytest.mark.skipif(
    not os.environ.get("MAE_TIMM_TWO_NODES"), reason="set MAE_TIMM_TWO_NODES=1 (about a minute on 2 cores)"))])
def test_a_killed_rank_restarts_the_group_and_resumes_exactly(reference, tmp_path, nodes):
    out = tmp_path / "run"
    result = run_with_signal(out, sig=signal.SIGKILL, nodes=nodes, after_step=4)
    assert result["codes"] == [0] * nodes, result["output"][-3000:]
    assert "resumed from" in result["output"] and "at step " in result["output"]
    assert same_run(out, reference)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MAE_TIMM_STOPPED_RANK"), reason="set MAE_TIMM_STOPPED_RANK=1 (about 75 s: "
                    "most of it torchrun's 30 s grace before it kills the stopped rank)")
def test_a_stopped_rank_ends_the_group_with_one_line_within_the_timeout(tmp_path):
    result = run_with_signal(tmp_path / "run", sig=signal.SIGSTOP, max_restarts=0, dist_timeout=5, after_step=2,
                             timeout=120)
    assert result["codes"] == [1], result["output"][-3000:]
    assert "another rank stopped answering within --dist-timeout 5 s" in result["output"]
    assert result["after_signal"] < 5 + 30 + 20  # the timeout, torchrun's 30 s grace for the stopped rank, slack


def test_a_group_that_cannot_form_is_one_line_within_the_timeout(monkeypatch):
    import time

    import torch.distributed as dist

    from benchmarks.elastic_restarts import free_port
    from mae_timm.engine.train.distributed import init_distributed
    from mae_timm.utils import DistributedError

    port = free_port()  # nobody serves the store there: rank 1 waits for rank 0, which never comes
    for key, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    start = time.perf_counter()
    with pytest.raises(DistributedError, match=r"rank 1 of 2: the process group did not form within 2 s") as info:
        init_distributed("cpu", timeout_s=2)
    assert time.perf_counter() - start < 30 and "\n" not in str(info.value) and not dist.is_initialized()


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_dist_timeout_must_be_above_0(value, tmp_path, capsys):
    from mae_timm import cli

    assert cli.main(["pretrain", "--model", "mae_vit_test", "--synthetic", "--dist-timeout", value,
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "dist_timeout" in err and "\n" not in err
