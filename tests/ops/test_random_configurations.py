"""Randomly drawn configurations of every logits op against the float64 oracle, per row.

The ops: logprobs, kl_divergence, ppo_loss, and from hidden states linear_logprobs, linear_cross_entropy and
linear_ppo_loss (chunk sizes, row chunks or vocabulary slabs, the gradient in the forward or recomputed). The
hand-written tests vary one thing at a time (a shape, a dtype, a layout, an extreme row). Here each case draws
all of them at once from a seeded generator: leading shape, vocabulary (1 to 8200, odd and aligned), dtype (mixed
for the KL's two inputs), row layout (contiguous, ``[:, :-1]``, a column window of a wider buffer, which misaligns
every row, transposed leading dims), temperature, ``ignore_index`` (including one inside ``[0, V)``), ignored
fractions up to all, and extreme rows (±1e4, ``-inf`` entries, all equal, one finite entry, fp16 near overflow,
1e3 noise). Values and gradients must pass DESIGN.md §5's rule on every row (``tolerance.assert_rows_match_oracle``),
which a tensor-wide floor would not: a row of 1e4 logits has log-probs ~1e4 and would hide any error elsewhere.

A failing case names its seed; to reproduce it, or to run many more::

    python -m tests.ops.test_random_configurations --backend cpu --first 0 --cases 5000

CPU tensors run the ``cpu`` and ``torch`` backends (and ``triton`` under the interpreter); with a GPU,
``pytest -m gpu`` runs ``triton`` and ``cuda`` on CUDA tensors.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import rlhf_kernels as rk
from rlhf_kernels import _ext
from rlhf_kernels import reference as R
from rlhf_kernels.ops._dispatch import triton_importable, triton_interpreting
from tests.random_cases import device_for, failures_of, seed_parser
from tests.tolerance import assert_matches_oracle, assert_rows_match_oracle, float32_lse_error

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VOCABS = (1, 2, 3, 7, 8, 9, 16, 17, 31, 64, 65, 127, 300, 1000, 2049, 4097, 8200)
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# ----------------------------------------------------------------------------- inputs


def _extreme_rows(x: torch.Tensor, rng: random.Random, dtype: torch.dtype, large: bool = True) -> None:
    """Overwrites about a third of the rows of ``x`` (float32 ``[..., V]``, possibly a view, in place) with DESIGN.md
    §5's extremes; without ``large``, a float32 row is never of size 1e3-1e4 (those rows stay ordinary)."""
    large = large or dtype != torch.float32
    V = x.shape[-1]
    for index in itertools.product(*map(range, x.shape[:-1])):
        row = x[index]  # a view: the writes below land in x
        kind = rng.random()
        if kind < 0.08 and large:
            row.copy_(1e4 * torch.sign(torch.randn(V)))
        elif kind < 0.16 and V > 1:
            masked = torch.rand(V) < rng.choice((0.1, 0.5, 0.9))
            masked[rng.randrange(V)] = False  # a masked vocabulary keeps at least one live entry
            row[masked] = -math.inf
        elif kind < 0.22:
            row.fill_(rng.uniform(-50, 50))
        elif kind < 0.26:
            row.fill_(-math.inf)
            row[rng.randrange(V)] = rng.uniform(-3, 3)
        elif kind < 0.30 and dtype == torch.float16:
            row.copy_(torch.rand(V) * 6e4)
        elif kind < 0.36 and large:
            row.copy_(torch.randn(V) * 1e3)


def _logits(rng: random.Random, lead: List[int], V: int, dtype: torch.dtype, extreme: bool, large: bool = True):
    """Random logits ``[*lead, V]`` in one of four row layouts; returns ``(tensor, layout name)``."""
    layout = rng.choice(("contiguous", "shifted", "window", "transposed"))
    if layout == "transposed" and len(lead) < 2:
        layout = "contiguous"
    scale = rng.choice((0.5, 2.0, 6.0))
    if layout == "shifted":  # logits[:, :-1] of a causal LM
        base = torch.randn(*lead[:-1], lead[-1] + 1, V) * scale
    elif layout == "window":  # columns [off, off + V) of a wider buffer: row strides and offsets not aligned
        extra = rng.randrange(1, 9)
        offset = rng.randrange(0, extra + 1)
        base = torch.randn(*lead, V + extra) * scale
    elif layout == "transposed":
        base = torch.randn(lead[1], lead[0], *lead[2:], V) * scale
    else:
        base = torch.randn(*lead, V) * scale
    if extreme:  # the rows the op sees (a window's extra columns stay ordinary)
        _extreme_rows(base[..., offset:offset + V] if layout == "window" else base, rng, dtype, large)
    base = base.to(dtype)
    if layout == "shifted":
        return base[..., :-1, :], layout
    if layout == "window":
        return base[..., offset:offset + V], layout
    if layout == "transposed":
        return base.transpose(0, 1), layout
    return base, layout


