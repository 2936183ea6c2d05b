"""Where one op's step goes at PPO micro-batch sizes: the GPU's busy and idle time, and the host's ops.

    python -m benchmarks.step_profile [--ops ppo_loss,logprobs] [--shapes 4096x50257] [--dtype bf16]
        [--providers cuda,triton,liger] [--mode fwd+bwd] [--steps 30] [--out DIR]

Why: on an H200 (run 5, ``benchmarks/results/nvidia-h200/NOTES.md``) ``ppo_loss`` took the same ~1.6 ms per
forward + backward at bf16 4096 x 50257 and 16384 x 50257, four times the data, where Liger-Kernel's GRPO loss
took 0.8: at these sizes the step is bound by the host. Run 4's ``tune_triton.log`` put the CPU time to issue
one fused CUDA PPO forward + backward at 1.65 ms on that machine (0.57 ms for the same Python on this repository's
CI CPU, ``benchmarks/host_overhead.py``). Which ops and which waits make that up is what this measures.

Each case is the benchmark suite's own step (``benchmarks.run.step_fns``: the same inputs, provider and mode),
run ``--steps`` times back to back, for ours under ``RLHF_KERNELS_VALIDATE=1`` (the default: one host sync per
call) and ``0`` (none). Per step (medians):

- ``step ms``: CUDA events around the step (the GPU's span, as the suite times it, without its L2 flush);
- ``host ms``: the CPU's wall time inside the call (with the sync: including its wait);
- ``kernels ms``: the device time of the step's kernels (``torch.profiler``; the GPU's busy time); ``step -
  kernels`` is the time the GPU spent idle inside the step, waiting for the host;
- ``launches``: kernel launches (CUDA runtime / driver launch calls); ``syncs ms``: host time blocked in
  synchronising calls;
- per case, the ops with the most host self time per step (``torch.profiler``'s ``self_cpu_time_total``).

On the CPU (``--device cpu``, tests) the GPU columns are empty. Writes ``step_profile.md`` (also printed) under
``--out``; ``benchmarks/gpu_suite.sh host`` runs it on the lent GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from . import run as suite
from .common import environment, stamp_line
from .providers import OURS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# host calls that block until the device has caught up (the profiler names them after the CUDA API)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync", "cuStreamSynchronize", "cuEventSynchronize", "cuMemcpyDtoH")  # fmt: skip
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
TOP = 12


@contextmanager
def _validation(value: str | None) -> Iterator[None]:
    """``RLHF_KERNELS_VALIDATE=value`` inside (``None``: leave it as it is)."""
    previous = os.environ.get("RLHF_KERNELS_VALIDATE")
    if value is not None:
        os.environ["RLHF_KERNELS_VALIDATE"] = value
    try:
        yield
    finally:
        if value is not None:
            if previous is None:
                os.environ.pop("RLHF_KERNELS_VALIDATE", None)
            else:
                os.environ["RLHF_KERNELS_VALIDATE"] = previous


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, steps: int) -> dict[str, float]:
    """Median ``step ms`` (CUDA events; ``nan`` on the CPU) and ``host ms`` over ``steps`` back-to-back steps."""
    _sync(device)
    host: list[float] = []
    pairs = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        if device.type == "cuda":
            end.record()
            pairs.append((start, end))
    _sync(device)
    span = [s.elapsed_time(e) for s, e in pairs]
    return {"step_ms": statistics.median(span) if span else float("nan"), "host_ms": statistics.median(host)}


def _is_device_event(event) -> bool:
    kind = getattr(event, "device_type", None)
    return kind is not None and str(kind).endswith("CUDA")


def profile_steps(step, device: torch.device, steps: int) -> dict[str, object]:
    """``torch.profiler`` over ``steps`` steps: per-step kernel time, launches, sync time and the top host ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = prof.events()
    kernels_us = sum(e.time_range.elapsed_us() for e in events if _is_device_event(e))
    launches = sum(1 for e in events if not _is_device_event(e) and e.name in LAUNCH_CALLS)
    sync_us = sum(e.time_range.elapsed_us() for e in events if not _is_device_event(e) and e.name in SYNC_CALLS)
    averages = [a for a in prof.key_averages() if not _is_device_event(a)]
    top = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)[:TOP]
    return {
        "kernels_ms": kernels_us / 1e3 / steps if device.type == "cuda" else float("nan"),
        "launches": launches / steps,
        "sync_ms": sync_us / 1e3 / steps,
        "top": [(a.key, a.count / steps, a.self_cpu_time_total / steps) for a in top],
    }


