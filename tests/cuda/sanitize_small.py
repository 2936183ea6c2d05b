"""Every cuda-backend kernel once, forward and backward, on small shapes: a run for compute-sanitizer.

    compute-sanitizer --tool memcheck python tests/cuda/sanitize_small.py
    compute-sanitizer --tool racecheck python tests/cuda/sanitize_small.py   # shared memory / clusters
    compute-sanitizer --tool initcheck python tests/cuda/sanitize_small.py

Shapes are chosen for the edges of the index math: odd V (rows start at every
16-byte misalignment), strided views, V smaller than one vector, several column
blocks in the backward, an ignored target and out-of-range targets with
validation off (never read), and each path of the fused PPO forward-with-gradient
(global re-read, shared-memory row, sm_90 cluster when the GPU has it; the last two also with their
slice filled by cp.async, RLHF_KERNELS_CUDA_PREFETCH=1, or by the TMA's bulk copies, =bulk, and the cluster
over 8 CTAs), with the forward kernels' CTA size at its defaults, then capped at 512 and 32 threads. Exits 1
if a result is not finite where it should be; the sanitizer reports memory errors.
"""

from __future__ import annotations

import os
import sys

import torch

os.environ["RLHF_KERNELS_VALIDATE"] = "0"  # out-of-range targets reach the kernels

import rlhf_kernels as rk  # noqa: E402
from rlhf_kernels import _ext  # noqa: E402
from rlhf_kernels.ops import ppo as ppo_ops  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available() or not _ext.has_cuda_kernels():
        print("needs a CUDA device and an extension built with CUDA kernels", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(0)
    failures = []
    # each dtype under another forward CTA size cap (RLHF_KERNELS_CUDA_FWD_THREADS): the kernels' defaults
    # (128 / 256 threads), 512 and 32
    for dtype, cap in ((torch.bfloat16, ""), (torch.float16, "512"), (torch.float32, "32")):
        os.environ["RLHF_KERNELS_CUDA_FWD_THREADS"] = cap
        for V in (1, 7, 33, 4097, 40000):
            full = (torch.randn(2, 6, V, device=dev) * 3).to(dtype)
            x = full[:, 1:]  # strided rows, odd offsets
            y = torch.randint(0, V, (2, 5), device=dev)
            y[0, 0] = -100
            y[1, 1] = V  # out of range: NaN logp, never dereferenced
            y[1, 2] = -7
            good = torch.ones_like(y, dtype=torch.bool)
            good[1, 1] = good[1, 2] = False
            tag = f"{dtype} V={V} cap={cap or 'default'}"

            xt = x.detach().clone().requires_grad_()
            logp, ent = rk.logprobs(xt, y, return_entropy=True, temperature=0.9, backend="cuda")
            (logp.nan_to_num(0.0).sum() + ent.sum()).backward()
            if not (torch.isfinite(logp[good]).all() and torch.isfinite(xt.grad).all()):
                failures.append(f"logprobs {tag}")

            r = (torch.randn(2, 5, V, device=dev)).to(dtype)
            xt = x.detach().clone().requires_grad_()
            rt = r.clone().requires_grad_()
            kl = rk.kl_divergence(xt, rt, backend="cuda")
            kl.sum().backward()
            if not (torch.isfinite(kl).all() and torch.isfinite(xt.grad).all() and torch.isfinite(rt.grad).all()):
                failures.append(f"kl_divergence {tag}")

            old = logp.detach().nan_to_num(-3.0) + 0.1
            adv = torch.randn(2, 5, device=dev)
            mask = torch.ones(2, 5, device=dev)
            mask[1, 1] = mask[1, 2] = 0
            for path in ("two-pass", "global", "l2", "shared", "cluster", "shared+prefetch", "cluster+prefetch",
                         "cluster+prefetch+8", "shared+bulk", "cluster+bulk", "cluster+bulk+8", "pipe", "pipe++8"):
                path, _, options = path.partition("+")
                prefetch, _, cluster = options.partition("+")
                os.environ["RLHF_KERNELS_CUDA_CLUSTER"] = cluster or "2"  # 8: each row over 8 CTAs
                if path not in ("two-pass", "global", "l2"):
                    plan = _ext.load().ppo_plan(V, str(dtype).replace("torch.", ""), ppo_ops.CUDA_PPO_PATHS[path],
                                                True, torch.cuda.current_device())
                    if plan[0] == "none":
                        continue
                os.environ["RLHF_KERNELS_CUDA_PPO"] = path
                os.environ["RLHF_KERNELS_CUDA_PREFETCH"] = {"prefetch": "1", "bulk": "bulk"}.get(prefetch, "0")
                xt = x.detach().clone().requires_grad_()
                out = rk.ppo_loss(xt, y, old, adv, mask, ref_logp=old, kl_coef=0.1, entropy_coef=0.01,
                                  dual_clip=3.0, backend="cuda")
                (out.loss * 0.5).backward()
                with torch.no_grad():
                    rk.ppo_loss(x, y, old, adv, mask, backend="cuda")  # the forward-only kernel
                if not (torch.isfinite(out.logp[good]).all() and torch.isfinite(xt.grad[good]).all()):
                    what = " ".join(w for w in (path, prefetch, cluster and f"cluster {cluster}") if w)
                    failures.append(f"ppo_loss {what} {tag}")
    torch.cuda.synchronize()
    print("ok" if not failures else "non-finite results: " + ", ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
