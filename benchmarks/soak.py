"""Soak: pretrain ``mae_vit_test`` for many epochs of a small shard set with loader workers, interrupted by random
SIGTERM / SIGKILL at random moments and resumed with ``--resume auto`` each time, then checked:

- resident memory (VmRSS) and open file descriptors of the training process, sampled at every epoch end of an
  uninterrupted run, are flat (least-squares slope per epoch);
- no worker process of any attempt outlives it, no ``.part`` file stays in the run folder, nothing stays in the
  private TMPDIR;
- the interrupted run ends with the bit-identical weights (and losses) of the uninterrupted one.

``python -m benchmarks.soak [--epochs 20 --cycles 4 --seed 0]`` prints and writes
``benchmarks/results/soak_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from fakes import make_shards  # noqa: E402  the tests' shard maker: class-coloured JPEGs

STEPS_PER_EPOCH = 4  # 32 train images / batch 8


def pretrain_command(shards: Path, out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "mae_timm.cli", "pretrain", "--model", "mae_vit_test", "--data", str(shards),
            "--batch-size", "8", "--epochs", str(epochs), "--warmup-epochs", "1", "--num-workers", "2",
            "--save-every-epochs", "1", "--save-every-steps", "0", "--keep-last", "2", "--device", "cpu",
            "--resume", "auto", "--no-progress", "--no-tensorboard", "--viz-every-epochs", "0", "--out", str(out)]


def tagged_pids(tag: str) -> list[int]:
    """Processes (trainer and loader workers) started with ``SOAK_TAG=tag`` that are still alive."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"SOAK_TAG={tag}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


def sample(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open file descriptors) of ``pid``."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index."""
    n = len(values)
    mx, my = (n - 1) / 2, sum(values) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


def attempt(command: list[str], env: dict, out: Path, stop: tuple[int, int, float] | None,
            samples: list | None) -> int:
    """Run once; with ``stop`` = (signal, n, seconds) interrupt it that long after its n-th new checkpoint appears;
    with ``samples`` record (epoch, rss, fds) at each new epoch checkpoint. Returns the exit code."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = {p.name for p in out.glob("checkpoint-*.pt")}
    stop = stop and (stop[0], len(seen) + stop[1], stop[2])  # counted from the checkpoints already there
    signalled = None
    while proc.poll() is None:
        new = {p.name for p in out.glob("checkpoint-*.pt")} - seen
        if new:
            seen |= new
            if samples is not None:
                try:
                    samples.append((max(int(n[11:18]) for n in new) // STEPS_PER_EPOCH, *sample(proc.pid)))
                except (OSError, StopIteration):
                    pass
            if stop is not None and signalled is None and len(seen) >= stop[1]:
                signalled = time.monotonic() + stop[2]
        if signalled is not None and time.monotonic() >= signalled:
            proc.send_signal(stop[0])
            signalled = float("inf")
        time.sleep(0.02)
    err = proc.stderr.read()
    if proc.returncode not in (0, -signal.SIGKILL):
        print(err[-3000:])
    return proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cycles", type=int, default=4, help="interruptions (SIGTERM or SIGKILL, drawn)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", default=str(REPO / "benchmarks/results/soak_cpu.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        shards = make_shards(work / "shards", num_classes=4, per_class=8, img_size=32)
        tmpdir = work / "tmp"
        tmpdir.mkdir()
        tag = uuid.uuid4().hex
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TMPDIR=str(tmpdir), SOAK_TAG=tag)

        reference, samples = work / "reference", []
        assert attempt(pretrain_command(shards, reference, args.epochs), env, reference, None, samples) == 0

        run, cycles = work / "run", []
        signals = [(signal.SIGTERM, signal.SIGKILL)[i % 2] for i in range(args.cycles)]
        rng.shuffle(signals)  # both kinds, in a drawn order
        for sig in signals:
            after, delay = rng.randint(1, 3), rng.uniform(0.0, 1.5)
            code = attempt(pretrain_command(shards, run, args.epochs), env, run, (sig, after, delay), None)
            cycles.append(dict(signal=signal.Signals(sig).name, after_checkpoints=after, delay_s=round(delay, 2),
                               exit_code=code,
                               step=torch.load(run / "last.pt", weights_only=True)["step"]
                               if (run / "last.pt").exists() else 0))
        assert attempt(pretrain_command(shards, run, args.epochs), env, run, None, None) == 0
        time.sleep(1.0)  # workers of the last attempt exit with it; give the kernel a moment to reap them

        final, ref = (torch.load(d / "last.pt", weights_only=True) for d in (run, reference))
        losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
                  for d in (run, reference)]
        epochs, rss, fds = zip(*samples)
        result = dict(
            epochs=args.epochs, cycles=cycles, seed=args.seed,
            weights_equal=final["model"].keys() == ref["model"].keys()
            and all(torch.equal(final["model"][k], ref["model"][k]) for k in ref["model"]),
            losses_equal=losses[0] == losses[1], steps=final["step"],
            rss_kib_first_last=[rss[0], rss[-1]], rss_slope_kib_per_epoch=round(slope(rss[1:]), 1),
            fds_first_last=[fds[0], fds[-1]], fds_slope_per_epoch=round(slope(fds[1:]), 3),
            epochs_sampled=len(epochs), leftover_processes=len(tagged_pids(tag)),
            leftover_part_files=len(list(run.glob("*.part")) + list(reference.glob("*.part"))),
            leftover_temp_files=len(list(tmpdir.iterdir())),
            seconds=round(time.monotonic() - start, 1),
        )
    print(json.dumps(result, indent=1))
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
