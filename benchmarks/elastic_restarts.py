"""Elastic restarts under ``torchrun --max-restarts``: kill (SIGKILL) or stop (SIGSTOP) one rank of a 2-rank gloo
pretraining run on the CPU after a checkpoint, and check how the group ends.

A killed rank: torchrun restarts the group, ``--resume auto`` continues from the newest checkpoint, and the run
ends with the weights and losses of a run never interrupted. A stopped rank: the other rank's next collective
times out after ``--dist-timeout`` and the group ends with a one-line error. The tests in
``tests/train/test_elastic_restarts.py`` run each case once; this script repeats the kill case to show no
attempt hangs or fails to form its group::

    python -m benchmarks.elastic_restarts --tries 20 [--nodes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
# 32 images per rank / 4 = 8 updates per epoch, 16 in all, a checkpoint every 2
PRETRAIN = ["-m", "mae_timm.cli", "pretrain", "--model", "mae_vit_test", "--synthetic", "--synthetic-samples", "32",
            "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "0", "--save-every-steps", "2",
            "--num-workers", "0", "--device", "cpu", "--resume", "auto", "--no-progress", "--no-tensorboard",
            "--viz-every-epochs", "0"]
TOTAL_STEPS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *, nodes: int = 1, max_restarts: int = 1, dist_timeout: float = 60) -> tuple[list, str]:
    """Start the run (one torchrun per node, 2 ranks in all) -> (the torchrun processes, the tag in their env)."""
    tag, port = uuid.uuid4().hex, free_port()
    run = [*PRETRAIN, "--dist-timeout", str(dist_timeout), "--out", str(out)]
    if nodes == 1:  # torchrun's default (static) rendezvous, as a plain `torchrun --nproc-per-node 2` starts it
        launchers = [["--nproc-per-node", "2", "--master-port", str(port)]]
    else:  # two 1-rank nodes on this machine meeting at one c10d rendezvous
        launchers = [["--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", tag] for r in range(2)]
    env = dict(ENV, MAE_TIMM_ELASTIC_TAG=tag)
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--max-restarts", str(max_restarts),
                               *options, *run], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for options in launchers]
    return procs, tag


def worker_pid(tag: str, rank: int) -> int | None:
    """The pid of the training process of ``rank`` in the launch tagged ``tag`` (torchrun sets RANK in workers only)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if env.get("MAE_TIMM_ELASTIC_TAG") == tag and env.get("RANK") == str(rank):
            return int(entry.name)
    return None


def wait_for_checkpoint(out: Path, step: int, procs: list, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (out / f"checkpoint-{step:07d}.pt").exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"no checkpoint {step} in {out} within {timeout:g} s")
        time.sleep(0.05)


def finish(procs: list, timeout: float) -> tuple[list[int | None], str]:
    """Wait for every launcher -> (exit codes, None for one still running at the deadline, and their output);
    launchers still running are killed with their workers."""
    deadline, outputs = time.monotonic() + timeout, []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outputs.append(p.communicate()[0])
            p.returncode = None
    return [p.returncode for p in procs], "\n".join(outputs)


def kill_workers(tag: str) -> None:
    """SIGKILL whatever is left of a launch (a stopped rank the test left behind)."""
    for rank in (0, 1):
        pid = worker_pid(tag, rank)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def final_state(out: Path) -> tuple[dict, list]:
    ckpt = torch.load(out / "last.pt", weights_only=True)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ckpt, losses


def run_with_signal(out: Path, *, sig: int | None, nodes: int = 1, after_step: int = 4, max_restarts: int = 1,
                    dist_timeout: float = 60, timeout: float = 240) -> dict:
    """Start the run, send ``sig`` to rank 1 once checkpoint ``after_step`` exists, wait -> what happened."""
    start = time.monotonic()
    procs, tag = launch(out, nodes=nodes, max_restarts=max_restarts, dist_timeout=dist_timeout)
    signalled_at = None
    try:
        if sig is not None:
            wait_for_checkpoint(out, after_step, procs, timeout)
            pid = worker_pid(tag, 1)
            os.kill(pid, sig)
            signalled_at = time.monotonic()
        codes, output = finish(procs, timeout)
    finally:
        kill_workers(tag)
        for p in procs:
            p.kill()
    ended = time.monotonic()
    return dict(codes=codes, output=output, seconds=ended - start,
                after_signal=None if signalled_at is None else ended - signalled_at)


def same_run(out: Path, reference: Path) -> bool:
    """Bit-equal final weights and equal per-update losses."""
    (ckpt, losses), (ref, ref_losses) = final_state(out), final_state(reference)
    same_weights = ckpt["model"].keys() == ref["model"].keys() and all(
        torch.equal(ckpt["model"][k], ref["model"][k]) for k in ref["model"])
    return ckpt["step"] == ref["step"] == TOTAL_STEPS and same_weights and losses == ref_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--nodes", type=int, choices=(1, 2), default=1)
    parser.add_argument("--work", default="/tmp/elastic_restarts")
    args = parser.parse_args()
    work = Path(args.work) / uuid.uuid4().hex[:8]
    reference = work / "reference"
    done = run_with_signal(reference, sig=None, nodes=args.nodes)
    assert done["codes"] == [0] * len(done["codes"]), done["output"][-3000:]
    tally = dict(healed=0, failed=0, hung=0)
    for i in range(args.tries):
        out = work / f"try{i}"
        result = run_with_signal(out, sig=signal.SIGKILL, nodes=args.nodes, after_step=2 + 2 * (i % 3))
        if None in result["codes"]:
            outcome = "hung"
        elif result["codes"] == [0] * len(result["codes"]) and same_run(out, reference):
            outcome = "healed"
        else:
            outcome = "failed"
            print(result["output"][-3000:])
        tally[outcome] += 1
        print(f"try {i + 1}/{args.tries}: {outcome} in {result['seconds']:.1f} s", flush=True)
    print(json.dumps(dict(tally, tries=args.tries, nodes=args.nodes)))


if __name__ == "__main__":
    main()
