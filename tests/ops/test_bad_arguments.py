"""Every public op, called with one argument spoiled at random: a clear error naming it, or a correct call.

DESIGN.md §2: bad input raises ``ValueError`` / ``TypeError`` naming the argument; nothing crashes. Each case
takes a valid call of one op and spoils one argument, drawn from a seed: a tensor with a dimension more or
less, a wrong size, an integer / bool / complex / float64 / float16 dtype, the meta device, a non-unit last
stride, an empty dimension, ``None`` or a Python list; an option set to NaN, ±inf, 0, -1, a string, ``None``,
a bool, a tensor or a huge integer. The call must either run (forward and backward: many spoilings are legal
inputs, e.g. float64 or a strided view) or raise ``ValueError`` / ``TypeError`` whose message names the
argument. Any other exception (an ``AttributeError`` or ``OverflowError`` from deep inside, a C++ error) fails.
Before these checks the options went through ``float()`` / ``int()`` / ``.strip()`` unguarded: a string
``dual_clip`` raised "could not convert string to float", a float ``chunk_by`` an ``AttributeError``, an
infinite ``ignore_index`` an ``OverflowError`` (``ops/_checks.check_number`` and friends now).

To run more seeds: ``python -m tests.ops.test_bad_arguments --backend cpu --cases 20000``.
"""

from __future__ import annotations

import random
import sys
import warnings
from typing import List, Optional

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _ext
from rlhf_kernels.ops._dispatch import triton_importable, triton_interpreting
from tests.random_cases import device_for, failures_of, seed_parser

B, T, V, H = 2, 3, 11, 5


def valid_call(op: str, device: torch.device):
    """``(tensors, options)`` of a valid call of ``rk.<op>`` on ``device``: the tensors positional, the options by
    keyword."""
    lp = -torch.rand(B, T)
    mask = torch.ones(B, T)
    hidden, weight = torch.randn(B * T, H), torch.randn(V, H)
    targets = torch.randint(0, V, (B, T))
    ppo = dict(ref_logp=-torch.rand(B, T), kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, clip_low=0.2,
               clip_high=0.2, dual_clip=3.0, temperature=1.0, loss_agg="token-mean", ignore_index=-100)
    linear = dict(bias=torch.randn(V), temperature=1.0, ignore_index=-100, chunk_size=None, chunk_by=None)
    calls = {
        "logprobs": ((torch.randn(B, T, V), targets), dict(temperature=1.0, ignore_index=-100, return_entropy=True)),
        "kl_divergence": ((torch.randn(B, T, V), torch.randn(B, T, V)), dict(temperature=1.0, mask=mask)),
        "kl_estimate": ((lp, -torch.rand(B, T)), dict(estimator="k3", clamp=10.0)),
        "ppo_loss": ((torch.randn(B, T, V), targets, lp, torch.randn(B, T), mask), ppo),
        "linear_logprobs": ((hidden, weight, targets.reshape(-1)), dict(linear, return_entropy=True)),
        "linear_cross_entropy": ((hidden, weight, targets.reshape(-1)), dict(linear, reduction="mean")),
        "linear_ppo_loss": ((hidden.reshape(B, T, H), weight, targets, lp, torch.randn(B, T), mask),
                            dict(ppo, bias=torch.randn(V), chunk_size=None, chunk_by=None)),
        "gae": ((torch.randn(B, T), torch.randn(B, T), mask), dict(gamma=1.0, lam=0.95)),
        "value_loss": ((torch.randn(B, T), torch.randn(B, T), torch.randn(B, T), mask),
                       dict(clip=0.2, loss_agg="token-mean")),
        "reward_model_loss": ((torch.randn(B), torch.randn(B)), dict(margin=torch.rand(B), center_coef=0.01)),
        "dpo_loss": ((-torch.rand(B), -torch.rand(B), -torch.rand(B), -torch.rand(B)),
                     dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0)),
        "aggregate_loss": ((torch.randn(B, T), mask), dict(loss_agg="token-mean")),
    }
    tensors, options = calls[op]
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [move(t) for t in tensors], {k: move(v) for k, v in options.items()}


OPS = ("logprobs", "kl_divergence", "kl_estimate", "ppo_loss", "linear_logprobs", "linear_cross_entropy",
       "linear_ppo_loss", "gae", "value_loss", "reward_model_loss", "dpo_loss", "aggregate_loss")
ALL = ("cpu", "torch", "triton", "cuda")
BACKENDS = {"logprobs": ALL, "kl_divergence": ALL, "kl_estimate": ("torch", "triton"), "ppo_loss": ALL,
            "linear_logprobs": ALL, "linear_cross_entropy": ALL, "linear_ppo_loss": ALL, "gae": ALL}
