"""Randomly drawn configurations of the per-token ops with kernels of their own, ``gae`` and ``kl_estimate``,
against the float64 oracle, element by element (DESIGN.md §5's rule, ``tolerance.assert_rows_match_oracle``).

The logits ops have ``test_random_configurations.py``; these two scan or map ``[B, T]`` tensors, and each case
draws at once what their fixed tests vary one at a time. GAE: batch and length (one step to 300, past a block of
sequences), the values' and the rewards' dtypes (a bf16 value head with float32 rewards), the mask (response
suffixes after a prompt, holes, empty rows, all ones, bool / float / int, fractional weights), γ and λ at their
ends (0, 1), strided inputs, sparse end-of-sequence rewards and large ones. The KL estimators: k1 / k2 / k3, mixed dtypes, a clamp
(small, large, exactly hit), log-probs from 0 to -1e4, reference log-probs near (k3's series), far (overflow)
and of probability 0 (-inf) on either side, and gradients to both inputs.

A failing case names its seed; to reproduce it, or to run many more::

    python -m tests.ops.test_random_small_ops --backend triton --first 0 --cases 2000

CPU tensors run ``gae``'s C++ kernel and both ops' Triton kernels under the interpreter; with a GPU,
``pytest -m gpu`` runs Triton (both) and the CUDA kernel (``gae``) on CUDA tensors.
"""

from __future__ import annotations

import random
import sys
from typing import List, Optional

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _ext
from rlhf_kernels import reference as R
from rlhf_kernels.ops._dispatch import triton_importable, triton_interpreting
from tests.random_cases import device_for, failures_of, seed_parser
from tests.tolerance import assert_rows_match_oracle, interpreter_bf16_allowance

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INF = float("inf")


