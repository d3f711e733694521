"""How this machine runs a run's updates: the precision and the compile mode, chosen by measurement where the
setting is ``auto``. Each choice comes with one log line that says what was measured and what was picked.

Precision ``auto``: bf16 autocast on CUDA. On the CPU, fp32 where the CPU has no bf16 unit (AMX-BF16 or
AVX512-BF16): torch emulates bf16 there, and a bf16 update is slower than fp32 (benchmarks/results/cpu_precision.md).
Where it has one, a probe times :data:`PROBE_UPDATES` updates of each precision on copies of the run's model and
optimizer at the run's batch size, interleaved, and keeps bf16 (attention in fp32, see ``mae_timm.utils.device``)
only when its median update takes less than :data:`BF16_MARGIN` of fp32's, so noise never picks the slower one. The
choice and its figures are kept in ``precision.json`` in the run folder; a resumed run on the same machine, model
and batch reads them and keeps its precision.

Compile ``auto``: ``default`` (inductor) on CUDA. On the CPU inductor pays only when its compile time is won back
within the run: it compiles when ``COMPILE_SECONDS < gain x eager update time x planned updates``, the constants
measured on the CPU (benchmarks/results/cpu_precision.md), the eager update time taken from two updates of the run's
model (two updates on a copy) where at least ``COMPILE_MIN_UPDATES`` are planned.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from mae_timm.utils import autocast_dtype, cpu_bf16_units
from mae_timm.utils.files import atomic_write

__all__ = [
    "BF16_MARGIN", "COMPILE_GAIN", "COMPILE_MIN_UPDATES", "COMPILE_SECONDS", "PROBE_UPDATES", "choose_compile",
    "choose_precision",
]

PROBE_UPDATES = 3  # timed updates per precision, after one untimed warm-up update each
BF16_MARGIN = 0.95  # bf16 is kept when its median update takes below this share of fp32's
PROBE_MIN_UPDATES = 50  # planned updates below which a probe (8 updates) costs more than it can win
# inductor (default mode) on the CPU, compare's default MAE at batch 256, fp32, 2 threads on a busy 2-core AVX2 EPYC
# (benchmarks/cpu_precision.py --compile; docs/benchmarks.md): seconds of its first, compiling update beyond an eager
# one, and the share of an eager update a compiled one saves
COMPILE_SECONDS = 280.0
COMPILE_GAIN = 0.13
COMPILE_MIN_UPDATES = 100  # planned updates below which the eager update is not even timed: compiling cannot pay

TimeUpdates = Callable[[dict[str, torch.dtype | None], int], dict[str, list[float]]]


def choose_precision(setting: str, device: torch.device, *, planned_updates: int, time_updates: TimeUpdates,
                     run_dir: Path | None = None, key: dict | None = None) -> tuple[torch.dtype | None, str]:
    """The precision setting -> (autocast dtype or None for fp32, the log line that explains it).

    ``time_updates({name: dtype}, n)`` runs one warm-up and then ``n`` timed updates of each named precision,
    interleaved, and returns the seconds of each; it is called only on a CPU with bf16 units. ``run_dir`` / ``key``:
    where the choice is kept and what it was measured for (model, batch, threads, CPU, torch).
    """
    if setting != "auto":
        return autocast_dtype(setting, device), f"precision {setting} (as set)"
    if device.type == "cuda":
        return torch.bfloat16, "precision auto: bf16 autocast (CUDA)"
    units = cpu_bf16_units()
    where = (f"CPU {units['capability']}, AMX-BF16 {'yes' if units['amx_bf16'] else 'no'}, "
             f"AVX512-BF16 {'yes' if units['avx512_bf16'] else 'no'}")
    if not (units["amx_bf16"] or units["avx512_bf16"]):
        return None, f"precision auto: fp32 ({where}: bf16 runs emulated on this CPU, slower than fp32)"
    cache = run_dir / "precision.json" if run_dir is not None else None
    saved = _read_json(cache)
    if saved is not None and saved.get("key") == _jsonable(key) and saved.get("choice") in ("bf16", "fp32"):
        return autocast_dtype(saved["choice"], device), f"{saved['note']} (kept from {cache})"
    if planned_updates < PROBE_MIN_UPDATES:
        return None, (f"precision auto: fp32 ({where}; {planned_updates} updates planned, fewer than the "
                      f"{PROBE_MIN_UPDATES} a timing probe pays for)")
    times = time_updates({"fp32": None, "bf16": torch.bfloat16}, PROBE_UPDATES)
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    choice = "bf16" if bf16 < BF16_MARGIN * fp32 else "fp32"
    note = (f"precision auto: {choice} ({where}; median of {PROBE_UPDATES} probe updates: fp32 {1000 * fp32:.0f} ms, "
            f"bf16 with fp32 attention {1000 * bf16:.0f} ms, {fp32 / bf16:.2f}x; bf16 is kept below "
            f"{BF16_MARGIN:.2f} of fp32)")
    if cache is not None:
        with atomic_write(cache, "w") as f:
            json.dump(dict(key=_jsonable(key), choice=choice, note=note, seconds=times), f, indent=1)
    return autocast_dtype(choice, device), note


def choose_compile(mode: str, device: torch.device, *, planned_updates: int,
                   eager_seconds: Callable[[], float]) -> tuple[str, str]:
    """The checked compile setting (``auto`` or one of ``COMPILE_MODES``) -> (the mode, the log line).

    ``eager_seconds()`` times an eager update of the run; it is called only for ``auto`` on the CPU with at least
    :data:`COMPILE_MIN_UPDATES` updates planned (below, the timing would cost more than compiling could win).
    """
    if mode != "auto":
        return mode, f"compile {mode} (as set)"
    if device.type == "cuda":
        return "default", "compile auto: default (CUDA)"
    if planned_updates < COMPILE_MIN_UPDATES:
        return "off", (f"compile auto: off ({planned_updates} updates planned; compiling takes about "
                       f"{COMPILE_SECONDS:.0f} s on the CPU and saves {100 * COMPILE_GAIN:.0f} % of an update)")
    seconds = eager_seconds()
    payback = COMPILE_GAIN * seconds * planned_updates
    choice = "default" if COMPILE_SECONDS < payback else "off"
    return choice, (f"compile auto: {choice} (eager update {1000 * seconds:.0f} ms x {planned_updates} updates x "
                    f"{100 * COMPILE_GAIN:.0f} % measured gain = {payback:.0f} s saved, against about "
                    f"{COMPILE_SECONDS:.0f} s of compiling on the CPU)")


def _read_json(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def _jsonable(value):
    return json.loads(json.dumps(value, default=str, sort_keys=True))
