"""Every GPU figure in one command that fits one lent GPU call, headline first, written to one folder.

    python -m benchmarks.gpu_suite --official-dir .official-mae --out $OUT    # H100 / H200: ends within 540 s
    python -m benchmarks.gpu_suite --smoke --official-dir tests/bench/official_mae --out /tmp/suite   # CPU

Order (what the speed goal rests on first):

1. ``environment`` (GPU, driver, CUDA, versions, ``/dev/shm``, CPU count), written before anything runs, then
   ``peaks``: the bf16 matmul peak timed for >= 1 s and the datasheet peak (MFU denominators).
2. ``headline``: ViT-B/16 @224 (batch 256) and ViT-T/8 @64 (batch 1024), mae_timm vs the official MAE code
   (``--official-dir``) vs HF ViTMAE (sdpa): eager (inference and training step), then ``torch.compile`` (training
   step), then CUDA graphs (``mode="reduce-overhead"``, mae_timm only: no peer has a row in that mode).
3. ``early mask``: the early-mask tiny model (no peer has it), eager and compiled.
4. ``end to end``: compiled pretraining of ViT-T/8 @64 from shards vs a device-resident batch
   (``benchmarks.end_to_end``).
5. ``loader``: the shard loader per decoder and worker count beside ImageFolder (``benchmarks.loader``).

Every row checks the budget before it starts: its cost is estimated conservatively (compilation included; once a
compiled row has run, from the compile times it measured) and a row that would not fit is skipped with the reason
written. A watchdog ends the command at ``--budget`` seconds whatever happens (a row overrunning its estimate),
after writing the report. A row that fails is recorded with its error and the suite goes on. In one row the
implementations take their timed steps interleaved (``throughput.measure_group``); ratios are only taken between
rows of the same config and mode, and one whose peer row is missing is written as missing. ``gpu_suite.md`` and
``gpu_suite.json`` are rewritten in ``--out`` after every row, so a run cut short still returns what it measured.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks import end_to_end, loader, throughput
from benchmarks.common import datasheet_peak_tflops, environment, markdown_table, write_results
from benchmarks.official_mae import load_official_mae
from benchmarks.throughput_report import render

SECTIONS = ("peaks", "headline", "early mask", "end to end", "loader")
PEERS = ("mae_timm", "official", "hf")


@dataclass
class SuiteSettings:
    budget_s: float = 540.0  # the command ends by then (watchdog); no row starts that would not fit
    headline: tuple[str, ...] = ("vit_b16_224", "vit_t8_64")  # throughput configs of the headline
    early_mask: tuple[str, ...] = ("vit_t8_64_early_mask",)  # configs of the early-mask section (mae_timm only)
    configs: dict = field(default_factory=lambda: throughput.CONFIGS)  # key -> throughput.BenchConfig
    compiled_modes: tuple[str, ...] = ("compile", "reduce-overhead")  # after eager; peers: "compile" only
    compiled_implementations: tuple[str, ...] = PEERS  # who runs the "compile" headline rows
    throughput: throughput.BenchSettings = field(default_factory=lambda: throughput.BenchSettings(steps=30, warmup=5))
    end_to_end: end_to_end.EndToEndBench | None = None  # None: no end-to-end section
    loader: loader.LoaderBench | None = None  # None: no loader section
    step_s: dict = field(default_factory=dict)  # config key -> conservative seconds of one training step
    compile_s: float = 90.0  # conservative seconds to compile one model's graph before any compile was measured
    build_s: float = 10.0  # seconds to build one model, count its FLOPs and release it
    end_to_end_s: float = 40.0  # seconds of one end-to-end run beside its compilation (worker start, steps)
    loader_epoch_s: float = 6.0  # seconds of one loader epoch (worker start included)


FULL = SuiteSettings(
    end_to_end=end_to_end.EndToEndBench(images=40_000, warmup=15, steps=40, compile=True,
                                        arms=("synthetic", "shards", "shards-device"), rounds=1),
    loader=loader.LoaderBench(images=24_000, shard_size=1000, workers=(4, 14), decoders=("torchvision", "device"),
                              baselines=("decode only",), repeats=2, device="cuda"),
    # twice the peers' H100 figures of ../shared/gpu/README.md (official eager: 3215 and 27185 img/s)
    step_s={"vit_b16_224": 0.16, "vit_t8_64": 0.08, "vit_t8_64_early_mask": 0.08},
)
SMOKE = SuiteSettings(
    budget_s=540.0,
    headline=("test",),
    early_mask=("test_early_mask",),
    configs=throughput.TINY_CONFIGS,
    compiled_modes=("compile",),  # inductor on mae_vit_test (a busy CPU compiles one model in 30-70 s) ...
    compiled_implementations=("mae_timm",),  # ... so mae_timm only
    throughput=replace(throughput.TINY_SETTINGS, steps=2, warmup=1, rounds=2),
    end_to_end=replace(end_to_end.TINY, arms=("synthetic", "shards"), rounds=1),
    loader=loader.LoaderBench(images=64, classes=2, img_size=32, batch_size=16, shard_size=16, workers=(1,),
                              decoders=("torchvision", "device"), baselines=("decode only",), repeats=1),
    step_s={"test": 0.05, "test_early_mask": 0.05},
    compile_s=120.0,
    build_s=2.0,
    end_to_end_s=10.0,
    loader_epoch_s=3.0,
)


@dataclass
class Row:
    section: str
    name: str
    estimate: Callable[[], float]  # conservative seconds, asked just before the row would start
    run: Callable[[], object]  # the row's result (JSON-able)


class Report:
    """The suite's results, rewritten to ``out/gpu_suite.{md,json}`` (``common.write_results``) on every change;
    a lock keeps the watchdog thread and the rows from writing at once."""

    def __init__(self, out: Path, env: dict, settings: SuiteSettings):
        self.out, self.env, self.settings = out, env, settings
        self.rows: list[dict] = []
        self.peaks: dict = {}
        self.watchdog: str | None = None
        self.lock = threading.RLock()

    def add(self, entry: dict) -> None:
        with self.lock:
            self.rows.append(entry)
            self.save()

    def save(self) -> None:
        with self.lock:
            results = {"settings": _jsonable(asdict(self.settings)), "peaks": self.peaks, "rows": self.rows,
                       "failed": self.failed(), "watchdog": self.watchdog}
            write_results(self.out, "gpu_suite", self.env, results, self.markdown())

    def throughput_rows(self, section: str | None = None) -> list[dict]:
        return [r for e in self.rows if e["status"] == "ok" and isinstance(e["result"], list)
                and (section is None or e["section"] == section) for r in e["result"]]

    def failed(self) -> list[str]:
        out = [f"{e['name']}: {e['error']}" for e in self.rows if e["status"] == "failed"]
        return out + [f"{r['config']} {r['implementation']} {r['mode']}: {r['error']}"
                      for r in self.throughput_rows() if "error" in r]

    def markdown(self) -> str:
        parts = ["# GPU suite"]
        if self.watchdog:
            parts.append(f"**Watchdog:** {self.watchdog}")
        status = [[e["section"], e["name"], e["status"], f"{e['estimate_s']:.0f}", _fmt_s(e.get("elapsed_s")),
                   e.get("reason") or e.get("error") or ""] for e in self.rows]
        parts.append("Rows in the order they ran (estimate: the conservative cost the budget check used):\n\n"
                     + markdown_table(["section", "row", "status", "estimate (s)", "took (s)", "reason / error"],
                                      status))
        failed = self.failed()
        parts.append("Failed: " + ("none" if not failed else "\n\n" + "\n".join(f"- {line}" for line in failed)))
        peak = self.peaks.get("matmul_tflops") or float("nan")
        for section in ("headline", "early mask"):
            rows = self.throughput_rows(section)
            if rows:
                parts.append(f"## {section.capitalize()}\n\n" + render(
                    rows, peak, asdict(self.settings.throughput), self.peaks.get("datasheet_tflops")))
        for e in self.rows:
            if e["status"] == "ok" and isinstance(e["result"], dict) and "markdown" in e["result"]:
                parts.append(f"## {e['name'].capitalize()}\n\n{e['result']['markdown']}")
        return "\n\n".join(parts)


class Suite:
    """Runs rows in order inside a budget measured on ``clock`` from construction; ``watchdog()`` ends the process
    (``exit``) at the budget's end, the report written, when a row overruns."""

    def __init__(self, settings: SuiteSettings, report: Report, clock: Callable[[], float] = time.monotonic,
                 exit: Callable[[int], None] = os._exit):
        self.settings, self.report, self.clock, self.exit = settings, report, clock, exit
        self.start = clock()
        self.current: dict | None = None
        self.compile_measured: dict[str, float] = {}  # mode -> the slowest compile (warm-up) seen in that mode

    def remaining(self) -> float:
        return self.settings.budget_s - (self.clock() - self.start)

    def watchdog(self) -> threading.Timer:
        timer = threading.Timer(max(self.remaining(), 0.0), self._overrun)
        timer.daemon = True
        timer.start()
        return timer

    def _overrun(self) -> None:
        with self.report.lock:
            name = self.current["name"] if self.current else "none"
            self.report.watchdog = (f"the budget of {self.settings.budget_s:.0f} s ran out while row '{name}' ran; "
                                    "the report was written and the process ended (exit status 3)")
            if self.current is not None:
                self.current.update(status="failed", error="overran the budget (ended by the watchdog)")
                self.report.rows.append(self.current)
            self.report.save()
        print(self.report.watchdog, flush=True)
        self.exit(3)

    def run(self, row: Row) -> dict:
        entry = {"section": row.section, "name": row.name}
        try:
            entry["estimate_s"] = float(row.estimate())
        except Exception as error:  # noqa: BLE001
            entry["estimate_s"], entry["status"], entry["error"] = 0.0, "failed", _error(error)
            self.report.add(entry)
            return entry
        left = self.remaining()
        if entry["estimate_s"] > left:
            entry["status"] = "skipped"
            entry["reason"] = f"needs ~{entry['estimate_s']:.0f} s (compile included), {max(left, 0):.0f} s left"
            print(f"skipped {row.name}: {entry['reason']}", flush=True)
            self.report.add(entry)
            return entry
        print(f"--- {row.name} (estimate {entry['estimate_s']:.0f} s, {left:.0f} s left)", flush=True)
        started = self.clock()
        self.current = entry
        result, error = None, None
        try:
            result = row.run()
        except Exception as exc:  # noqa: BLE001  (a failing row is recorded and the suite goes on)
            error = _error(exc)
            print(f"failed {row.name}: {error}", flush=True)
        with self.report.lock:
            self.current = None
            entry["elapsed_s"] = self.clock() - started
            if any(e is entry for e in self.report.rows):  # the watchdog recorded it as overrunning
                self.report.save()
                return entry
            entry.update({"status": "failed", "error": error} if error else {"status": "ok", "result": result})
            self.report.add(entry)
        return entry

    def compile_estimate(self, mode: str) -> float:
        """Seconds to compile one graph in ``mode``: 1.25x the slowest measured in that mode (or, for CUDA graphs
        before any was measured, 1.5x the slowest ``compile``), never under half the conservative default (another
        model may compile slower than the one measured), else that default."""
        if mode in self.compile_measured:
            measured = 1.25 * self.compile_measured[mode]
        elif mode == "reduce-overhead" and "compile" in self.compile_measured:
            measured = 1.5 * self.compile_measured["compile"]
        else:
            return self.settings.compile_s
        return max(measured, 0.5 * self.settings.compile_s)

    def record_compile(self, mode: str, rows: list[dict]) -> None:
        seen = [s for r in rows for s in r.get("warmup_s", {}).values()]
        if mode != "eager" and seen:
            self.compile_measured[mode] = max(self.compile_measured.get(mode, 0.0), *seen)