def _strided(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the same values as a non-contiguous view (a column window, or a transposed buffer)."""
    kind = rng.choice(("contiguous", "contiguous", "window", "transposed"))
    if kind == "window":
        wide = torch.empty(t.shape[0], t.shape[1] + 3, dtype=t.dtype)
        wide[:, 1:-2] = t
        return wide[:, 1:-2]
    if kind == "transposed":
        return t.t().contiguous().t()
    return t


def _rounding_allowance(backend: str, dtype: torch.dtype, oracle: torch.Tensor) -> Optional[torch.Tensor]:
    """The interpreter's truncating float32 -> bf16 conversion (``tolerance.interpreter_bf16_allowance``)."""
    if backend == "triton" and INTERPRETED_TRITON and dtype == torch.bfloat16:
        return interpreter_bf16_allowance(oracle)
    return None


# ----------------------------------------------------------------------------- gae


def _gae_mask(rng: random.Random, B: int, T: int) -> torch.Tensor:
    kind = rng.choice(("suffix", "suffix", "holes", "ones", "empty rows", "weights"))
    steps = torch.arange(T)[None]
    if kind == "suffix":  # a prompt (masked) then a response of random length, then padding
        start = torch.randint(0, T, (B, 1))
        end = start + torch.randint(0, T + 1, (B, 1))
        mask = (steps >= start) & (steps < end)
    elif kind == "holes":
        mask = torch.rand(B, T) < 0.7
    elif kind == "ones":
        mask = torch.ones(B, T, dtype=torch.bool)
    elif kind == "empty rows":
        mask = torch.rand(B, T) < 0.8
        mask[torch.rand(B) < 0.5] = False
    else:  # per-token weights in [0, 1], zeros among them: the scan and both outputs are scaled by them
        return torch.rand(B, T) * (torch.rand(B, T) < 0.9)
    return mask.to(rng.choice((torch.bool, torch.float32, torch.int64)))


def gae_case(rng: random.Random, backend: str, device: torch.device) -> str:
    B = rng.choice((1, 2, 3, 7, 33, 70))
    T = rng.choice((1, 2, 7, 64, 129, 300))
    values_dtype = rng.choice(FLOAT_DTYPES + ((torch.float64,) if backend in ("cpu", "torch") else ()))
    rewards_dtype = values_dtype if rng.random() < 0.6 else rng.choice(FLOAT_DTYPES)
    gamma = rng.choice((1.0, 0.99, 0.9, 0.0))
    lam = rng.choice((0.95, 1.0, 0.0, 0.5))
    scale = rng.choice((1.0, 1.0, 100.0))
    rewards = torch.randn(B, T) * scale
    if rng.random() < 0.3:  # a sparse reward at the end of each sequence, as a reward model gives
        rewards = torch.zeros(B, T)
        rewards[:, -1] = torch.randn(B) * scale
    values = torch.randn(B, T) * rng.choice((0.1, 1.0, 10.0))
    mask = _gae_mask(rng, B, T)
    spoiled = rng.random() < 0.3
    if spoiled:  # padding holding NaN / ±inf rewards and values: a masked step must add nothing, anywhere
        junk = torch.tensor([float("nan"), float("inf"), float("-inf")])
        off = mask == 0
        rewards = torch.where(off, junk[torch.randint(3, (B, T))], rewards)
        values = torch.where(off, junk[torch.randint(3, (B, T))], values)
    rewards, values = _strided(rng, rewards.to(rewards_dtype)), _strided(rng, values.to(values_dtype))
    what = (f"gae/{backend}/{values_dtype},{rewards_dtype}/{B}x{T}/{mask.dtype}/gamma={gamma}/lam={lam}/x{scale}"
            f"{'/spoiled padding' if spoiled else ''}")
    adv, ret = rk.gae(rewards.to(device), values.to(device), mask.to(device), gamma=gamma, lam=lam, backend=backend)
    assert adv.dtype == values_dtype and ret.dtype == values_dtype and adv.shape == (B, T), what
    in_dtype = R.gae(rewards, values, mask, gamma=gamma, lam=lam)
    oracle = R.gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    for name, fast, ref, exact in zip(("advantages", "returns"), (adv, ret), in_dtype, oracle):
        assert_rows_match_oracle(fast.cpu(), ref, exact, values_dtype, f"{what}/{name}",
                                 allowance=_rounding_allowance(backend, values_dtype, exact))
        assert (fast.cpu()[mask == 0] == 0).all(), f"{what}/{name}: not zero where the mask is"
        assert torch.isfinite(exact).all(), f"{what}/{name}: the oracle is not finite"
    return what


# ----------------------------------------------------------------------------- kl_estimate


def _log_probs(rng: random.Random, shape: List[int]) -> torch.Tensor:
    """Log-probs of sampled tokens: mostly ordinary, some certain (0), some very unlikely, some of probability 0."""
    logp = -torch.exp(torch.randn(shape) * 1.5)
    if rng.random() < 0.5:
        special = torch.rand(shape)
        logp = torch.where(special < 0.03, torch.zeros(shape), logp)
        logp = torch.where((special >= 0.03) & (special < 0.05), torch.full(shape, -1e4), logp)
        logp = torch.where((special >= 0.05) & (special < 0.07), torch.full(shape, -INF), logp)
    return logp


def _in_range(in_dtype: torch.Tensor, oracle: torch.Tensor):
    """The oracle, with the reference's infinities where its dtype overflows (exp(d) past float32's range, a
    derivative past float16's 65504): any code of that dtype is infinite there. Also returns where that is."""
    beyond = torch.isfinite(oracle) & torch.isinf(in_dtype)
    return torch.where(beyond, in_dtype.double(), oracle), beyond


def kl_estimate_case(rng: random.Random, backend: str, device: torch.device) -> str:
    shape = [rng.randrange(1, 6) for _ in range(rng.choice((1, 2, 2, 3)))]
    if rng.random() < 0.2:
        shape = [rng.choice((1000, 4097))]  # more than one program's block
    dtype = rng.choice(FLOAT_DTYPES)
    ref_dtype = dtype if rng.random() < 0.7 else rng.choice(FLOAT_DTYPES)
    estimator = rng.choice(("k1", "k2", "k3"))
    clamp = rng.choice((None, None, 0.3, 10.0, 1e-3))
    logp = _log_probs(rng, shape)
    spread = rng.choice((1e-4, 1e-2, 0.3, 3.0, 100.0))  # 1e-4: k3's series; 100: exp(d) past float32's range
    ref = logp.clamp_min(-1e4) + torch.randn(shape) * spread
    ref = torch.where(torch.rand(shape) < 0.03, torch.full(shape, -INF), ref).clamp_max(0.0)
    if clamp is not None and rng.random() < 0.3:  # some estimates exactly on the clamp (k1 = ±clamp)
        on = torch.rand(shape) < 0.3
        ref = torch.where(on & torch.isfinite(logp), logp - clamp, ref)
    logp, ref = logp.to(dtype), ref.to(ref_dtype)
    weights = torch.randn(shape, dtype=torch.float64)
    what = f"kl_estimate/{backend}/{dtype},{ref_dtype}/{shape}/{estimator}/clamp={clamp}/spread={spread}"

    def run(fn, a, b):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        k = fn(a, b)
        grads = torch.autograd.grad((k.double().cpu() * weights).sum(), (a, b), allow_unused=True)
        return k.detach().cpu(), [torch.zeros(t.shape, dtype=t.dtype) if g is None else g.cpu()
                                  for g, t in zip(grads, (a, b))]

    fast = run(lambda a, b: rk.kl_estimate(a, b, estimator, clamp, backend=backend), logp.to(device), ref.to(device))
    in_dtype = run(lambda a, b: R.kl_estimate(a, b, estimator, clamp), logp, ref)
    oracle = run(lambda a, b: R.kl_estimate(a, b, estimator, clamp), logp.double(), ref.double())
    out_dtype = torch.promote_types(dtype, ref_dtype)
    assert fast[0].dtype == out_dtype, what
    expected, beyond = _in_range(in_dtype[0], oracle[0])
    assert_rows_match_oracle(fast[0], in_dtype[0], expected, out_dtype, f"{what}/kl",
                             allowance=_rounding_allowance(backend, out_dtype, expected))
    # The derivatives where the estimate is a number within the dtype's range: a NaN estimate (k3 at logp = -inf,
    # whose exp(d) - d is inf - inf) has no gradient to compare. An infinite estimate cut by the clamp has the
    # saturated clamp's derivative, 0, which the oracle's autograd makes NaN (the clamp's zero times the
    # estimator's infinite derivative): the kernels must give exactly 0 there.
    compared = (torch.isfinite(expected) | torch.isinf(oracle[0])) & ~beyond
    for i, (name, dt) in enumerate((("dlogp", dtype), ("dref", ref_dtype))):
        assert fast[1][i].dtype == dt, f"{what}/{name}"
        saturated = compared & torch.isnan(oracle[1][i]) & (oracle[0].abs() == clamp)
        assert (fast[1][i][saturated] == 0).all(), f"{what}/{name}: not 0 where the clamp cuts an infinite estimate"
        kept = compared & ~saturated
        grad_expected = _in_range(in_dtype[1][i], oracle[1][i])[0][kept]
        assert_rows_match_oracle(fast[1][i][kept], in_dtype[1][i][kept], grad_expected, dt, f"{what}/{name}",
                                 allowance=_rounding_allowance(backend, dt, grad_expected))
    return what


CASES = {"gae": gae_case, "kl_estimate": kl_estimate_case}
IMPLEMENTED = {"gae": ("cpu", "torch", "triton", "cuda"), "kl_estimate": ("torch", "triton")}


def run_case(seed: int, op: str, backend: str, device: torch.device) -> str:
    """Draws case ``seed`` of ``op`` and checks it on ``backend``; returns its description."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    return CASES[op](rng, backend, device)


# ----------------------------------------------------------------------------- pytest

INTERPRETED_TRITON = triton_importable() and triton_interpreting()
CPU_CASES = 200  # the C++ scan: a few ms each
TRITON_CPU_CASES = 100  # the interpreter: ~0.1 s each
GPU_CASES = 60


@pytest.mark.fuzz
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.skipif(not _ext.available(), reason="the C++ extension is not built")
@pytest.mark.parametrize("seed", range(CPU_CASES))
def test_random_gae_on_the_cpu_kernel(seed):
    run_case(seed, "gae", "cpu", torch.device("cpu"))


@pytest.mark.fuzz
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.skipif(not INTERPRETED_TRITON, reason="the Triton kernels run on CPU tensors under TRITON_INTERPRET=1")
@pytest.mark.parametrize("seed", range(TRITON_CPU_CASES))
@pytest.mark.parametrize("op", sorted(CASES))
def test_random_configuration_triton_interpreted(op, seed):
    pytest.importorskip("triton")
    run_case(seed, op, "triton", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.fuzz
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("seed", range(GPU_CASES))
@pytest.mark.parametrize("op,backend", [("gae", "triton"), ("gae", "cuda"), ("kl_estimate", "triton")])
def test_random_configuration_on_the_gpu(op, backend, seed):
    if backend == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip("the extension was built without its CUDA kernels")
    run_case(seed, op, backend, torch.device("cuda"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = seed_parser(__doc__.split("\n\n")[0], backend="triton", cases=500)
    parser.add_argument("--op", choices=sorted(CASES), action="append", help="default: both")
    args = parser.parse_args(argv)
    device = device_for(args)
    failures = runs = 0
    for op in args.op or sorted(CASES):
        if args.backend not in IMPLEMENTED[op]:
            print(f"{op}: no {args.backend} backend, skipped")
            continue
        seeds = range(args.first, args.first + args.cases)
        failures += failures_of(lambda seed: run_case(seed, op, args.backend, device), seeds, f"{op} ")
        runs += len(seeds)
    print(f"{runs} cases on {args.backend} ({device}), {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
