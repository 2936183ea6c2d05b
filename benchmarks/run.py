"""The benchmark suite's one CLI (``python -m benchmarks.run`` == ``rlhf-kernels bench``).

Measures every op against torch eager, ``torch.compile``, the chunked loop of
TRL / verl, Liger-Kernel (when installed) and each backend of this package,
in ms (median, p20-p80), effective GB/s, % of the copy bandwidth measured in
the same run, peak extra memory, and the ratio to every other provider
(DESIGN.md §6). Writes ``<out>/<device-slug>/``: ``results.csv``,
``results.md``, ``summary.md``, one PNG per op, ``summary.png``,
``meta.json`` and the raw ``run.log``.

    python -m benchmarks.run                              # defaults for this device
    python -m benchmarks.run --quick                      # small shapes, seconds
    python -m benchmarks.run --ops logprobs,ppo_loss --dtypes bf16 --mode fwd+bwd
    python -m benchmarks.run --shapes 4096x151936 --providers eager,liger,triton
    python -m benchmarks.run --ops linear_logprobs --shapes 8192x128256x4096

Rows of an existing ``results.csv`` for other ops / shapes / providers are
kept (so a suite split over several runs lands in one table); ``--fresh``
starts over.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from rlhf_kernels.ops._dispatch import device_kind, resolve_device

from . import common, report
from .providers import ALL_PROVIDERS, Case, OpSpec

GPU_NS = (4096, 8192, 16384)
GPU_VS = (50257, 128256, 151936)
GPU_HS = (2048, 4096)
GPU_SCAN = ((64, 1024), (256, 2048), (1024, 4096))
CPU_NS = (2048,)
CPU_VS = (8192, 32000, 50257)
CPU_LINEAR = ((1024, 8192, 512), (1024, 32000, 512))
CPU_SCAN = ((64, 512), (256, 1024))
QUICK_NS = (256,)
QUICK_VS = (1024, 4096)
QUICK_LINEAR = ((128, 1024, 64), (128, 4096, 64))
QUICK_SCAN = ((8, 64), (16, 128))

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDER_ORDER = ("eager", "compile", "chunked", "triton", "cuda", "cpu", "liger")  # liger last: it writes into its inputs


def all_ops() -> Dict[str, OpSpec]:
    from . import bench_gae, bench_kl, bench_linear, bench_logprobs, bench_ppo

    ops: Dict[str, OpSpec] = {}
    for module in (bench_logprobs, bench_kl, bench_ppo, bench_linear, bench_gae):
        ops.update(module.OPS)
    return ops


DEFAULT_OPS = ("logprobs", "logprobs+ent", "kl_divergence", "ppo_loss", "linear_logprobs", "gae")
# run by name or by 'all' only (not by default)
EXTRA_OPS = ("linear_logprobs+ent", "linear_cross_entropy", "linear_ppo_loss", "trainer")


def _csv_list(text: Optional[str]) -> List[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_shapes(text: str) -> List[Tuple[int, ...]]:
    shapes = []
    for item in _csv_list(text):
        try:
            parts = tuple(int(p) for p in item.lower().replace("*", "x").split("x"))
        except ValueError:
            parts = ()
        if len(parts) not in (2, 3) or min(parts) < 1:
            raise argparse.ArgumentTypeError(f"--shapes entries are NxV or NxVxH (or BxT for gae), got {item!r}")
        shapes.append(parts)
    return shapes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-kernels bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--ops", default=",".join(DEFAULT_OPS),
                   help="comma list of: " + ", ".join(DEFAULT_OPS + EXTRA_OPS) + " (or 'all'; default: the first "
                   + str(len(DEFAULT_OPS)) + "); also the linear losses' +recompute and +vocab variants, linear_logprobs+rows, linear_logprobs+frozen, ppo_loss+overwrite, kl_divergence+overwrite, and "
                   "linear_cross_entropy+liger-fp32acc")  # fmt: skip
    p.add_argument("--shapes", default=None, help="NxV[,NxV...] (NxVxH for linear ops); default per device (DESIGN §6)")
    p.add_argument("--hidden", default=None, help="H values for the linear ops when --shapes gives NxV (default 2048,4096 on GPU)")
    p.add_argument("--scan-shapes", default=None, help="BxT list for gae")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16 (default: bf16,fp32 on GPU, fp32 on CPU)")
    p.add_argument("--providers", default=",".join(PROVIDER_ORDER), help="comma list of " + ", ".join(PROVIDER_ORDER))
    p.add_argument("--mode", default="fwd,fwd+bwd", help="fwd | bwd | fwd+bwd, a comma list, or 'all'")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="results root (a <device-slug>/ folder is made in it)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); on a shared, busy machine 1 avoids OpenMP "
                        "oversubscription stalls. Part of the CPU results folder name.")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="small shapes and short timing (CPU / smoke tests)")
    p.add_argument("--fresh", action="store_true", help="replace results.csv instead of merging into it")
    p.add_argument("--resume", action="store_true", help="skip the (op, mode, dtype, shape, provider) rows already in results.csv")
    p.add_argument("--compile-static", action="store_true", help="torch.compile with dynamic=False (one graph per shape)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; cases not started by then are left out (logged)")
    p.add_argument("--rep-ms", type=float, default=None, help="timing budget per measurement (ms)")
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


# --------------------------------------------------------------------------- cases


def make_cases(spec: OpSpec, args, device: torch.device, dtypes: Sequence[torch.dtype]) -> List[Case]:
    gpu = device.type == "cuda"
    cases: List[Case] = []
    if spec.family == "scan":
        scan = [tuple(s) for s in parse_shapes(args.scan_shapes)] if args.scan_shapes else (
            QUICK_SCAN if args.quick else GPU_SCAN if gpu else CPU_SCAN)  # fmt: skip
        for B, T in [s[:2] for s in scan]:
            cases.append(Case(spec.name, N=B * T, dtype=torch.float32, B=B, T=T))
        return cases
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    elif spec.family == "linear":
        shapes = list(QUICK_LINEAR if args.quick else CPU_LINEAR) if not gpu or args.quick else [
            (n, v) for n in GPU_NS for v in GPU_VS]  # fmt: skip
    else:
        ns, vs = (QUICK_NS, QUICK_VS) if args.quick else (GPU_NS, GPU_VS) if gpu else (CPU_NS, CPU_VS)
        shapes = [(n, v) for n in ns for v in vs]
    hs = [int(h) for h in _csv_list(args.hidden)] or list(GPU_HS if gpu else (512,))
    for dtype in dtypes:
        for shape in shapes:
            if spec.family == "linear":
                for H in ([shape[2]] if len(shape) == 3 else hs):
                    cases.append(Case(spec.name, N=shape[0], V=shape[1], H=H, dtype=dtype))
            else:
                cases.append(logits_case(spec.name, shape[0], shape[1], dtype))
    return cases


def logits_case(op: str, N: int, V: int, dtype: torch.dtype = torch.float32) -> Case:
    """An ``N x V`` case, laid out as ``B`` sequences of ``T = 1024`` tokens when ``N`` is a multiple of 1024 (else
    one sequence), for the ops whose inputs are ``[B, T, V]`` (``ppo_loss``)."""
    T = 1024 if N >= 1024 and N % 1024 == 0 else N
    return Case(op, N=N, V=V, dtype=dtype, B=N // T, T=T)


def shape_text(case: Case) -> str:
    if case.V == 0:
        return f"B={case.B} T={case.T}"
    return f"N={case.N} V={case.V}" + (f" H={case.H}" if case.H else "")


# --------------------------------------------------------------------------- measuring


def _outputs_grads(outs):
    return [torch.ones_like(o) for o in outs]


def step_fns(spec: OpSpec, provider, sets: List[Dict[str, torch.Tensor]], mode: str):
    """One callable per rotated input set for ``mode``; each returns nothing."""
    fns = []
    for inputs in sets:
        for name in spec.grad_names:
            inputs[name].requires_grad_(mode != "fwd")
            inputs[name].grad = None
        f = provider.build(inputs)
        leaves = [inputs[n] for n in spec.grad_names]
        if mode == "fwd":

            def step(f=f):
                with torch.no_grad():
                    f()

        elif mode == "fwd+bwd":

            def step(f=f, leaves=leaves):
                outs = f()
                torch.autograd.backward(outs, _outputs_grads(outs))
                for leaf in leaves:
                    leaf.grad = None

        else:
            outs = f()
            grads = _outputs_grads(outs)

            def step(outs=outs, grads=grads, leaves=leaves):
                torch.autograd.backward(outs, grads, retain_graph=True)
                for leaf in leaves:
                    leaf.grad = None

        fns.append(step)
    return fns


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "can't allocate memory" in text


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(spec: OpSpec, case: Case, name: str, sets, mode: str, device, timer) -> Dict[str, object]:
    provider = spec.providers[name]
    fns = None
    try:
        fns = step_fns(spec, provider, sets, mode)
        timing = common.time_fn(fns, device, timer)
        peak = common.peak_extra_bytes(fns[0], device)
        return {"status": "ok", "timing": timing, "peak": peak}
    except Exception as exc:  # noqa: BLE001 - a provider failing must not stop the suite
        status = "oom" if _is_oom(exc) else "error"
        return {"status": status, "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:240] if str(exc) else ''}"}
    finally:
        del fns
        for inputs in sets:
            for n in spec.grad_names:
                inputs[n].grad = None
        _cleanup(device)


def _n_sets(spec: OpSpec, case: Case, device: torch.device) -> int:
    one = spec.bytes_moved(case, "fwd")
    l2 = common.l2_bytes(device)
    if one >= 4 * l2:
        return 1
    return int(min(8, math.ceil(4 * l2 / max(one, 1.0))))


# --------------------------------------------------------------------------- main


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuse malformed values with a usage error naming the flag, before any file is written or timed."""
    for flag, text in (("--shapes", args.shapes), ("--scan-shapes", args.scan_shapes)):
        if text is not None:
            try:
                parse_shapes(text)
            except argparse.ArgumentTypeError as exc:
                parser.error(str(exc).replace("--shapes", flag, 1))
    if args.hidden is not None:
        try:
            hidden = [int(h) for h in _csv_list(args.hidden)]
        except ValueError:
            hidden = [0]
        if not hidden or min(hidden) < 1:
            parser.error(f"--hidden must be a comma list of positive integers, got {args.hidden!r}")
    for flag, value in (("--threads", args.threads), ("--max-reps", args.max_reps)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--time-budget", args.time_budget), ("--rep-ms", args.rep_ms)):
        if value is not None and not value > 0:
            parser.error(f"{flag} must be > 0, got {value}")
    if args.device is not None and device_kind(args.device) is None:
        parser.error(f"--device must be cpu or cuda (cuda:N), got {args.device!r}")
    known_ops = all_ops()
    unknown = [o for o in _csv_list(args.ops) if o not in known_ops and o not in ("trainer", "all")]
    if unknown:
        parser.error(f"unknown --ops {unknown}; known: {sorted(known_ops) + ['trainer']} (or 'all')")
    if args.mode != "all" and any(m not in MODES for m in _csv_list(args.mode)):
        parser.error(f"--mode must be among {MODES} (or 'all'), got {args.mode!r}")
    if any(p not in ALL_PROVIDERS for p in _csv_list(args.providers)):
        parser.error(f"--providers must be among {PROVIDER_ORDER}, got {args.providers!r}")
    if any(d not in DTYPES for d in _csv_list(args.dtypes)):
        parser.error(f"--dtypes must be among {sorted(DTYPES)}, got {args.dtypes!r}")


def _resolve_device(text: Optional[str]) -> torch.device:
    """``--device`` (default: CUDA when there is a GPU, else the CPU); CUDA without a GPU ends the run, saying so."""
    try:
        return resolve_device(text or "auto")
    except ValueError as err:
        raise SystemExit(f"--device: {err}") from None


def _run_trainer(args, log) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.exists(os.path.join(here, "bench_trainer.py")):
        log("trainer: skipped (benchmarks/bench_trainer.py does not exist yet)")
        return 0
    from . import bench_trainer  # type: ignore[attr-defined]

    entry = getattr(bench_trainer, "main", None)
    if entry is None:
        log("trainer: skipped (benchmarks/bench_trainer.py has no main(argv))")
        return 0
    argv = ["--out", args.out] + (["--device", args.device] if args.device else [])
    argv += ["--threads", str(args.threads)] if args.threads else []
    log(f"trainer: benchmarks.bench_trainer.main({argv})")
    try:
        return int(entry(argv) or 0)
    except SystemExit as exc:  # argparse of the trainer bench rejecting an option
        return int(exc.code or 0)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    env = common.environment(device)
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = os.path.join(args.out, env["device_slug"])
    os.makedirs(out_dir, exist_ok=True)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; keep the suite usable without it
        tqdm = None
    log_file = open(os.path.join(out_dir, "run.log"), "w" if args.fresh else "a")

    def sink(msg: str) -> None:
        if tqdm:
            tqdm.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log = common.Logger(sink=sink)
    try:
        return _main(args, device, env, run_id, out_dir, log, tqdm, argv)
    finally:
        log_file.write("\n")
        log_file.close()


def _main(args, device, env, run_id, out_dir, log, tqdm, argv) -> int:
    log(f"# rlhf_kernels benchmark run {run_id}")
    log(f"# {common.stamp_line(env)} | liger {env['liger']} | python {env['python']}")
    log(f"# argv: {' '.join(sys.argv[:1] + list(argv if argv is not None else sys.argv[1:]))}")
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()
        log(f"# load average before the run: {' '.join(f'{x:.2f}' for x in load)} ({os.cpu_count()} CPUs, "
            f"torch uses {torch.get_num_threads()} threads)")  # fmt: skip
        if device.type == "cpu" and torch.get_num_threads() > 1 and load[0] > 0.75 * (os.cpu_count() or 1):
            log("# warning: the machine is busy; multi-threaded CPU timings suffer OpenMP stalls (try --threads 1)")
    from . import providers as _providers

    if args.compile_static:
        _providers.COMPILE_DYNAMIC = False

    ops_wanted = _csv_list(args.ops)
    if ops_wanted == ["all"]:
        ops_wanted = list(DEFAULT_OPS + EXTRA_OPS)
    specs = all_ops()
    status = 0
    modes = list(MODES) if args.mode == "all" else _csv_list(args.mode)  # names checked by check_args
    providers = [p for p in PROVIDER_ORDER if p in _csv_list(args.providers)]
    dtype_names = _csv_list(args.dtypes) or (["bf16", "fp32"] if device.type == "cuda" else ["fp32"])
    dtypes = [DTYPES[d] for d in dtype_names]

    timer = common.TimerConfig(warmup_ms=10.0, rep_ms=60.0, min_reps=5, max_reps=50)
    if device.type == "cpu":
        timer = common.TimerConfig(warmup_ms=0.0, rep_ms=400.0, min_reps=3, max_reps=15, min_warmup=1)
    if args.quick:
        timer = common.TimerConfig(warmup_ms=0.0, rep_ms=20.0, min_reps=3, max_reps=10, min_warmup=1)
    if args.rep_ms is not None:
        timer.rep_ms = args.rep_ms
    if args.max_reps is not None:
        timer.max_reps = args.max_reps
    torch.manual_seed(args.seed)

    bench_ops = [o for o in ops_wanted if o != "trainer"]
    copy_bw = common.copy_bandwidth(device, timer) if bench_ops else float("nan")
    if bench_ops:
        log(f"# copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write, {device.type} copy_, best of >= 10)")
    mm: Dict[str, float] = {}
    if any(specs[o].flops for o in bench_ops):
        for dtype in dtypes:
            mm[str(dtype)] = common.matmul_throughput(device, dtype, timer)
            log(f"# matmul throughput {str(dtype).replace('torch.', '')}: {mm[str(dtype)] / 1e12:.2f} TFLOP/s")

    plan = []  # (spec, case, modes)
    for op in bench_ops:
        spec = specs[op]
        op_modes = [m for m in modes if m in spec.modes]
        for m in modes:
            if m not in spec.modes:
                log(f"{op}: mode {m} skipped (the op has no gradient)")
        if not op_modes:
            continue
        for case in make_cases(spec, args, device, dtypes):
            plan.append((spec, case, op_modes))
    total = sum(len(m) * len(providers) for _, _, m in plan)
    bar = tqdm(total=total, desc="bench", file=sys.stderr, disable=args.no_progress or tqdm is None, dynamic_ncols=True) if tqdm else None

    rows: List[common.Row] = []
    done: Dict[tuple, Dict[str, object]] = {}  # --resume: rows already in results.csv, by common.key_of
    if args.resume and not args.fresh:
        done = {common.key_of(r): r for r in report.read_csv(os.path.join(out_dir, "results.csv"))}
    meta = {"env": env, "run_id": run_id, "copy_gbps": copy_bw / 1e9,
            "matmul_tflops": {k.replace("torch.", ""): v / 1e12 for k, v in mm.items()},
            "argv": list(argv if argv is not None else sys.argv[1:]), "timer": vars(timer),
            "compile_dynamic": _providers.COMPILE_DYNAMIC, "chunk_rows": _providers.CHUNK_ROWS,
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}  # fmt: skip
    skipped_reasons: Dict[Tuple[str, str], str] = {}
    started = time.monotonic()
    left_out = 0
    for spec, case, op_modes in plan:
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            left_out += 1
            log(f"{spec.name} {case.dtype_name} {shape_text(case)}: left out (time budget {args.time_budget:.0f} s spent)")
            if bar:
                bar.update(len(op_modes) * len(providers))
            continue
        if done and all((spec.name, m, case.dtype_name, shape_text(case), p) in done for m in op_modes for p in providers):
            log(f"{spec.name} {case.dtype_name} {shape_text(case)}: already in results.csv (--resume)")
            if bar:
                bar.update(len(op_modes) * len(providers))
            continue
        cell_started = time.monotonic()
        try:
            n_sets = _n_sets(spec, case, device)
            sets = [spec.make_inputs(case, device, args.seed + k) for k in range(n_sets)]
        except Exception as exc:  # noqa: BLE001 - inputs alone may not fit
            log(f"{spec.name} {case.dtype_name} {shape_text(case)}: inputs failed ({type(exc).__name__}: {exc}); skipped")
            _cleanup(device)
            if bar:
                bar.update(len(op_modes) * len(providers))
            continue
        for mode in op_modes:
            group: List[common.Row] = []
            kept: List[Dict[str, object]] = []  # --resume: this group's rows from results.csv, for the ratios
            for name in providers:
                previous = done.get((spec.name, mode, case.dtype_name, shape_text(case), name))
                if previous is not None:  # measured by an earlier run (one cut short keeps its finished providers)
                    kept.append(previous)
                    if bar:
                        bar.update(1)
                    continue
                if bar:
                    bar.set_postfix_str(f"{spec.name} {mode} {case.dtype_name} {shape_text(case)} {name}", refresh=False)
                base = dict(run_id=run_id, op=spec.name, mode=mode, dtype=case.dtype_name, N=case.N,
                            V=case.V, H=case.H, shape=shape_text(case), provider=name,
                            copy_gbps=copy_bw / 1e9, mm_tflops=mm.get(str(case.dtype), float("nan")) / 1e12,
                            device=env["device"], torch=env["torch"], triton=env["triton"], cuda=env["cuda"],
                            commit=env["commit"], date=env["date"])  # fmt: skip
                reason = spec.providers[name].reason(case, device)
                if reason is not None:
                    key = (spec.name, name)
                    if key not in skipped_reasons:
                        skipped_reasons[key] = reason
                        log(f"{spec.name}: {name} skipped: {reason}")
                    group.append(common.Row(status="skipped", note=reason, **base))
                    if bar:
                        bar.update(1)
                    continue
                result = measure(spec, case, name, sets, mode, device, timer)
                if result["status"] != "ok":
                    log(f"{spec.name} {mode} {case.dtype_name} {shape_text(case)} {name}: {result['status']} {result['note']}")
                    group.append(common.Row(status=result["status"], note=result["note"], **base))
                    if result["status"] == "error":
                        status = 1 if name in ("triton", "cuda", "cpu") else status
                else:
                    t = result["timing"]
                    row = common.Row(status="ok", ms=t.median_ms, ms_p20=t.p20_ms, ms_p80=t.p80_ms, reps=t.reps,
                                     peak_mb=result["peak"] / 2**20, **base)  # fmt: skip
                    row.gbps = spec.bytes_moved(case, mode) / (t.median_ms * 1e-3) / 1e9
                    row.pct_bw = 100.0 * row.gbps / (copy_bw / 1e9)
                    if spec.flops is not None:
                        row.tflops = spec.flops(case, mode) / (t.median_ms * 1e-3) / 1e12
                        row.pct_mm = 100.0 * row.tflops / row.mm_tflops
                    group.append(row)
                if bar:
                    bar.update(1)
                # written after every provider: a run cut short (time limit, SIGINT) keeps what it measured
                report.write_all(out_dir, rows + group, meta, fresh=args.fresh, plots=False, log=log)
            if kept:
                log(f"{spec.name} {mode} {case.dtype_name} {shape_text(case)}: "
                    f"{', '.join(str(k['provider']) for k in kept)} already in results.csv (--resume)")
            ok = [r for r in group if r.status == "ok"]
            others = [(o.provider, o.ms) for o in ok] + [
                (str(k["provider"]), float(k["ms"])) for k in kept if k.get("status") == "ok" and float(k["ms"]) > 0]
            for r in ok:
                r.ratios = ";".join(f"{p}={ms / r.ms:.4g}" for p, ms in others if p != r.provider)
            for r in group:
                if r.status == "ok":
                    log(f"{spec.name:<16} {mode:<7} {case.dtype_name:<8} {shape_text(case):<24} {r.provider:<8} "
                        f"{r.ms:9.3f} ms [{r.ms_p20:.3f}-{r.ms_p80:.3f}] {r.gbps:8.1f} GB/s {r.pct_bw:5.1f}% BW "
                        f"peak {r.peak_mb:9.1f} MB  {r.ratios}")  # fmt: skip
            rows.extend(group)
        del sets
        _cleanup(device)
        # wall time per case, inputs included: what a time-boxed GPU session can plan with
        log(f"# {spec.name} {case.dtype_name} {shape_text(case)}: {time.monotonic() - cell_started:.1f} s")
    if bar:
        bar.close()
    if left_out:
        log(f"# {left_out} case(s) left out by --time-budget; run again with the same --out to add them")

    if rows or (args.resume and bench_ops and os.path.exists(os.path.join(out_dir, "results.csv"))):
        written = report.write_all(out_dir, rows, meta, fresh=args.fresh, plots=not args.no_plots, log=log)
        log(f"# wrote {', '.join(sorted(os.path.basename(w) for w in written))} to {out_dir}")
    if "trainer" in ops_wanted:
        status = max(status, _run_trainer(args, log))
    return status


if __name__ == "__main__":
    sys.exit(main())