def measure_case(spec, case, provider: str, mode: str, device: torch.device, steps: int, validate: str | None):
    """One row (and its top host ops) for ``provider`` at ``case`` under ``RLHF_KERNELS_VALIDATE=validate``."""
    sets = [spec.make_inputs(case, device, 0)]
    with _validation(validate):
        step = suite.step_fns(spec, spec.providers[provider], sets, mode)[0]
        for _ in range(3):  # warm-up: compilation, autotuning, the caching allocator
            step()
        row = time_steps(step, device, steps)
        row.update(profile_steps(step, device, max(steps // 3, 3)))
    row.update(op=spec.name, shape=suite.shape_text(case), provider=provider, mode=mode,
               validate="-" if validate is None else validate)  # fmt: skip
    return row


def format_report(rows: Sequence[dict[str, object]], header: str, steps: int) -> str:
    def ms(x: float) -> str:
        return "–" if math.isnan(x) else f"{x:.3f}"

    columns = ("| op | mode | shape | provider | validate | step ms | host ms | kernels ms | GPU idle ms | launches | "
               "syncs ms |")
    lines = [f"# Step profile: where a step's time goes ({steps} steps per case, medians)", "", header, "", columns,
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        idle = r["step_ms"] - r["kernels_ms"]
        lines.append(f"| {r['op']} | {r['mode']} | {r['shape']} | {r['provider']} | {r['validate']} | "
                     f"{ms(r['step_ms'])} | {ms(r['host_ms'])} | {ms(r['kernels_ms'])} | {ms(idle)} | "
                     f"{r['launches']:.0f} | {ms(r['sync_ms'])} |")  # fmt: skip
    for r in rows:
        title = f"## {r['op']} {r['mode']} {r['shape']} {r['provider']}, validate={r['validate']}: host self time per step"
        lines += ["", title, "", "| op | calls | µs |", "|---|---|---|"]
        lines += [f"| `{key}` | {calls:g} | {us:.0f} |" for key, calls, us in r["top"]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="ppo_loss,logprobs", help="ops of the benchmark suite (logits family)")
    p.add_argument("--shapes", default="4096x50257", help="NxV list")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--providers", default="cuda,triton,liger", help="comma list; unavailable ones are skipped")
    p.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="folder for step_profile.md (printed either way)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 3:
        raise SystemExit("--steps must be at least 3")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    specs = suite.all_ops()
    ops = suite._csv_list(args.ops)
    unknown = [o for o in ops if o not in specs or specs[o].family != "logits"]
    if unknown:
        raise SystemExit(f"--ops: {unknown} are not logits-family ops of the suite ({sorted(specs)})")
    rows = []
    for op in ops:
        spec = specs[op]
        for n, v, *_ in suite.parse_shapes(args.shapes):
            case = suite.logits_case(op, n, v, DTYPES[args.dtype])
            for provider in suite._csv_list(args.providers):
                if provider not in spec.providers:
                    print(f"{op}: no provider {provider!r}; skipped", file=sys.stderr)
                    continue
                reason = spec.providers[provider].reason(case, device)
                if reason is not None:
                    print(f"{op}: {provider} skipped: {reason}", file=sys.stderr)
                    continue
                for validate in ("1", "0") if provider in OURS else (None,):
                    try:
                        rows.append(measure_case(spec, case, provider, args.mode, device, args.steps, validate))
                    except Exception as exc:  # noqa: BLE001 - one provider failing must not stop the profile
                        print(f"{op} {provider}: {type(exc).__name__}: {exc}", file=sys.stderr)
    text = format_report(rows, stamp_line(environment(device)), args.steps)
    sys.stdout.write(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "step_profile.md"), "w") as f:
            f.write(text)
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