def throughput_row(suite: Suite, section: str, key: str, mode: str, implementations: tuple[str, ...],
                   device: torch.device, official) -> Row:
    settings = suite.settings
    bench, config = settings.throughput, settings.configs[key]
    phases = ("infer", "train") if mode == "eager" else ("train",)  # compiled rows: the training step only
    if official is None:
        implementations = tuple(i for i in implementations if i != "official")

    def estimate() -> float:
        compile_s = 0.0 if mode == "eager" else suite.compile_estimate(mode)
        steps = (bench.warmup + bench.steps) * settings.step_s.get(key, 1.0) * (1 if phases == ("train",) else 1.5)
        return len(implementations) * (settings.build_s + len(phases) * compile_s + steps)

    def run() -> list[dict]:
        peaks = suite.report.peaks
        rows = throughput.measure_group(config, mode, implementations, bench, device,
                                        peaks.get("matmul_tflops") or float("nan"), official,
                                        peaks.get("datasheet_tflops"), phases)
        suite.record_compile(mode, rows)
        return rows

    return Row(section, f"{key} {mode} ({', '.join(implementations)})", estimate, run)


def build_rows(suite: Suite, device: torch.device, official) -> list[Row]:
    """Every row of the suite in priority order."""
    settings, bench = suite.settings, suite.settings.throughput

    def peaks() -> dict:
        suite.report.peaks = dict(
            matmul_tflops=throughput.matmul_peak_tflops(device, getattr(torch, bench.dtype), bench.matmul_size,
                                                        bench.matmul_seconds),
            datasheet_tflops=datasheet_peak_tflops(device, bench.dtype), dtype=bench.dtype)
        return suite.report.peaks

    rows = [Row("peaks", "peaks", lambda: 3 * bench.matmul_seconds + 5, peaks)]
    for mode in ("eager", *settings.compiled_modes):
        implementations = {"eager": PEERS, "compile": settings.compiled_implementations}.get(mode, ("mae_timm",))
        rows += [throughput_row(suite, "headline", key, mode, implementations, device, official)
                 for key in settings.headline]
    for mode in ("eager", *settings.compiled_modes[:1]):
        rows += [throughput_row(suite, "early mask", key, mode, ("mae_timm",), device, official)
                 for key in settings.early_mask]
    if settings.end_to_end is not None:
        e2e = settings.end_to_end
        runs = len(e2e.arms) * e2e.rounds
        rows.append(Row("end to end", "end to end",
                        lambda: settings.build_s + runs * ((suite.compile_estimate("compile") if e2e.compile else 0)
                                                           + settings.end_to_end_s),
                        lambda: _without_run(end_to_end.run_bench(e2e, None, device, None))))
    if settings.loader is not None:
        bench_loader = replace(settings.loader, device=str(device))
        epochs = len(bench_loader.workers) * (len(bench_loader.decoders) + len(bench_loader.baselines))
        rows.append(Row("loader", "loader", lambda: 10 + epochs * bench_loader.repeats * settings.loader_epoch_s,
                        lambda: _without_run(loader.run_bench(bench_loader, None, "loader"))))
    return rows


