"""Shared machinery of the benchmark suite (DESIGN.md §6).

Timing
    GPU: CUDA events around every single call, after warm-up; the L2 cache is
    flushed (a 256 MiB buffer is zeroed) before each timed call and several
    input sets are rotated when one set is smaller than a few L2 sizes, so the
    cache never flatters a kernel. This is the method of
    ``triton.testing.do_bench`` written out so it behaves the same on
    triton 3.2 - 3.8. CPU: ``time.perf_counter`` around each call.
    Reported: the median and the 20th / 80th percentiles.

Peak extra memory
    GPU: ``torch.cuda.max_memory_allocated()`` during one call minus
    ``torch.cuda.memory_allocated()`` just before it (inputs, and for the
    ``bwd`` mode the saved activations, are not counted; the gradient is).
    CPU: resident-set growth. glibc is told (``mallopt(M_MMAP_THRESHOLD,
    64 KiB)``) to serve every allocation of 64 KiB or more by ``mmap`` and to
    unmap it on free, so freed tensors leave the RSS; the kernel's peak-RSS
    counter ``VmHWM`` is reset by writing ``5`` to ``/proc/self/clear_refs``
    and read back after the call: peak = VmHWM - VmRSS(before). ``tracemalloc``
    does not see torch's allocations, which is why it is not used. Where
    ``/proc`` is missing the column is NaN.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- environment


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Folder name under ``benchmarks/results``: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-2t``."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return _slug(f"cpu {cpu_model()} {torch.get_num_threads()}t")


def git_commit() -> str:
    """Short HEAD (``-dirty`` with uncommitted op sources), or ``RLHF_KERNELS_COMMIT`` when set.

    The override is for runners that copy the working tree but not a current
    ``.git`` (the lent-GPU tool's copy keeps the ``.git`` of its first call), so
    the caller passes the hash it knows: ``RLHF_KERNELS_COMMIT=<sha> make gpu``.
    """
    override = os.environ.get("RLHF_KERNELS_COMMIT", "").strip()
    if override:
        return override
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "rlhf_kernels", "csrc"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("triton")
    except Exception:  # noqa: BLE001 - not installed / broken metadata
        return "-"


def liger_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("liger-kernel")
    except Exception:  # noqa: BLE001
        return "-"


def environment(device: torch.device) -> Dict[str, str]:
    """The stamp every output carries."""
    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda or "-",
        "liger": liger_version(),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def stamp_line(env: Dict[str, str]) -> str:
    return (
        f"{env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
        f"commit {env['commit']} | {env['date']}"
    )


# --------------------------------------------------------------------------- memory


class _CpuMemory:
    """Peak resident-set growth during a call (see the module docstring)."""

    def __init__(self) -> None:
        self.ok = os.path.exists("/proc/self/status") and os.path.exists("/proc/self/clear_refs")
        self.libc = None
        if self.ok:
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                self.libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so large frees return to the OS
                self.libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                self.ok = False

    @staticmethod
    def _status() -> Dict[str, int]:
        out = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS", "VmHWM")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
        return out

    def measure(self, fn: Callable[[], object]) -> float:
        if not self.ok:
            fn()
            return float("nan")
        gc.collect()
        # Free heap chunks of earlier calls (made before the mmap threshold was fixed, or below it) would be
        # reused without touching new pages, so a call's peak read 0: malloc_trim(0) hands their pages back
        # (glibc madvises free chunks away), and reusing them faults them in again, which the RSS counts.
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = self._status()["VmRSS"]
        result = fn()
        peak = self._status()["VmHWM"]
        del result
        return max(0.0, float(peak - before))


_CPU_MEMORY: Optional[_CpuMemory] = None


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated by one call of ``fn`` beyond what was live before it."""
    global _CPU_MEMORY
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del result
        return float(peak - before)
    if _CPU_MEMORY is None:
        _CPU_MEMORY = _CpuMemory()
    return _CPU_MEMORY.measure(fn)


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    min_ms: float = float("nan")


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _summarise(times_ms: List[float]) -> Timing:
    s = sorted(times_ms)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s), s[0])


@dataclass
class TimerConfig:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 100
    min_warmup: int = 2


_L2_FLUSH: Dict[int, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _L2_FLUSH:
        _L2_FLUSH[index] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    return _L2_FLUSH[index]


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * 1024 * 1024) or 50 * 1024 * 1024)
    return 64 * 1024 * 1024


def time_fn(fns: Sequence[Callable[[], object]], device: torch.device, cfg: TimerConfig) -> Timing:
    """Median time of ``fns[i % len(fns)]()`` (one per rotated input set)."""
    if device.type == "cuda":
        return _time_cuda(fns, device, cfg)
    return _time_cpu(fns, cfg)


