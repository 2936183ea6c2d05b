"""Tuning sweep for the Triton kernels (GPU only): block sizes, warps and the forward formulation.

    python -m benchmarks.tune_triton [--n 8192] [--v 151936] [--dtype bf16]

Times, with ``triton.testing.do_bench`` (median), at one large bandwidth-bound shape:

* first, where the rest of ``ppo_loss`` / ``logprobs`` time goes: the kernel alone, then the op forward and
  forward + backward on each backend under each ``RLHF_KERNELS_VALIDATE`` mode (a host sync, queued, none),
  and with none the CPU time to issue each call (``_host_us``: above the GPU time, the op is host-bound);
* the logprobs forward as shipped (``_common.row_softmax_stats``) at every autotune candidate
  ``BLOCK_V x LANES_V x warps`` (``_common._ROW_FWD_CANDIDATES``: state as wide as the block, and the
  tiled ones with 256 lanes per warp). Earlier sweeps (H100, ``benchmarks/results/nvidia-h100-80gb-hbm3/logs/run2``
  and ``run3``) compared the per-lane max this kernel used to keep (1024x4 84% of the copy bandwidth, 4096x8
  61%) with the block-max state it keeps now (2048x4 91%);
* the logprobs backward at several ``(BLOCK_V, warps)`` and the kl_divergence forward at every candidate
  (``_common._TWO_ROW_FWD_CANDIDATES``).

Every variant is checked against the shipped kernel's outputs before it is timed. The numbers feed the
table in ``rlhf_kernels/triton/_common.py:vocab_config``; the log of each run is kept under
``benchmarks/results/<device>/logs/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

from rlhf_kernels.triton import _common
from rlhf_kernels.triton import kl as tkl
from rlhf_kernels.triton import logprobs as tlp


def fwd_shipped(rows, y, block, lanes, warps):
    B, T, V = rows.shape
    outs = [torch.empty((B, T), device=rows.device, dtype=torch.float32) for _ in range(3)]
    tlp._logprobs_fwd_kernel[(B * T,)](rows, y, *outs, T, V, rows.stride(0), rows.stride(1), 1.0, -100,
                                       BLOCK_V=block, LANES_V=lanes, num_warps=warps)
    return outs


def bwd_cfg(rows, y, stats, block, warps):
    B, T, V = rows.shape
    logp, ent, lse = stats
    g = torch.ones_like(logp)
    grad = torch.empty_like(rows)
    tlp._logprobs_bwd_kernel[(B * T, triton.cdiv(V, block))](
        grad, rows, y.reshape(-1), g.reshape(-1), g.reshape(-1), lse.reshape(-1), ent.reshape(-1), T, V,
        rows.stride(0), rows.stride(1), grad.stride(0), grad.stride(1), 1.0, -100, BLOCK_V=block, num_warps=warps)
    return grad


def kl_cfg(rows, ref, block, lanes, warps):
    B, T, V = rows.shape
    outs = [torch.empty((B, T), device=rows.device, dtype=torch.float32) for _ in range(3)]
    tkl._kl_divergence_fwd_kernel[(B * T,)](rows, ref, *outs, T, V, rows.stride(0), rows.stride(1), ref.stride(0),
                                            ref.stride(1), 1.0, BLOCK_V=block, LANES_V=lanes, num_warps=warps)
    return outs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_triton needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    N, V = args.n, args.v
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = (torch.randn((1, N, V), device="cuda", generator=gen) * 3).to(dtype)
    y = torch.randint(0, V, (1, N), device="cuda", generator=gen)
    nbytes = rows.numel() * rows.element_size()
    src = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="min")
    bw = 2 * src.numel() / copy_ms / 1e6  # GB/s (read + write)
    print(f"# {torch.cuda.get_device_name()} | triton {triton.__version__} | torch {torch.__version__} | "
          f"N={N} V={V} {args.dtype} | copy {bw:.0f} GB/s", flush=True)

    def report(name, ms, moved):
        gbs = moved / ms / 1e6
        print(f"{name:<42} {ms:8.3f} ms {gbs:8.0f} GB/s {100 * gbs / bw:6.1f}% BW", flush=True)

    # First, as a short session may cut the sweeps below: where the rest of the op time goes. The kernels
    # alone, then the ops on each backend under each RLHF_KERNELS_VALIDATE mode (1: a host sync per target
    # check; async: queued, ops/_deferred_checks.py; 0: none).
    import rlhf_kernels as rk
    from rlhf_kernels.triton import ppo as tppo

    old = torch.randn((1, N), device="cuda", generator=gen) - 3
    adv = torch.randn((1, N), device="cuda", generator=gen)
    mask = torch.ones((1, N), device="cuda")
    report("logprobs launcher", do_bench(lambda: tlp.logprobs_fwd(rows, y, 1.0, -100), return_mode="median"), nbytes)
    report("ppo launcher", do_bench(lambda: tppo.ppo_term_fwd(rows, y, old, adv, None, 1.0, -100, 0.0, "k3", 0.0,
                                                              0.2, 0.2, None), return_mode="median"), nbytes)
    leaf = rows.clone().requires_grad_(True)
    for backend in ("triton", "cuda"):
        calls = {
            "rk.logprobs fwd": (lambda: rk.logprobs(rows, y, return_entropy=True, backend=backend), nbytes),
            "rk.ppo_loss fwd": (lambda: rk.ppo_loss(rows, y, old, adv, mask, backend=backend), nbytes),
            "rk.logprobs fwd+bwd": (lambda: _step(leaf, lambda x: rk.logprobs(x, y, backend=backend).sum()), 3 * nbytes),
            "rk.ppo_loss fwd+bwd": (lambda: _step(leaf, lambda x: rk.ppo_loss(x, y, old, adv, mask, backend=backend).loss),
                                    3 * nbytes),
        }
        for name, (call, moved) in calls.items():
            for mode in ("1", "async", "0"):
                os.environ["RLHF_KERNELS_VALIDATE"] = mode
                try:
                    ms = do_bench(call, return_mode="median")
                except Exception as exc:  # noqa: BLE001 - e.g. an extension built without CUDA kernels
                    print(f"{name} [{backend}, validate={mode}]: {type(exc).__name__}: {exc}", flush=True)
                    break
                report(f"{name} [{backend}, validate={mode}]", ms, moved)
                if mode == "0":
                    print(f"{'':<42} host {_host_us(call):8.1f} us per call (CPU time to issue it)", flush=True)
            rk.check_pending_targets()
    os.environ.pop("RLHF_KERNELS_VALIDATE", None)
    leaf = None  # the sweeps need the memory
    torch.cuda.empty_cache()
    ref_out = fwd_shipped(rows, y, 2048, 2048, 4)
    for block, lanes, warps in _common._ROW_FWD_CANDIDATES + ((4096, 4096, 8), (8192, 8192, 8)):
        if block < 512:
            continue
        out = fwd_shipped(rows, y, block, lanes, warps)
        ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(out, ref_out))
        report(f"fwd shipped     {block}x{lanes}x{warps}{'' if ok else ' MISMATCH'}",
               do_bench(lambda: fwd_shipped(rows, y, block, lanes, warps), return_mode="median"), nbytes)
    ref_grad = bwd_cfg(rows, y, ref_out, 4096, 8)
    for block, warps in [(2048, 1), (2048, 2), (1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8),
                         (8192, 16)]:
        ok = torch.equal(bwd_cfg(rows, y, ref_out, block, warps), ref_grad)
        report(f"bwd             {block}x{warps}{'' if ok else ' MISMATCH'}",
               do_bench(lambda: bwd_cfg(rows, y, ref_out, block, warps), return_mode="median"), 2 * nbytes)
    del ref_grad
    torch.cuda.empty_cache()
    ref_rows = (torch.randn((1, N, V), device="cuda", generator=gen) * 3).to(dtype)
    kl_ref = kl_cfg(rows, ref_rows, 2048, 2048, 8)
    for block, lanes, warps in _common._TWO_ROW_FWD_CANDIDATES:
        if block < 512:
            continue
        same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-4)
                   for a, b in zip(kl_cfg(rows, ref_rows, block, lanes, warps), kl_ref))
        report(f"kl fwd          {block}x{lanes}x{warps}{'' if same else ' MISMATCH'}",
               do_bench(lambda: kl_cfg(rows, ref_rows, block, lanes, warps), return_mode="median"), 2 * nbytes)
    ref_rows = kl_ref = None  # freed (not del: the timed lambdas above name it)
    torch.cuda.empty_cache()

    for name, tuned in (("logprobs", tlp._logprobs_fwd_tuned), ("ppo", tppo._ppo_fwd_tuned)):
        print(f"# autotuned {name} forward: {getattr(tuned, 'best_config', None)}")
    return 0


def _host_us(call, calls: int = 20) -> float:
    """CPU microseconds to issue one ``call`` with the GPU idle at the start: 20 calls (about 100 launches, far
    below the launch queue's depth) timed on the host, then waited for. Above the call's GPU time the op is
    host-bound; the GPU then idles between kernels whatever the kernels do."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def _step(leaf: torch.Tensor, loss_of) -> None:
    """One training step of ``loss_of(leaf)``: forward, backward, gradient dropped."""
    leaf.grad = None
    loss_of(leaf).backward()
    leaf.grad = None


if __name__ == "__main__":
    sys.exit(main())