def run_suite(settings: SuiteSettings, out: Path, device: torch.device, official_dir: Path | None, command: str,
              only: tuple[str, ...] = (), clock: Callable[[], float] = time.monotonic,
              rows: Callable[[Suite, torch.device, object], list[Row]] = build_rows,
              exit: Callable[[int], None] = os._exit) -> Report:
    """Write the environment, then run ``rows`` in order inside the budget (``only``: the rows whose name holds
    one of these strings); returns the report (also in ``out``)."""
    env = dict(environment(device), command=command)
    env["official MAE code"] = str(official_dir) if official_dir else "not given (--official-dir): no official rows"
    report = Report(out, env, settings)
    report.save()  # a run that dies from here on still says where it ran
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    suite = Suite(settings, report, clock, exit)
    timer = suite.watchdog()
    try:
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
        official = load_official_mae(official_dir) if official_dir else None
        for row in rows(suite, device, official):
            if row.section == "peaks" or not only or any(text in row.name for text in only):
                suite.run(row)
    finally:
        timer.cancel()
    report.save()
    print(f"suite done in {suite.clock() - suite.start:.0f} s; results in {out}", flush=True)
    return report


def _without_run(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "run"}


def _error(error: BaseException) -> str:
    where = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    at = f" (at {Path(where[0].filename).name}:{where[0].lineno})" if where else ""
    return f"{type(error).__name__}: {error}{at}"


def _fmt_s(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.md and gpu_suite.json")
    parser.add_argument("--official-dir", type=Path, help="a clone of facebookresearch/mae (holds models_mae.py)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: test models, tiny data, a compiled row")
    parser.add_argument("--budget", type=float, help=f"seconds the command may take (default {FULL.budget_s:.0f})")
    parser.add_argument("--only", nargs="+", default=(), help="run only the rows whose name holds one of these")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled and CUDA-graph rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    if args.budget is not None:
        settings = replace(settings, budget_s=args.budget)
    if args.no_compile:
        settings = replace(settings, compiled_modes=())
    device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        print("mae-timm gpu_suite: error: the full suite needs a CUDA device; on a CPU run --smoke", file=sys.stderr)
        return 2
    arguments = sys.argv[1:] if argv is None else argv
    report = run_suite(settings, args.out, device, args.official_dir,
                       f"python -m benchmarks.gpu_suite {shlex.join(arguments)}", tuple(args.only))
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