def _writable(leaf: torch.Tensor, overwrite: bool) -> torch.Tensor:
    """With ``overwrite``, a contiguous non-leaf copy of ``leaf`` (what a model's logits are), which
    ``overwrite_logits=True`` may turn into its own gradient; else ``leaf`` itself."""
    return leaf * 1.0 if overwrite else leaf


def _targets(rng: random.Random, lead: List[int], V: int, ignore_index: int) -> torch.Tensor:
    targets = torch.randint(0, V, lead)
    targets[torch.rand(lead) < rng.choice((0.0, 0.1, 0.5, 1.0))] = ignore_index
    return targets


def _z_absmax(*logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row, the largest finite ``|logits / T|`` over the given tensors (``tolerance``'s float32 allowance)."""
    out = None
    for x in logits:
        a = x.detach().double().abs() / temperature
        a = torch.where(torch.isfinite(a), a, torch.zeros_like(a)).amax(-1)
        out = a if out is None else torch.maximum(out, a)
    return out


def _comparable_grads(fast: torch.Tensor, in_dtype: torch.Tensor, oracle: torch.Tensor, logits: torch.Tensor):
    """``(fast, in_dtype, oracle)`` gradients made comparable where the float64 autograd meets infinities.

    Where a logit is ``-inf`` its p is 0 and the ops' closed forms give the gradient's limit, 0, while the
    reference's autograd gives NaN (``0·inf``): those oracle entries become 0. A row whose oracle has NaN at a
    finite logit too (its token's weight times an infinite derivative, e.g. a target of probability 0) is that
    token's NaN, whose pattern inside the row means nothing: it passes when the fast row holds a NaN as well.
    """
    at_inf = torch.isneginf(logits.detach().cpu()).expand_as(oracle)
    oracle_nan_row = (torch.isnan(oracle) & ~at_inf).any(-1, keepdim=True)
    fast_nan_row = torch.isnan(fast).any(-1, keepdim=True)
    nan = torch.tensor(float("nan"), dtype=torch.float64)

    def settle(t, nan_row=True):
        t = t.double()
        t = torch.where(at_inf & torch.isnan(t) & ~oracle_nan_row, torch.zeros_like(t), t)
        return torch.where(oracle_nan_row & nan_row, nan, t)

    return settle(fast, fast_nan_row), settle(in_dtype), settle(oracle)


def _grads(outputs, weights, leaves):
    loss = sum((o.double().cpu() * w).sum() for o, w in zip(outputs, weights) if w is not None)
    return torch.autograd.grad(loss, leaves)


# ----------------------------------------------------------------------------- one case per op family


def logprobs_case(rng: random.Random, backend: str, device: torch.device) -> str:
    dtype = rng.choice(DTYPES)
    lead = [rng.randrange(1, 5) for _ in range(rng.choice((1, 2, 2, 3)))]
    V = rng.choice(VOCABS)
    ignore_index = rng.choice((-100, -1, 0))
    x, layout = _logits(rng, lead, V, dtype, extreme=rng.random() < 0.5)
    targets = _targets(rng, lead, V, ignore_index)
    T = rng.choice((1.0, 1.0, 0.7, 1.3, 0.25, 3.0))
    weights = (torch.randn(lead, dtype=torch.float64), torch.randn(lead, dtype=torch.float64))
    kw = dict(temperature=T, ignore_index=ignore_index, return_entropy=True)
    overwrite = rng.random() < 0.25
    what = f"logprobs/{backend}/{dtype}/{lead}x{V}/{layout}/T={T}/ignore={ignore_index}/overwrite={overwrite}"

    def run(fn, logits, y):
        leaf = logits.detach().requires_grad_()
        outs = fn(leaf, y)
        return [o.detach().cpu() for o in outs], _grads(outs, weights, [leaf])[0].cpu()

    fast = run(lambda a, y: rk.logprobs(_writable(a, overwrite), y, backend=backend, overwrite_logits=overwrite, **kw),
               x.to(device), targets.to(device))
    in_dtype = run(lambda a, y: R.logprobs(a, y, **kw), x, targets)
    oracle = run(lambda a, y: R.logprobs(a, y, **kw), x.double(), targets)
    for i, name in enumerate(("logp", "entropy")):
        assert_rows_match_oracle(fast[0][i], in_dtype[0][i], oracle[0][i], dtype, f"{what}/{name}")
    assert fast[1].dtype == dtype and fast[1].shape == x.shape
    assert_rows_match_oracle(*_comparable_grads(fast[1], in_dtype[1], oracle[1], x), dtype, f"{what}/grad",
                             vocab_last=True, z_absmax=_z_absmax(x, temperature=T))
    return what


def kl_divergence_case(rng: random.Random, backend: str, device: torch.device) -> str:
    dtype = rng.choice(DTYPES)
    ref_dtype = dtype if rng.random() < 0.7 else rng.choice(DTYPES)
    lead = [rng.randrange(1, 5) for _ in range(rng.choice((1, 2, 3)))]
    V = rng.choice(VOCABS[:-1])
    x, layout = _logits(rng, lead, V, dtype, extreme=rng.random() < 0.4)
    if rng.random() < 0.2:  # a reference policy close to the policy: KL near 0, where cancellation would show
        r, ref_layout = (x.float() + 0.01 * torch.randn(x.shape)).to(ref_dtype), "near"
    else:
        r, ref_layout = _logits(rng, lead, V, ref_dtype, extreme=rng.random() < 0.3)
    T = rng.choice((1.0, 0.7, 1.5))
    mask = (torch.rand(lead) < 0.8) if rng.random() < 0.5 else None
    ref_grad = rng.random() < 0.5
    weight = torch.randn(lead, dtype=torch.float64)
    what = f"kl_divergence/{backend}/{dtype},{ref_dtype}/{lead}x{V}/{layout},{ref_layout}/T={T}/ref_grad={ref_grad}"

    def run(fn, a, b, m):
        a = a.detach().requires_grad_()
        b = b.detach().requires_grad_(ref_grad)
        kl = fn(a, b, m)
        grads = _grads([kl], [weight], [a, b] if ref_grad else [a])
        return kl.detach().cpu(), [g.cpu() for g in grads]

    dev_mask = None if mask is None else mask.to(device)
    fast = run(lambda a, b, m: rk.kl_divergence(a, b, temperature=T, mask=m, backend=backend), x.to(device),
               r.to(device), dev_mask)
    in_dtype = run(lambda a, b, m: R.kl_divergence(a, b, temperature=T, mask=m), x, r, mask)
    oracle = run(lambda a, b, m: R.kl_divergence(a, b, temperature=T, mask=m), x.double(), r.double(), mask)
    # p = exp(-300) > 0 where q = 0 gives float64 an infinite KL, float32 (p = 0) a finite one: a matter of range,
    # so there the float32 reference is the oracle
    underflow = torch.isinf(oracle[0]) & torch.isfinite(in_dtype[0])
    assert_rows_match_oracle(fast[0], in_dtype[0], torch.where(underflow, in_dtype[0].double(), oracle[0]), dtype,
                             f"{what}/kl")
    # An unmasked row whose float64 KL is infinite (p > 0 where q = 0) has no finite gradient to compare: its weight
    # times inf makes the oracle's NaN, and in float32 that p may have underflowed to 0 (a finite KL, a finite
    # gradient). Those rows are left out; the others are compared, masked ones included: their gradient is exactly 0
    # whatever their KL, in the oracle (reference.without_gradient_where) and in the kernels.
    with torch.no_grad():
        infinite = ~torch.isfinite(R.kl_divergence(x.double(), r.double(), temperature=T))
        if mask is not None:
            infinite &= mask != 0
    if infinite.all():
        return what + " (an infinite KL in every row: no finite gradient to compare)"
    for grads in (fast[1], in_dtype[1], oracle[1]):
        for g in grads:
            g[infinite] = 0.0
    z_absmax = _z_absmax(x, r, temperature=T)
    # (where the policy's logit is -inf, p = 0 and its gradient's limit is 0; where only the reference's is, q = 0)
    for i, (name, dt, inf_at) in enumerate((("grad", dtype, x), ("ref_grad", ref_dtype, r))[: 1 + ref_grad]):
        assert fast[1][i].dtype == dt
        assert_rows_match_oracle(*_comparable_grads(fast[1][i], in_dtype[1][i], oracle[1][i], inf_at), dt,
                                 f"{what}/{name}", vocab_last=True, z_absmax=z_absmax)
    return what


def ppo_loss_case(rng: random.Random, backend: str, device: torch.device) -> str:
    dtype = rng.choice(DTYPES)
    lead = [rng.randrange(1, 5), rng.randrange(1, 7)]
    V = rng.choice(VOCABS[:-2])
    ignore_index = rng.choice((-100, -1))
    # float32 rows of size 1e4 are logprobs_case's: a log-prob of -1e3 holds only ~1e-4 in float32, which the
    # ratio exp(logp - old_logp) turns into a loss error far above 1e-5 for any implementation
    x, layout = _logits(rng, lead, V, dtype, extreme=rng.random() < 0.3, large=False)
    targets = _targets(rng, lead, V, ignore_index)
    T = rng.choice((1.0, 0.8))
    with torch.no_grad():
        logp = R.logprobs(x.double(), targets, temperature=T, ignore_index=ignore_index).float()
    old_logp = (logp + 0.3 * torch.randn(lead)).nan_to_num(0.0, 0.0, 0.0)
    advantages = torch.randn(lead) * rng.choice((0.1, 1.0, 10.0))
    mask = (torch.rand(lead) < rng.choice((0.0, 0.5, 1.0))).float()
    ref_logp = (old_logp + 0.2 * torch.randn(lead)) if rng.random() < 0.5 else None
    options = dict(
        kl_coef=rng.choice((0.05, 1.0)) if ref_logp is not None else 0.0,
        kl_estimator=rng.choice(("k1", "k2", "k3")),
        entropy_coef=rng.choice((0.0, 0.01, 0.3)),
        clip_low=rng.choice((0.2, 0.1)),
        clip_high=rng.choice((0.2, 0.28)),
        dual_clip=rng.choice((None, 3.0)),
        temperature=T,
        loss_agg=rng.choice(LOSS_AGGS),
        ignore_index=ignore_index,
    )
    overwrite = rng.random() < 0.25
    what = f"ppo_loss/{backend}/{dtype}/{lead}x{V}/{layout}/ref={ref_logp is not None}/overwrite={overwrite}/{options}"

    def run(fn, logits, cast, dev):
        leaf = logits.detach().requires_grad_()
        rows = [t.to(cast).to(dev) for t in (old_logp, advantages, mask)]
        ref = None if ref_logp is None else ref_logp.to(cast).to(dev)
        out = fn(leaf, targets.to(dev), *rows, ref)
        (grad,) = torch.autograd.grad(out.loss, leaf)
        return out, grad.cpu()

    fast = run(lambda a, y, o, adv, m, ref: rk.ppo_loss(_writable(a, overwrite), y, o, adv, m, ref_logp=ref,
                                                        backend=backend, overwrite_logits=overwrite, **options),
               x.to(device), torch.float32, device)
    in_dtype = run(lambda a, y, o, adv, m, ref: R.ppo_loss(a, y, o, adv, m, ref_logp=ref, **options), x,
                   torch.float32, "cpu")
    oracle = run(lambda a, y, o, adv, m, ref: R.ppo_loss(a, y, o, adv, m, ref_logp=ref, **options), x.double(),
                 torch.float64, "cpu")
    if not torch.isfinite(oracle[0].loss):
        return what + " (a non-finite loss)"
    for name in ("loss", "logp", "entropy", "kl", "approx_kl"):
        f, r, o = (getattr(run_[0], name).detach().cpu() for run_ in (fast, in_dtype, oracle))
        assert_rows_match_oracle(f, r, o, dtype, f"{what}/{name}")
    # a ratio on the clip boundary may land on either side under rounding: one token's share either way
    tokens = max(1.0, mask.sum().item())
    assert abs(fast[0].clip_frac.item() - oracle[0].clip_frac.item()) <= 1.0 / tokens + 1e-6, f"{what}/clip_frac"
    assert_rows_match_oracle(*_comparable_grads(fast[1], in_dtype[1], oracle[1], x), dtype, f"{what}/grad",
                             vocab_last=True, z_absmax=_z_absmax(x, temperature=T))
    return what


# Under TRITON_INTERPRET=1 each kernel launch costs ~0.1 s: a slab of 1 column of a 1000-word vocabulary is a
# thousand launches (42 s for one case). The interpreted cases keep at most this many chunks; compiled and C++
# backends take the drawn chunk size as it is.
INTERPRETED_MAX_CHUNKS = 64


def _linear_problem(rng: random.Random, backend: str, device: torch.device) -> SimpleNamespace:
    """Hidden states, an LM head (and bias), targets and the chunking options of one fused-linear case."""
    p = SimpleNamespace(dtype=rng.choice(DTYPES), lead=[rng.randrange(1, 5) for _ in range(rng.choice((1, 2)))],
                        V=rng.choice((1, 7, 9, 17, 64, 65, 301, 1000, 2049)), H=rng.choice((1, 3, 8, 13, 32, 33)),
                        ignore_index=rng.choice((-100, -1)))
    p.hidden = (torch.randn(*p.lead, p.H) * rng.choice((0.3, 1.0, 3.0))).to(p.dtype)
    p.weight = (torch.randn(p.V, p.H) / math.sqrt(p.H) * rng.choice((1.0, 4.0))).to(p.dtype)
    p.bias = torch.randn(p.V).to(p.dtype) if rng.random() < 0.4 else None
    p.targets = _targets(rng, p.lead, p.V, p.ignore_index)
    p.temperature = rng.choice((1.0, 0.7))
    p.chunking = dict(chunk_size=rng.choice((None, 1, 3, 16, 64)), chunk_by=rng.choice((None, "rows", "vocab")))
    if backend == "triton" and device.type == "cpu" and p.chunking["chunk_size"] is not None:
        # rows per chunk or columns per slab: either way at most INTERPRETED_MAX_CHUNKS of them
        p.chunking["chunk_size"] = max(p.chunking["chunk_size"], -(-p.V // INTERPRETED_MAX_CHUNKS))
    p.what = (f"{p.dtype}/{p.lead}x{p.V}x{p.H}/bias={p.bias is not None}/T={p.temperature}/"
              f"ignore={p.ignore_index}/{p.chunking}")
    return p


def _check_linear(what: str, p: SimpleNamespace, fused, materialised, names, device: torch.device,
                  coefficients: Optional[SimpleNamespace] = None) -> str:
    """A fused-linear op against the materialised path (``F.linear`` then the reference) in float64 (the oracle)
    and in the input dtype (as a user's materialised bf16 path runs it).

    ``fused(hidden, weight, targets, bias)`` and ``materialised(logits, targets, dtype)`` return
    ``(values, objective)``: the outputs compared (named by ``names``) and the scalar whose gradients to ``hidden``,
    ``weight`` and ``bias`` are compared, those with an ``allowance`` (``assert_matches_oracle``) for the error of
    the logits' gradient carried through the GEMMs, from the oracle's logits gradient (below).
    ``coefficients`` (optional, ``_coefficient_allowance``): each token's ``g_logp = ∂objective/∂logp``,
    ``g_ent = ∂objective/∂H`` and how far ``g_logp`` may move with its log-prob's rounding; ``values`` (if set),
    an allowance per named output for the same rounding.
    """
    def run(cast, dev, fn=None):
        leaves = [t.to(cast).to(dev).requires_grad_() for t in (p.hidden, p.weight, p.bias) if t is not None]
        bias = leaves[2] if p.bias is not None else None
        if fn is not None:
            values, objective = fn(leaves[0], leaves[1], p.targets.to(dev), bias)
            extra = []
        else:
            logits = F.linear(leaves[0], leaves[1], bias)
            values, objective = materialised(logits, p.targets, cast)
            extra = [logits]
        grads = torch.autograd.grad(objective, leaves + extra)
        return [v.detach().cpu() for v in values], [g.cpu() for g in grads]

    fast = run(p.dtype, device, fused)
    in_dtype = run(p.dtype, "cpu")
    oracle = run(torch.float64, "cpu")
    value_allowances = getattr(coefficients, "values", {})
    for name, f, r, o in zip(names, fast[0], in_dtype[0], oracle[0]):
        assert_matches_oracle(f, r, o, p.dtype, f"{what}/{name}", allowance=value_allowances.get(name))
    # Each row of dlogits may be off by 2 ulps of the dtype (rounded to it before the GEMMs: one neighbour or the
    # other, and the result's own rounding) and, in float32, by what its one float32 lse allows
    # (tolerance.float32_lse_error); the GEMMs carry that through their terms' magnitudes.
    h, w = p.hidden.double().reshape(-1, p.H), p.weight.double()
    logits = _oracle_logits(p).reshape(-1, p.V)
    z_absmax = _z_absmax(logits, temperature=p.temperature)
    lse_error = float32_lse_error(z_absmax) if p.dtype == torch.float32 else torch.zeros_like(z_absmax)
    dlogits = (2.0 * torch.finfo(p.dtype).eps + lse_error).unsqueeze(-1) * oracle[1][-1].abs().reshape(-1, p.V)
    if coefficients is not None:
        dlogits = dlogits + _coefficient_allowance(p, logits, coefficients, lse_error)
    allowance = (dlogits @ w.abs(), dlogits.T @ h.abs(), dlogits.sum(0))
    for i, name in enumerate(("grad_hidden", "grad_weight", "grad_bias")[: len(fast[1])]):
        assert_matches_oracle(fast[1][i], in_dtype[1][i], oracle[1][i], p.dtype, f"{what}/{name}",
                              allowance=allowance[i].reshape(oracle[1][i].shape))
    return what


def _oracle_logits(p: SimpleNamespace) -> torch.Tensor:
    """``hidden @ weight.T + bias`` in float64: the logits the fused-linear ops never materialise, ``[*lead, V]``."""
    return F.linear(p.hidden.double(), p.weight.double(), None if p.bias is None else p.bias.double())


def _coefficient_allowance(p: SimpleNamespace, logits: torch.Tensor, c: SimpleNamespace,
                           z_error: torch.Tensor) -> torch.Tensor:
    """``[N, V]``: what each element of ``dlogits = g_logp·(onehot(y) - p)/T + g_ent·∂H/∂logits`` may carry beyond
    ``_check_linear``'s share of ``|dlogits|``, from the per-token coefficients ``c.g_logp``, ``c.g_ent`` and
    ``c.g_logp_error`` (``[*lead]``, float64):

    - ``z_error·p·(|g_logp| + |g_ent|·(1 + |log p| + H)) / T``: the fused path computes the logits again for its
      gradient (another GEMM, rounded otherwise) against the forward's lse, which moves ``p`` by ``z_error`` (per
      row, relative; ``tolerance.float32_lse_error``). Next to ``|dlogits|`` that is unbounded where ``p_y`` nears
      1: with V = 1 the gradient is exactly 0 and the recomputed one ``g_logp·(1 - e^{δz})``;
    - ``c.g_logp_error·|onehot(y) - p| / T``: ``g_logp``'s own error (``_ppo_coefficients``).
    """
    log_prob = torch.log_softmax(logits / p.temperature, dim=-1)
    prob = log_prob.exp()
    log_prob = torch.where(prob > 0, log_prob, 0.0)  # (p·log p -> 0 where p underflows)
    y = p.targets.reshape(-1)
    valid = (y != p.ignore_index).unsqueeze(-1)
    onehot = F.one_hot(torch.where(valid.squeeze(-1), y, 0), p.V).double()
    entropy = -(prob * log_prob).sum(-1, keepdim=True)
    g_logp, g_ent, g_err = (t.double().reshape(-1, 1) for t in (c.g_logp, c.g_ent, c.g_logp_error))
    moved = z_error.reshape(-1, 1) * prob * (g_logp.abs() + g_ent.abs() * (1.0 + log_prob.abs() + entropy))
    return torch.where(valid, moved + g_err * (onehot - prob).abs(), 0.0) / p.temperature


def _ppo_coefficients(p: SimpleNamespace, rows: Dict[str, torch.Tensor], ref_logp, options) -> SimpleNamespace:
    """The PPO loss's per-token ``g_logp = ∂loss/∂logp``, ``g_ent = ∂loss/∂H`` (float64, from the reference's
    ``ppo_token_terms`` and ``aggregate_loss``) and ``g_logp_error``.

    ``g_logp_error``: per token, ``|∂²loss/∂logp²|·δlogp``, how far ``g_logp`` moves when the log-prob is off by its own
    rounding ``δlogp = 4·eps·(|z_y| + |lse|)`` (eps of the logits' dtype, at least float32's). ``G`` depends on
    ``logp`` through the ratio and the KL estimator's derivative, and can be a small difference of large numbers
    (k2's ``logp - ref`` with ``logp`` near -33 and ``ref`` 0.02 away): one ulp of ``logp``, which any float32
    implementation may have, is then a large relative error of ``G`` and so of that token's gradient row."""
    logits = _oracle_logits(p)
    with torch.no_grad():
        logp, entropy = R.logprobs(logits, p.targets, temperature=p.temperature, ignore_index=p.ignore_index,
                                   return_entropy=True)
        z = logits / p.temperature
        valid = p.targets != p.ignore_index
        z_y = torch.where(valid, z.gather(-1, torch.where(valid, p.targets, 0).unsqueeze(-1)).squeeze(-1), 0.0)
        eps = max(torch.finfo(p.dtype).eps, 2.0**-23)
        delta = 4.0 * eps * (z_y.abs() + torch.logsumexp(z, dim=-1).abs())
    leaf = logp.detach().requires_grad_()
    ent_leaf = entropy.detach().requires_grad_()
    term, _, _ = R.ppo_token_terms(
        leaf, ent_leaf, rows["old_logp"].double(), rows["advantages"].double(),
        ref_logp=None if ref_logp is None else ref_logp.double(), kl_coef=options["kl_coef"],
        kl_estimator=options["kl_estimator"], entropy_coef=options["entropy_coef"], clip_low=options["clip_low"],
        clip_high=options["clip_high"], dual_clip=options["dual_clip"])
    loss = R.aggregate_loss(term, rows["mask"].double(), options["loss_agg"])
    coefficient, g_ent = torch.autograd.grad(loss, (leaf, ent_leaf), create_graph=True)
    (curvature,) = torch.autograd.grad(coefficient.sum(), leaf, allow_unused=True)  # tokens are separable
    curvature = torch.zeros_like(logp) if curvature is None else curvature
    finite = lambda t: t.detach().nan_to_num(0.0, 0.0, 0.0)  # noqa: E731
    # the logged values move with logp too, to first order by their slope times delta: the loss by Σ|g_logp|·δ, each
    # token's KL estimate by |∂k/∂logp|·δ (k2's logp - ref, k3's 1 - e^(ref - logp)), approx_kl by its masked mean of
    # |logp - old_logp|·δ
    kl_slope = torch.zeros_like(logp)
    if ref_logp is not None:
        (kl_slope,) = torch.autograd.grad(R.kl_estimate(leaf, ref_logp.double(), options["kl_estimator"]).sum(), leaf)
    mask = rows["mask"].double()
    approx_slope = mask * (logp - rows["old_logp"].double()).abs() / max(1.0, float(mask.sum()))
    delta = torch.where(valid, delta, 0.0)
    values = {"loss": (finite(coefficient).abs() * delta).sum(), "kl": finite(kl_slope).abs() * delta,
              "approx_kl": (finite(approx_slope) * delta).sum()}
    return SimpleNamespace(g_logp=finite(coefficient), g_ent=finite(g_ent),
                           g_logp_error=finite(curvature).abs() * delta, values=values)


def linear_logprobs_case(rng: random.Random, backend: str, device: torch.device) -> str:
    p = _linear_problem(rng, backend, device)
    entropy = rng.random() < 0.6
    weights = [torch.randn(p.lead, dtype=torch.float64) for _ in range(1 + entropy)]
    kw = dict(temperature=p.temperature, ignore_index=p.ignore_index, return_entropy=entropy)

    def objective(outs):
        outs = outs if entropy else (outs,)
        return outs, sum((o.double().cpu() * w).sum() for o, w in zip(outs, weights))

    zero = torch.zeros(p.lead, dtype=torch.float64)
    coefficients = SimpleNamespace(g_logp=weights[0], g_ent=weights[1] if entropy else zero, g_logp_error=zero)
    return _check_linear(
        f"linear_logprobs/{backend}/{p.what}/entropy={entropy}", p,
        lambda h, w, y, b: objective(rk.linear_logprobs(h, w, y, b, backend=backend, **kw, **p.chunking)),
        lambda logits, y, cast: objective(R.logprobs(logits, y, **kw)), ("logp", "entropy"), device, coefficients)


def linear_loss_case(rng: random.Random, backend: str, device: torch.device) -> str:
    """``linear_cross_entropy`` or ``linear_ppo_loss``: their gradient computed in the forward, or recomputed."""
    p = _linear_problem(rng, backend, device)
    grad_in_forward = rng.choice((None, True, False))
    if rng.random() < 0.4:
        reduction = rng.choice(("mean", "sum"))
        kw = dict(temperature=p.temperature, ignore_index=p.ignore_index)

        def cross_entropy(logits, y, cast):
            nll = -R.logprobs(logits, y, **kw)
            count = (y != p.ignore_index).sum().to(nll.dtype)
            loss = nll.sum() if reduction == "sum" else torch.where(count > 0, nll.sum() / count.clamp_min(1), 0.0)
            return (loss,), loss

        def fused(h, w, y, b):
            loss = rk.linear_cross_entropy(h, w, y, b, reduction=reduction, backend=backend,
                                           grad_in_forward=grad_in_forward, **kw, **p.chunking)
            return (loss,), loss

        valid = p.targets != p.ignore_index
        count = max(1, int(valid.sum()))
        zero = torch.zeros(p.lead, dtype=torch.float64)
        g_logp = torch.where(valid, -1.0 if reduction == "sum" else -1.0 / count, 0.0).double()
        return _check_linear(f"linear_cross_entropy/{backend}/{p.what}/{reduction}/grad_in_forward={grad_in_forward}",
                             p, fused, cross_entropy, ("loss",), device,
                             SimpleNamespace(g_logp=g_logp, g_ent=zero, g_logp_error=zero))
    with torch.no_grad():
        logp = R.linear_logprobs(p.hidden.double(), p.weight.double(), p.targets,
                                 None if p.bias is None else p.bias.double(), temperature=p.temperature,
                                 ignore_index=p.ignore_index).float()
    rows = dict(old_logp=(logp + 0.3 * torch.randn(p.lead)), advantages=torch.randn(p.lead),
                mask=(torch.rand(p.lead) < rng.choice((0.0, 0.5, 1.0))).float())
    ref_logp = rows["old_logp"] + 0.2 * torch.randn(p.lead) if rng.random() < 0.5 else None
    options = dict(kl_coef=rng.choice((0.05, 1.0)) if ref_logp is not None else 0.0,
                   kl_estimator=rng.choice(("k1", "k2", "k3")), entropy_coef=rng.choice((0.0, 0.01, 0.3)),
                   clip_low=0.2, clip_high=rng.choice((0.2, 0.28)), dual_clip=rng.choice((None, 3.0)),
                   temperature=p.temperature, ignore_index=p.ignore_index, loss_agg=rng.choice(LOSS_AGGS))
    if options["loss_agg"] != "token-mean" and len(p.lead) != 2:
        options["loss_agg"] = "token-mean"  # the per-sequence aggregations need [B, T]
    names = ("loss", "logp", "entropy", "kl", "approx_kl")

    def values(out):
        return [getattr(out, n) for n in names], out.loss

    def per_token(cast, dev):
        ref = None if ref_logp is None else ref_logp.to(cast).to(dev)
        return [rows[k].to(cast).to(dev) for k in ("old_logp", "advantages", "mask")], ref

    def fused(h, w, y, b):
        args, ref = per_token(torch.float32, device)
        return values(rk.linear_ppo_loss(h, w, y, *args, bias=b, ref_logp=ref, backend=backend,
                                         grad_in_forward=grad_in_forward, **options, **p.chunking))

    def materialised(logits, y, cast):
        args, ref = per_token(torch.float64 if cast == torch.float64 else torch.float32, "cpu")
        return values(R.ppo_loss(logits, y, *args, ref_logp=ref, **options))

    return _check_linear(f"linear_ppo_loss/{backend}/{p.what}/grad_in_forward={grad_in_forward}/{options}", p,
                         fused, materialised, names, device, _ppo_coefficients(p, rows, ref_logp, options))


CASES: Dict[str, Callable[[random.Random, str, torch.device], str]] = {
    "logprobs": logprobs_case,
    "kl_divergence": kl_divergence_case,
    "ppo_loss": ppo_loss_case,
    "linear_logprobs": linear_logprobs_case,
    "linear_losses": linear_loss_case,
}


def run_case(seed: int, backend: str, device: torch.device) -> str:
    """Draws case ``seed`` (its op family too) and checks it on ``backend``; returns its description."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    return CASES[rng.choice(sorted(CASES))](rng, backend, device)


# ----------------------------------------------------------------------------- pytest

CPU_BACKENDS = ["cpu", "torch"] if _ext.available() else ["torch"]
INTERPRETED_TRITON = triton_importable() and triton_interpreting()
CPU_CASES = 300  # ~10 ms each on the CPU backends
TRITON_CPU_CASES = 120  # ~0.15 s each under the interpreter
GPU_CASES = 60  # each new dtype / vocabulary / layout compiles Triton variants: seconds of a short GPU run


@pytest.mark.fuzz
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("seed", range(CPU_CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_configuration_on_the_cpu(backend, seed):
    run_case(seed, backend, torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.fuzz
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.skipif(not INTERPRETED_TRITON, reason="the Triton kernels run on CPU tensors under TRITON_INTERPRET=1")
@pytest.mark.parametrize("seed", range(CPU_CASES, CPU_CASES + TRITON_CPU_CASES))
def test_random_configuration_triton_interpreted(seed):
    pytest.importorskip("triton")
    run_case(seed, "triton", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.fuzz
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("seed", range(GPU_CASES))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_random_configuration_on_the_gpu(backend, seed):
    if backend == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip("the extension was built without its CUDA kernels")
    run_case(seed, backend, torch.device("cuda"))


class _RecordCustomOps(TorchDispatchMode):
    """Records every ``rlhf_kernels::`` custom op call (its arguments cloned) that runs inside it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "rlhf_kernels":
            clone = lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a  # noqa: E731
            self.calls.append((func, tree_map(clone, args), tree_map(clone, kwargs)))
        return func(*args, **kwargs)


OPCHECK_SEEDS = range(60)  # on the CPU backends (the Triton interpreter under opcheck's repeated runs: minutes)


@pytest.mark.fuzz
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("seed", OPCHECK_SEEDS)
def test_the_custom_ops_of_a_random_configuration_pass_opcheck(seed):
    """``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch) on each custom op a
    random case calls, with that case's arguments: the odd layouts, dtypes and options that the fixed opcheck tests
    do not reach, as ``torch.compile`` meets them. The ops' fake implementations and autograd registrations do not
    depend on the backend (the Triton ops have fixed opcheck tests of their own)."""
    backend = CPU_BACKENDS[seed % len(CPU_BACKENDS)]
    recorder = _RecordCustomOps()
    with recorder:
        run_case(seed, backend, torch.device("cpu"))
    assert recorder.calls or backend == "torch", "the case called no custom op"
    for func, args, kwargs in recorder.calls:
        outputs = [o for o in tree_flatten(func(*args, **kwargs))[0] if isinstance(o, torch.Tensor)]
        # the AOT-dispatch checks compare eager and traced outputs with assert_close, to which NaN != NaN: an
        # output with a token's NaN (an extreme row's) gets the other checks only
        nan = any(torch.isnan(o).any() for o in outputs if o.is_floating_point())
        checks = ("test_schema", "test_autograd_registration", "test_faketensor") if nan else None
        torch.library.opcheck(func, args, kwargs, **({"test_utils": checks} if checks else {}))


def main(argv: Optional[List[str]] = None) -> int:
    args = seed_parser(__doc__.split("\n\n")[0], backend="cpu", cases=1000).parse_args(argv)
    device = device_for(args)
    seeds = range(args.first, args.first + args.cases)
    failures = failures_of(lambda seed: run_case(seed, args.backend, device), seeds)
    print(f"{args.cases} cases on {args.backend} ({device}), {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
