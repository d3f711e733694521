"""The GPU suite on CPU: the priority order, the budget (rows skipped with their reason, a watchdog), failing rows
recorded without ending the suite, ratios only within one mode, and one compiled smoke row through inductor."""

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import mae_timm  # noqa: F401  (registers the models)
from benchmarks import end_to_end, gpu_suite, throughput
from benchmarks.throughput_report import peer_ratio

OFFICIAL_STAND_IN = Path(__file__).resolve().parent / "official_mae"  # models_mae.py with the official API
CPU = torch.device("cpu")


class FakeClock:
    """A clock that only moves when a row says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def read(out: Path) -> tuple[dict, str]:
    return json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text()


def test_rows_skipped_with_reason_and_a_failing_row_does_not_end_the_suite(tmp_path):
    clock = FakeClock()

    def row(name: str, estimate: float, cost: float, fail: bool = False) -> gpu_suite.Row:
        def run():
            clock.now += cost
            if fail:
                raise RuntimeError(f"{name} broke")
            return {"ran": name}

        return gpu_suite.Row("headline", name, lambda: estimate, run)

    def rows(suite, device, official):
        return [row("a", 10, 12), row("b", 30, 5, fail=True), row("c", 40, 1), row("d", 20, 3), row("e", 0, 0)]

    settings = replace(gpu_suite.SMOKE, budget_s=50.0)
    report = gpu_suite.run_suite(settings, tmp_path, CPU, None, "cmd", clock=clock, rows=rows)
    results, markdown = read(tmp_path)
    by_name = {e["name"]: e for e in results["rows"]}
    assert [e["name"] for e in results["rows"]] == ["a", "b", "c", "d", "e"]  # the order given, each recorded
    assert by_name["a"]["status"] == "ok" and by_name["a"]["elapsed_s"] == 12
    assert by_name["b"]["status"] == "failed" and by_name["b"]["error"].startswith("RuntimeError: b broke")
    assert by_name["c"]["status"] == "skipped" and by_name["c"]["reason"] == "needs ~40 s (compile included), 33 s left"
    assert by_name["d"]["status"] == "ok" and by_name["e"]["status"] == "ok"  # the suite went on after both
    assert results["failed"] == [by_name["b"]["name"] + ": " + by_name["b"]["error"]] == report.failed()
    assert "| headline | c | skipped | 40 |  | needs ~40 s (compile included), 33 s left |" in markdown
    assert "- b: RuntimeError: b broke" in markdown
    run = results["run"]
    assert run["command"] == "cmd" and "/dev/shm" in run and "CPU cores" in run["device"]


def test_environment_is_written_before_any_row(tmp_path):
    seen = []

    def rows(suite, device, official):
        seen.append(read(tmp_path)[0])  # what a run killed now would return
        return []

    gpu_suite.run_suite(gpu_suite.SMOKE, tmp_path, CPU, None, "cmd", rows=rows)
    assert seen[0]["rows"] == [] and {"device", "versions", "cuda", "/dev/shm"} <= seen[0]["run"].keys()
    assert "transformers" in seen[0]["run"]["versions"]


def test_watchdog_writes_the_report_and_ends_the_command(tmp_path):
    exits = []

    def rows(suite, device, official):
        return [gpu_suite.Row("headline", "slow", lambda: 0.0, lambda: time.sleep(1.0)),
                gpu_suite.Row("loader", "after", lambda: 0.0, lambda: None)]

    settings = replace(gpu_suite.SMOKE, budget_s=0.2)
    gpu_suite.run_suite(settings, tmp_path, CPU, None, "cmd", rows=rows, exit=exits.append)
    results, markdown = read(tmp_path)
    assert exits == [3]  # os._exit(3) in a real run
    assert results["rows"][0]["status"] == "failed"
    assert results["rows"][0]["error"] == "overran the budget (ended by the watchdog)"
    assert "row 'slow' ran" in results["watchdog"] and "**Watchdog:**" in markdown
    assert results["rows"][1]["status"] == "skipped"  # (no budget left; a real run has ended by then)


def test_headline_rows_come_first_in_priority_order():
    suite = gpu_suite.Suite(gpu_suite.FULL, gpu_suite.Report(Path("unused"), {}, gpu_suite.FULL))
    rows = gpu_suite.build_rows(suite, CPU, official=object())
    names = [r.name for r in rows]
    assert names[:7] == [
        "peaks",
        "vit_b16_224 eager (mae_timm, official, hf)",
        "vit_t8_64 eager (mae_timm, official, hf)",
        "vit_b16_224 compile (mae_timm, official, hf)",
        "vit_t8_64 compile (mae_timm, official, hf)",
        "vit_b16_224 reduce-overhead (mae_timm)",
        "vit_t8_64 reduce-overhead (mae_timm)",
    ]
    sections = [r.section for r in rows]
    assert sections == sorted(sections, key=gpu_suite.SECTIONS.index)  # headline, early mask, end to end, loader
    assert sections[-2:] == ["end to end", "loader"]
    # the compiled estimate includes compiling each of the three models, and drops once compile times are known
    compiled = rows[3].estimate()
    assert compiled > 3 * gpu_suite.FULL.compile_s
    suite.record_compile("compile", [{"warmup_s": {"train": 20.0}}])
    assert rows[3].estimate() < compiled and rows[5].estimate() > 1.5 * 20  # CUDA graphs: 1.5x the compile


def test_ratios_only_between_rows_of_the_same_mode():
    def row(implementation, mode, img_per_s):
        return {"config": "c", "implementation": implementation, "mode": mode, "train": {"img_per_s": img_per_s}}

    rows = [row("mae_timm", "eager", 100.0), row("official", "eager", 50.0), row("hf", "compile", 10.0),
            row("mae_timm", "compile", 300.0), {"config": "c", "implementation": "official", "mode": "compile",
                                                "error": "boom"}]
    assert peer_ratio(rows[0], rows, "official", "train") == 2.0
    assert peer_ratio(rows[0], rows, "hf", "train") is None  # HF ran compiled only: no eager peer
    assert peer_ratio(rows[3], rows, "hf", "train") == 30.0
    assert peer_ratio(rows[3], rows, "official", "train") is None  # the compiled official row failed


def test_smoke_eager_sections_with_a_skipped_compile_and_injected_failures(tmp_path, monkeypatch):
    """The real rows on CPU, eager only in time: the compiled row does not fit a 60 s budget (its estimate says
    why), HF failing inside the headline row leaves the other two implementations measured and its ratio missing,
    and a failing end-to-end section leaves the loader section to run."""
    build = throughput.build

    def failing_hf(implementation, *args, **kwargs):
        if implementation == "hf":
            raise ValueError("no HF today")
        return build(implementation, *args, **kwargs)

    def failing_end_to_end(*args, **kwargs):
        raise OSError("no shards today")

    monkeypatch.setattr(throughput, "build", failing_hf)
    monkeypatch.setattr(end_to_end, "run_bench", failing_end_to_end)
    settings = replace(gpu_suite.SMOKE, budget_s=60.0)
    report = gpu_suite.run_suite(settings, tmp_path, CPU, OFFICIAL_STAND_IN, "cmd")
    results, markdown = read(tmp_path)
    status = {e["name"]: e for e in results["rows"]}
    assert [e["section"] for e in results["rows"]] == ["peaks", "headline", "headline", "early mask", "early mask",
                                                       "end to end", "loader"]
    compiled = status["test compile (mae_timm)"]
    assert compiled["status"] == "skipped" and compiled["reason"].startswith("needs ~")
    headline = {r["implementation"]: r for r in status["test eager (mae_timm, official, hf)"]["result"]}
    assert headline["hf"]["error"] == "ValueError: no HF today"
    assert headline["official"]["train"]["loss"] == pytest.approx(headline["mae_timm"]["train"]["loss"])
    assert status["end to end"]["status"] == "failed" and "OSError: no shards today" in status["end to end"]["error"]
    assert status["loader"]["status"] == "ok" and status["loader"]["result"]["rows"]
    assert report.failed()[0].startswith("end to end: OSError") and "test hf eager: ValueError" in report.failed()[1]
    ours = next(line for line in markdown.splitlines() if line.startswith("| test | mae_timm | eager"))
    assert ours.split(" | ")[6] == "missing"  # vs HF: its row failed


def test_smoke_compiled_row_through_inductor(tmp_path):
    """The one compiled test (inductor on mae_vit_test: 30-70 s on a busy CPU): ``--smoke`` compiles a row and it
    starts near the eager row's loss."""
    argv = ["--smoke", "--only", "test eager", "test compile", "--out", str(tmp_path)]
    assert gpu_suite.main(argv) == 0
    results, markdown = read(tmp_path)
    rows = {e["name"]: e for e in results["rows"]}
    assert list(rows) == ["peaks", "test eager (mae_timm, hf)", "test compile (mae_timm)"]
    assert all(e["status"] == "ok" for e in rows.values()) and results["failed"] == []
    [compiled] = rows["test compile (mae_timm)"]["result"]
    eager = {r["implementation"]: r for r in rows["test eager (mae_timm, hf)"]["result"]}
    assert compiled["mode"] == "compile" and "infer" not in compiled  # compiled rows: the training step only
    assert compiled["train"]["img_per_s"] > 0
    # the same weights and images; inductor draws its own random numbers, so other masks: close, not equal
    assert compiled["train"]["loss"] == pytest.approx(eager["mae_timm"]["train"]["loss"], rel=0.02)
    assert compiled["warmup_s"]["train"] > 5 * eager["mae_timm"]["warmup_s"]["train"]  # it compiled in the warm-up
    line = next(line for line in markdown.splitlines() if line.startswith("| test | mae_timm | compile |"))
    assert line.split(" | ")[5:7] == ["missing", "missing"]  # no peer row in the compiled mode