# the positional parameters' names, for the messages
TENSOR_NAMES = {
    "logprobs": ("logits", "targets"), "kl_divergence": ("logits", "ref_logits"), "kl_estimate": ("logp", "ref_logp"),
    "ppo_loss": ("logits", "targets", "old_logp", "advantages", "mask"),
    "linear_logprobs": ("hidden", "weight", "targets"), "linear_cross_entropy": ("hidden", "weight", "targets"),
    "linear_ppo_loss": ("hidden", "weight", "targets", "old_logp", "advantages", "mask"),
    "gae": ("rewards", "values", "mask"), "value_loss": ("values", "old_values", "returns", "mask"),
    "reward_model_loss": ("r_chosen", "r_rejected"),
    "dpo_loss": ("pi_chosen", "pi_rejected", "ref_chosen", "ref_rejected"), "aggregate_loss": ("term", "mask"),
}
BAD_OPTIONS = (float("nan"), float("inf"), float("-inf"), -1.0, 0.0, "bogus", None, 1.5, -100, True,
               torch.tensor(1.0), 10**12)


def spoil_tensor(rng: random.Random, t: torch.Tensor):
    """``(what was done, the spoiled value)``."""
    kind = rng.choice(("dim+", "dim-", "size", "int", "bool", "complex", "meta", "stride", "none", "list", "empty",
                       "float64", "float16") + (("on the cpu",) * 2 if t.is_cuda else ()))
    if kind == "dim+":
        return kind, t.unsqueeze(0)
    if kind == "dim-":
        return kind, t.reshape(-1)[0] if t.dim() <= 1 else t.reshape(-1)
    if kind == "size":
        return kind, torch.cat([t, t.narrow(0, 0, 1)])
    if kind in ("int", "bool", "complex", "float64", "float16"):
        dtype = {"int": torch.int64 if t.is_floating_point() else torch.float32, "bool": torch.bool,
                 "complex": torch.complex64, "float64": torch.float64, "float16": torch.float16}[kind]
        return kind, t.to(dtype)
    if kind in ("meta", "on the cpu"):
        return kind, t.to(kind.split()[-1])
    if kind == "stride":
        return kind, torch.stack([t, t], dim=-1).flatten(-2)[..., ::2]
    if kind == "empty":
        return kind, t.narrow(rng.randrange(t.dim()), 0, 0)
    return kind, None if kind == "none" else t.tolist()


def run_case(seed: int, op: str, backend: Optional[str], device: torch.device = torch.device("cpu")) -> str:
    """Spoils one argument of a valid ``op`` call on ``device`` (drawn from ``seed``) and checks the outcome;
    returns what it did. On a GPU one tensor may also be left on the CPU."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tensors, options = valid_call(op, device)
    names = list(TENSOR_NAMES[op]) + list(options)
    name = rng.choice(names)
    if name in TENSOR_NAMES[op]:
        i = TENSOR_NAMES[op].index(name)
        kind, tensors[i] = spoil_tensor(rng, tensors[i])
    elif isinstance(options[name], torch.Tensor):
        kind, options[name] = spoil_tensor(rng, options[name])
    else:
        options[name] = rng.choice(BAD_OPTIONS)
        kind = repr(options[name])
    if op in BACKENDS:
        options["backend"] = backend
    what = f"{op}/{backend}: {name} <- {kind}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = getattr(rk, op)(*tensors, **options)
            first = out[0] if isinstance(out, tuple) else out
            if first.requires_grad:
                first.float().sum().backward()
    except (ValueError, TypeError) as e:
        assert name in str(e), f"{what}: {type(e).__name__} does not name {name}: {e}"
    return what


def cases(backend: str) -> List[str]:
    """The ops ``backend`` runs (and those without a backend argument)."""
    return [op for op in OPS if op not in BACKENDS or backend in BACKENDS[op]]


INTERPRETED_TRITON = triton_importable() and triton_interpreting()
CPU_BACKENDS = ["cpu", "torch"] if _ext.available() else ["torch"]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", range(600))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_spoiled_argument_is_named_or_harmless(backend, seed):
    ops = cases(backend)
    run_case(seed, ops[seed % len(ops)], backend)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("seed", range(150))  # each new dtype or layout of a call compiles Triton variants
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_spoiled_argument_is_named_or_harmless_on_the_gpu(backend, seed):
    """CUDA tensors reach the GPU backends' own paths (and the C++ checks behind them, whose throw ended H200 run
    6's process: the Python checks must come first); a CPU tensor among them is one more spoiling."""
    if backend == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip("the extension was built without its CUDA kernels")
    ops = cases(backend)
    run_case(seed, ops[seed % len(ops)], backend, torch.device("cuda"))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.skipif(not INTERPRETED_TRITON, reason="the Triton kernels run on CPU tensors under TRITON_INTERPRET=1")
@pytest.mark.parametrize("seed", range(600, 800))
def test_a_spoiled_argument_is_named_or_harmless_on_triton(seed):
    pytest.importorskip("triton")
    ops = cases("triton")
    run_case(seed, ops[seed % len(ops)], "triton")


def main(argv: Optional[List[str]] = None) -> int:
    args = seed_parser(__doc__.split("\n\n")[0], backend="cpu", cases=5000).parse_args(argv)
    device = device_for(args)
    ops = cases(args.backend)
    seeds = range(args.first, args.first + args.cases)
    failures = failures_of(lambda seed: run_case(seed, ops[seed % len(ops)], args.backend, device), seeds)
    print(f"{args.cases} cases on {args.backend}, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
