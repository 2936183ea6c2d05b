"""Tuning sweep for the CUDA C++ forward kernels (GPU only): CTA size, against Triton, at one large shape.

    python -m benchmarks.tune_cuda [--n 8192] [--v 151936] [--dtype bf16] [--threads 32,64,128,256,512]

Why: on an H100 the CUDA forwards ran at 70-78% of the copy bandwidth while Triton's logprobs
forward, with 128-thread programs, reached 91%. The CUDA kernels give each row one CTA of up to
512 threads (two per SM); when a CTA finishes its row the SM runs on half its loads until the next
one starts. ``RLHF_KERNELS_CUDA_FWD_THREADS`` caps that CTA size (read at each launch), so this
script times, for every cap, the ops through ``rk`` with target validation off:

* ``rk.logprobs`` forward with entropy (one read of the logits),
* ``rk.kl_divergence`` forward (two reads),
* ``rk.ppo_loss`` forward, and forward + backward on the fused path (one read + one write when
  the row stays on chip), the latter with the register sweep (``RLHF_KERNELS_CUDA_PREFETCH=0``) and with
  the on-chip slice filled by cp.async (the default since the H200's run 3) and by the TMA's bulk copies
  (``RLHF_KERNELS_CUDA_PREFETCH=bulk``, caps up to 256; timed last, after the summary), each checked
  bit-identical to the register sweep at the same cap, with the row split over clusters of at least 4 and 8 CTAs
  (``RLHF_KERNELS_CUDA_CLUSTER``), on the paths that re-read the row, ``global`` and ``l2``
  (``RLHF_KERNELS_CUDA_PPO``), and on the persistent cluster path ``pipe`` against ``cluster`` (same slices and CTA
  size, so checked bit-identical),

each against the Triton backend in the same run, as ms and % of the copy bandwidth measured here
(``triton.testing.do_bench``, median). Every cap's outputs are checked against the default's first.
The lowest time per op says which cap to make that kernel's default (``k*ForwardCap`` in
``csrc/cuda/row_common.cuh``; the first H200 sweep set 128 for logprobs and the PPO forward, 256 for
KL and the PPO forward-with-gradient); keep the log under ``benchmarks/results/<device>/logs/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Tuple

import torch

from rlhf_kernels.ops._dispatch import CUDA_FWD_THREADS

from .common import TimerConfig, copy_bandwidth

ENV = "RLHF_KERNELS_CUDA_FWD_THREADS"
PREFETCH = "RLHF_KERNELS_CUDA_PREFETCH"
CLUSTER = "RLHF_KERNELS_CUDA_CLUSTER"
PPO_PATH = "RLHF_KERNELS_CUDA_PPO"
BULK_MAX_THREADS = 256  # kBulkMaxThreads, csrc/cuda/row_bulk.cuh


def _cases(N: int, V: int, dtype: torch.dtype) -> List[Tuple[str, Callable[[str], object], int]]:
    """(name, fn(backend) -> outputs, bytes moved) for each op timed."""
    import rlhf_kernels as rk

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn((1, N, V), device="cuda", generator=gen) * 3).to(dtype)
    ref = (x.float() + torch.randn((1, N, V), device="cuda", generator=gen) * 0.3).to(dtype)
    y = torch.randint(0, V, (1, N), device="cuda", generator=gen)
    old = torch.randn((1, N), device="cuda", generator=gen) - 3
    adv = torch.randn((1, N), device="cuda", generator=gen)
    mask = torch.ones((1, N), device="cuda")
    leaf = x.clone().requires_grad_(True)
    nbytes = x.numel() * x.element_size()

    def ppo_step(backend: str):
        leaf.grad = None
        out = rk.ppo_loss(leaf, y, old, adv, mask, backend=backend)
        out.loss.backward()
        return out.loss.detach(), leaf.grad

    return [
        ("logprobs+ent fwd", lambda b: rk.logprobs(x, y, return_entropy=True, backend=b), nbytes),
        ("kl_divergence fwd", lambda b: rk.kl_divergence(x, ref, backend=b), 2 * nbytes),
        ("ppo_loss fwd", lambda b: rk.ppo_loss(x, y, old, adv, mask, backend=b).loss, nbytes),
        ("ppo_loss fwd+bwd", ppo_step, 2 * nbytes),
    ]


def _flat(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach().float()]
    return [t.detach().float() for t in out if isinstance(t, torch.Tensor)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--threads", default="32,64,128,256,512", help="caps to try (each one of %s)" % (CUDA_FWD_THREADS,))
    args = p.parse_args(argv)
    caps = [int(t) for t in args.threads.split(",") if t.strip()]
    bad = [c for c in caps if c not in CUDA_FWD_THREADS]
    if bad:
        p.error(f"--threads: {bad} not in {CUDA_FWD_THREADS}")
    if not torch.cuda.is_available():
        print("tune_cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    from rlhf_kernels import _ext

    if not _ext.has_cuda_kernels():
        print("tune_cuda: the extension was built without CUDA kernels", file=sys.stderr)
        return 2
    os.environ["RLHF_KERNELS_VALIDATE"] = "0"  # the kernels, not the target check's host sync
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    bw = copy_bandwidth(torch.device("cuda"), TimerConfig()) / 1e9  # GB/s, as benchmarks.run measures it
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | N={args.n} V={args.v} {args.dtype} | "
          f"copy {bw:.0f} GB/s | validation off", flush=True)
    cases = _cases(args.n, args.v, dtype)
    best: Dict[str, Tuple[float, str]] = {}

    def timed(name: str, label: str, call: Callable[[], object], moved: int, problem: str) -> float:
        """One row of the table: ``call``'s median time and % of the copy bandwidth (``problem``: "" when the
        outputs were right)."""
        ms = do_bench(call, return_mode="median")
        pct = 100 * moved / ms / 1e6 / bw
        print(f"{name:<20} {label:<16} {ms:8.3f} ms {pct:6.1f}% BW{'  ' + problem if problem else ''}", flush=True)
        return ms

    def consider(name: str, ms: float, setting: str) -> None:
        if name not in best or ms < best[name][0]:
            best[name] = (ms, setting)

    os.environ[PREFETCH] = "0"  # the cap sweep times the register sweep; the prefetch has its own rows below
    for name, fn, moved in cases:
        os.environ.pop(ENV, None)
        expected = _flat(fn("cuda"))
        runs = [("triton", None)] + [("cuda", cap) for cap in caps]
        for backend, cap in runs:
            if cap is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = str(cap)
            got = _flat(fn(backend))
            ok = all(torch.allclose(a, b, rtol=2e-3, atol=2e-3, equal_nan=True) for a, b in zip(got, expected))
            label = f"{backend}" + (f" cap {cap}" if cap else "")
            ms = timed(name, label, lambda: fn(backend), moved, "" if ok else "MISMATCH vs cuda default")
            if backend == "cuda" and ok:
                consider(name, ms, str(cap))
    os.environ.pop(ENV, None)
    # the fused forward-with-gradient with its shared-memory slice filled by cp.async (row_prefetch.cuh)
    name, fn, moved = cases[-1]

    def prefetched(mode: str, label: str, cap_limit: int) -> None:
        """Rows ``cuda <label> <cap>``: the fused step under RLHF_KERNELS_CUDA_PREFETCH=``mode`` at each cap up to
        ``cap_limit``, checked bit-identical to the register sweep at the same cap (same order, same bits)."""
        for cap in (c for c in caps if c <= cap_limit):
            os.environ[ENV] = str(cap)
            os.environ[PREFETCH] = "0"
            expected = _flat(fn("cuda"))
            os.environ[PREFETCH] = mode
            got = _flat(fn("cuda"))
            same = all(torch.equal(a, b) for a, b in zip(got, expected))
            ms = timed(name, f"cuda {label} {cap}", lambda: fn("cuda"), moved,
                       "" if same else "NOT BIT-IDENTICAL to the register sweep")
            if same:
                consider(name, ms, f"{cap} with RLHF_KERNELS_CUDA_PREFETCH={mode}")
        os.environ.pop(PREFETCH, None)
        os.environ.pop(ENV, None)

    prefetched("1", "prefetch", max(caps))
    # the cluster path over more CTAs per row (smaller slices, more CTAs per SM), prefetch on, at each cap
    os.environ.pop(ENV, None)
    expected = _flat(fn("cuda"))
    for size in ("4", "8"):
        for cap in caps:
            os.environ[ENV] = str(cap)
            os.environ[CLUSTER] = size
            got = _flat(fn("cuda"))
            ok = all(torch.allclose(a, b, rtol=2e-3, atol=2e-3, equal_nan=True) for a, b in zip(got, expected))
            ms = timed(name, f"cuda cluster>={size} {cap}", lambda: fn("cuda"), moved,
                       "" if ok else "MISMATCH vs cuda default")
            if ok:
                consider(name, ms, f"{cap} with RLHF_KERNELS_CUDA_CLUSTER={size}")
    os.environ.pop(CLUSTER, None)
    # the re-reading paths at each cap: global (any CTAs per SM) against l2 (CTAs per SM capped so the rows in
    # flight fit in L2, second sweep backwards); the same vectors per thread, so the same bits at the same cap
    for cap in caps:
        os.environ[ENV] = str(cap)
        runs = {}
        for path in ("global", "l2"):
            os.environ[PPO_PATH] = path
            runs[path] = _flat(fn("cuda"))
            ok = all(torch.allclose(a, b, rtol=2e-3, atol=2e-3, equal_nan=True) for a, b in zip(runs[path], expected))
            ms = timed(name, f"cuda {path} {cap}", lambda: fn("cuda"), moved, "" if ok else "MISMATCH vs cuda default")
            if ok:
                consider(name, ms, f"{cap} with RLHF_KERNELS_CUDA_PPO={path}")
        if not all(torch.equal(a, b) for a, b in zip(runs["global"], runs["l2"])):
            print(f"{name:<20} l2 {cap}: NOT BIT-IDENTICAL to global", flush=True)
    # the persistent cluster path (the next row's slice loaded while this row's gradient is written) against the
    # cluster path at each cap: with the same cluster size, the same slices and vectors per thread, so the same bits.
    # By default one CTA per SM; with clusters of 8 (half the slice) and caps up to 256, two CTAs fit per SM.
    for size in ("", "8"):
        for cap in caps:
            os.environ[ENV] = str(cap)
            os.environ[CLUSTER] = size or "2"
            runs = {}
            plans = {path: _ppo_plan(path, args.v, dtype) for path in ("cluster", "pipe")}
            for path, plan in plans.items():
                if plan[0] == "none":
                    print(f"{name:<20} {path} {cap}: cannot run here", flush=True)
                    continue
                os.environ[PPO_PATH] = path
                runs[path] = _flat(fn("cuda"))
                ok = all(torch.allclose(a, b, rtol=2e-3, atol=2e-3, equal_nan=True)
                         for a, b in zip(runs[path], expected))
                ms = timed(name, f"cuda {path}/{plan[1]} {cap}", lambda: fn("cuda"), moved,
                           "" if ok else "MISMATCH vs cuda default")
                if ok:
                    extra = f", {CLUSTER}={size}" if size else ""
                    consider(name, ms, f"{cap} with RLHF_KERNELS_CUDA_PPO={path}{extra}")
            if len(runs) == 2 and plans["cluster"][1:3] == plans["pipe"][1:3] and not all(
                    torch.equal(a, b) for a, b in zip(runs["cluster"], runs["pipe"])):
                print(f"{name:<20} pipe {cap}: NOT BIT-IDENTICAL to cluster", flush=True)
    os.environ.pop(PPO_PATH, None)
    os.environ.pop(CLUSTER, None)
    os.environ.pop(ENV, None)
    for name, (ms, cap) in best.items():
        print(f"# fastest cuda cap for {name}: {cap} ({ms:.3f} ms)")
    for line in _triton_choices():
        print(line, flush=True)
    # the opt-in TMA bulk copies (row_bulk.cuh; CTAs of at most BULK_MAX_THREADS threads) come last, after the
    # summary: a bulk kernel that traps ends this process's CUDA context, and must not take the other rows with it
    best.clear()
    prefetched("bulk", "bulk", BULK_MAX_THREADS)
    for name, (ms, cap) in best.items():
        print(f"# fastest bulk-copy cap for {name}: {cap} ({ms:.3f} ms)")
    return 0


def _ppo_plan(path: str, v: int, dtype: torch.dtype) -> tuple:
    """(path name or "none", CTAs per row, threads, shared memory) of the fused CUDA PPO ``path`` at this cap."""
    from rlhf_kernels import _ext
    from rlhf_kernels.ops.ppo import CUDA_PPO_PATHS

    return tuple(_ext.load().ppo_plan(v, str(dtype).replace("torch.", ""), CUDA_PPO_PATHS[path], True,
                                      torch.cuda.current_device()))


def _triton_choices() -> List[str]:
    """The configuration each Triton forward's autotuner settled on in this run (its ``triton`` rows above)."""
    from rlhf_kernels.triton import kl, logprobs, ppo

    lines = []
    for name, tuned in (("logprobs", logprobs._logprobs_fwd_tuned), ("kl_divergence", kl._kl_divergence_fwd_tuned),
                        ("ppo", ppo._ppo_fwd_tuned)):
        config = getattr(tuned, "best_config", None)
        if config is not None:
            kw = config.kwargs
            lines.append(f"# triton {name} forward autotuned: BLOCK_V={kw.get('BLOCK_V')} LANES_V={kw.get('LANES_V')} "
                         f"num_warps={config.num_warps}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