def _time_cpu(fns: Sequence[Callable[[], object]], cfg: TimerConfig) -> Timing:
    t0 = time.perf_counter()
    n = 0
    while n < cfg.min_warmup or (time.perf_counter() - t0) * 1e3 < cfg.warmup_ms:
        fns[n % len(fns)]()
        n += 1
    # The estimate comes from one more call, not the warm-up (which may include compilation).
    t1 = time.perf_counter()
    fns[n % len(fns)]()
    estimate_ms = (time.perf_counter() - t1) * 1e3
    reps = int(max(cfg.min_reps, min(cfg.max_reps, cfg.rep_ms / max(estimate_ms, 1e-6))))
    times = []
    for i in range(reps):
        fn = fns[i % len(fns)]
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return _summarise(times)


def _time_cuda(fns: Sequence[Callable[[], object]], device: torch.device, cfg: TimerConfig) -> Timing:
    flush = _l2_flush_buffer(device)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    n = 0
    while True:
        fns[n % len(fns)]()
        n += 1
        end.record()
        end.synchronize()
        if n >= cfg.min_warmup and start.elapsed_time(end) >= cfg.warmup_ms:
            break
    # The estimate comes from one more call, not the warm-up (which may include compilation).
    start.record()
    fns[n % len(fns)]()
    end.record()
    end.synchronize()
    estimate_ms = start.elapsed_time(end)
    reps = int(max(cfg.min_reps, min(cfg.max_reps, cfg.rep_ms / max(estimate_ms, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _summarise([s.elapsed_time(e) for s, e in zip(starts, ends)])


# --------------------------------------------------------------------------- device roofs


def _roof_config(cfg: TimerConfig) -> TimerConfig:
    # A roof is a ceiling: the fastest of enough repetitions, so a busy moment does not lower it.
    return TimerConfig(warmup_ms=max(cfg.warmup_ms, 20.0), rep_ms=max(cfg.rep_ms, 200.0), min_reps=10, max_reps=200,
                       min_warmup=max(cfg.min_warmup, 2))  # fmt: skip


def copy_bandwidth(device: torch.device, cfg: TimerConfig) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), best of the repetitions."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_fn([lambda: dst.copy_(src)], device, _roof_config(cfg))  # (both freed on return)
    return 2.0 * nbytes / (timing.min_ms * 1e-3)


def matmul_throughput(device: torch.device, dtype: torch.dtype, cfg: TimerConfig) -> float:
    """Dense ``[M, K] @ [K, N]`` throughput in FLOP/s for ``dtype``, best of the repetitions."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = time_fn([lambda: a @ b], device, _roof_config(cfg))
    return 2.0 * size**3 / (timing.min_ms * 1e-3)


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One measurement (or one skip) of the suite; a CSV row."""

    run_id: str
    op: str
    mode: str
    dtype: str
    N: int
    V: int
    H: int
    shape: str
    provider: str
    status: str  # ok | skipped | oom | error
    ms: float = float("nan")
    ms_p20: float = float("nan")
    ms_p80: float = float("nan")
    reps: int = 0
    gbps: float = float("nan")
    pct_bw: float = float("nan")
    tflops: float = float("nan")
    pct_mm: float = float("nan")
    peak_mb: float = float("nan")
    copy_gbps: float = float("nan")
    mm_tflops: float = float("nan")
    ratios: str = ""  # "eager=3.10;compile=1.20": t_other / t_this (> 1: this one is faster)
    note: str = ""
    device: str = ""
    torch: str = ""
    triton: str = ""
    cuda: str = ""
    commit: str = ""
    date: str = ""

    @classmethod
    def fields(cls) -> List[str]:
        return list(cls.__dataclass_fields__)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def key_of(row: Dict[str, object]) -> tuple:
    return tuple(str(row[k]) for k in ("op", "mode", "dtype", "shape", "provider"))


def shape_key(row: Dict[str, object]) -> tuple:
    return tuple(str(row[k]) for k in ("op", "mode", "dtype", "shape"))


def write_json(path: str, obj: object) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def read_json(path: str) -> Dict[str, object]:
    """The JSON object in ``path``, or ``{}`` where the file is missing or unreadable (a run's meta.json)."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


@dataclass
class Logger:
    """Prints and keeps every line for the raw log."""

    lines: List[str] = field(default_factory=list)
    quiet: bool = False
    sink: Optional[Callable[[str], None]] = None

    def __call__(self, msg: str = "") -> None:
        self.lines.append(msg)
        if self.sink is not None:
            self.sink(msg)
        elif not self.quiet:
            print(msg, file=sys.stderr, flush=True)
