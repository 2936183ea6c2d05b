"""Fused-linear ops (issue 6): ``linear_logprobs`` and the losses built on it, against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import rlhf_kernels as rk
from rlhf_kernels import _ext
from rlhf_kernels import reference as R
from rlhf_kernels.ops import _forward_grads as forward_grads
from rlhf_kernels.ops import linear as L
from rlhf_kernels.ops._dispatch import triton_importable, triton_interpreting
from tests.clip_regimes import old_logp_and_advantages
from tests.poison import poisoned_allocations, zero_fills_during
from tests.tolerance import assert_matches_oracle

BACKENDS = ["cpu", "torch"] if _ext.available() else ["torch"]


def _inputs(lead, H, V, dtype, seed=0, bias=True, ignore=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * H**-0.5 * 3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, lead, generator=g)
    flat = targets.view(-1)
    for i in ignore:
        flat[i] = -100
    return hidden, weight, targets, b


def _run(fn, hidden, weight, bias, g_logp, g_ent):
    """Values and gradients (hidden, weight[, bias]) of ``Σ g_logp·logp + g_ent·entropy``."""
    leaves = [t.detach().requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    lp, ent = fn(*leaves) if bias is not None else fn(*leaves, None)
    grads = torch.autograd.grad((lp.double() * g_logp + ent.double() * g_ent).sum(), leaves)
    return (lp, ent) + tuple(grads)


def _materialised_in_dtype(targets, slicer=lambda h: h, **kw):
    """The reference run in the input dtype: logits (and their gradient) in that dtype, the log-softmax by the oracle.

    ``reference.linear_logprobs`` upcasts bf16 / fp16 to float32 before the
    matmul, so it is not an in-dtype run; a user's materialised bf16 path is
    ``F.linear`` in bf16 then the log-softmax, whose error this rule scales by.
    """

    def fn(h, w, b):
        return R.logprobs(F.linear(slicer(h), w, b), targets, **kw)

    return fn


def _check(hidden, weight, targets, bias, *, backend, temperature=1.0, chunk_size=None, slicer=None, chunk_by=None):
    """One call vs the float64 oracle (values and all gradients) under DESIGN.md §5's rule; with
    ``chunk_by="vocab"``, ``chunk_size`` is the slabs' width in vocabulary columns."""
    dtype = hidden.dtype
    slicer = slicer or (lambda h: h)
    shape = slicer(hidden).shape[:-1]
    g = torch.Generator().manual_seed(1)
    g_logp = torch.randn(shape, generator=g, dtype=torch.float64)
    g_ent = torch.randn(shape, generator=g, dtype=torch.float64)
    kw = dict(temperature=temperature, return_entropy=True)

    def fast(h, w, b):
        return rk.linear_logprobs(slicer(h), w, targets, b, chunk_size=chunk_size, backend=backend,
                                  chunk_by=chunk_by, **kw)

    def ref(h, w, b):
        return R.linear_logprobs(slicer(h), w, targets, b, **kw)

    got = _run(fast, hidden, weight, bias, g_logp, g_ent)
    in_dtype = _run(_materialised_in_dtype(targets, slicer, **kw), hidden, weight, bias, g_logp, g_ent)
    to64 = [None if t is None else t.double() for t in (hidden, weight, bias)]
    oracle = _run(ref, *to64, g_logp, g_ent)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    names = ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for name, f, r, o in zip(names, got, in_dtype, oracle):
        if name.startswith("grad"):
            assert f.dtype == dtype, f"{name} dtype {f.dtype}"
        assert_matches_oracle(f, r, o, dtype, what=f"{backend}/{dtype}/{chunk_by}/{name}")
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_by", ["rows", "vocab"])
@pytest.mark.parametrize(
    "lead, H, V, chunk_size",
    [
        ((1,), 16, 7, None),  # N = 1
        ((13,), 37, 7, 4),  # V = 7, H not a multiple of 8, chunk not dividing N
        ((2, 9), 37, 301, 5),  # [B, T, H] leading dims
        ((3,), 24, 50257, 2),  # GPT-2 vocab, small N
        ((40,), 64, 1000, None),  # automatic chunk (one chunk here)
    ],
)
def test_matches_oracle(backend, dtype, chunk_by, lead, H, V, chunk_size):
    """Rows of ``chunk_size``, or (``"vocab"``) slabs of ``chunk_size`` columns: 2 of V = 7 give 4 slabs, the
    last one column wide; 2 of 50257 would be 25129 slabs, so there the default width (two slabs)."""
    n = 1
    for s in lead:
        n *= s
    ignore = (0, n - 2) if n > 3 else ()
    hidden, weight, targets, bias = _inputs(lead, H, V, dtype, ignore=ignore)
    if chunk_by == "vocab" and chunk_size is not None:
        chunk_size = None if V > 1000 else chunk_size - 2
    _check(hidden, weight, targets, bias, backend=backend, temperature=0.7, chunk_size=chunk_size, chunk_by=chunk_by)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_by", ["rows", "vocab"])
def test_no_bias_strided_hidden_and_all_ignored(backend, chunk_by):
    hidden, weight, _, _ = _inputs((3, 8), 37, 53, torch.float32, bias=False)
    targets = torch.randint(0, 53, (3, 7))
    targets[1] = -100  # an all-ignored sequence
    targets[2, 3] = -100
    got = _check(hidden, weight, targets, None, backend=backend, temperature=1.3, chunk_size=5,
                 slicer=lambda h: h[:, :-1], chunk_by=chunk_by)
    assert torch.all(got[0][1] == 0) and torch.all(got[1][1] == 0)
    assert torch.all(got[2][1, :-1] == 0)  # no gradient reaches ignored positions


def test_chunking_does_not_change_the_result():
    hidden, weight, targets, bias = _inputs((37,), 20, 90, torch.float64, ignore=(5,))
    outs = [rk.linear_logprobs(hidden, weight, targets, bias, chunk_size=c, return_entropy=True, chunk_by=by)
            for by in ("rows", "vocab") for c in (1, 6, 37, 100)]  # fmt: skip
    for lp, ent in outs[1:]:
        torch.testing.assert_close(lp, outs[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(ent, outs[0][1], rtol=0, atol=1e-12)


def test_matches_logprobs_of_materialised_logits():
    hidden, weight, targets, bias = _inputs((2, 5), 12, 33, torch.float32, ignore=(3,))
    lp, ent = rk.linear_logprobs(hidden, weight, targets, bias, return_entropy=True, temperature=0.9, chunk_size=3)
    lp2, ent2 = rk.logprobs(F.linear(hidden, weight, bias), targets, return_entropy=True, temperature=0.9)
    torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_by", ["rows", "vocab"])
def test_gradcheck_float64(backend, chunk_by):
    hidden, weight, targets, bias = _inputs((2, 4), 5, 7, torch.float64, ignore=(2,))
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]

    def fn(h, w, b):
        return rk.linear_logprobs(h, w, targets, b, temperature=0.8, return_entropy=True, chunk_size=3, backend=backend,
                                  chunk_by=chunk_by)

    assert torch.autograd.gradcheck(fn, leaves)
    strided_targets = targets[:, 1:]

    def fn_strided(h, w):
        return rk.linear_logprobs(h[:, :-1], w, strided_targets, chunk_size=2, backend=backend, return_entropy=True,
                                  chunk_by=chunk_by)

    assert torch.autograd.gradcheck(fn_strided, leaves[:2])


def test_only_requested_gradients_are_computed():
    hidden, weight, targets, bias = _inputs((6,), 8, 11, torch.float64)
    hidden.requires_grad_(True)  # frozen head: weight and bias need no gradient
    lp = rk.linear_logprobs(hidden, weight, targets, bias, chunk_size=4)
    (gh,) = torch.autograd.grad(lp.sum(), hidden)
    (expected,) = torch.autograd.grad(R.linear_logprobs(hidden, weight, targets, bias).sum(), hidden)
    torch.testing.assert_close(gh, expected)
    w = weight.clone().requires_grad_(True)  # only the head trains
    lp = rk.linear_logprobs(hidden.detach(), w, targets, chunk_size=4, return_entropy=True)[1]
    (gw,) = torch.autograd.grad(lp.sum(), w)
    (expected,) = torch.autograd.grad(R.linear_logprobs(hidden.detach(), w, targets, return_entropy=True)[1].sum(), w)
    torch.testing.assert_close(gw, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_by", ["rows", "vocab"])
def test_opcheck(backend, chunk_by):
    hidden, weight, targets, bias = _inputs((9,), 6, 13, torch.float32)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    torch.library.opcheck(L.linear_logprobs_fwd, (*leaves[:2], targets, leaves[2], 0.9, -100, 4, backend, chunk_by))
    torch.library.opcheck(L.linear_logprobs_fwd, (leaves[0], leaves[1], targets, None, 1.0, -100, 0, backend, chunk_by))
    with torch.no_grad():
        _, ent, lse = L.linear_logprobs_fwd(hidden, weight, targets, bias, 0.9, -100, 4, backend, chunk_by)
    g = torch.randn(9)
    args = (g, g.clone(), hidden.detach(), weight.detach(), targets, bias.detach(), lse, ent, 0.9, -100, 4, backend)
    torch.library.opcheck(L.linear_logprobs_bwd, args + (True, True, True, chunk_by))
    torch.library.opcheck(L.linear_logprobs_bwd, args + (True, False, False, chunk_by))
    if chunk_by == "rows":  # the schema's default: callers from before the argument existed
        torch.library.opcheck(L.linear_logprobs_fwd, (*leaves[:2], targets, leaves[2], 0.9, -100, 4, backend))


def test_torch_compile_fullgraph():
    backend = BACKENDS[0]
    hidden, weight, targets, bias = _inputs((2, 7), 10, 29, torch.float32, ignore=(4,))
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]

    def loss_fn(h, w, b):
        lp, ent = rk.linear_logprobs(h[:, :-1], w, targets[:, 1:], b, return_entropy=True, chunk_size=4, backend=backend)
        return -(lp.mean() + 0.01 * ent.mean())

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    grads = torch.autograd.grad(got, leaves)
    expected = loss_fn(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch.testing.assert_close(got, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces, tracing into the fused-linear custom ops' bodies."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = set()
        self._impls = {
            "linear_logprobs_fwd": L.linear_logprobs_fwd._init_fn,
            "linear_logprobs_bwd": L.linear_logprobs_bwd._init_fn,
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "_opname", "")
        if func.namespace == "rlhf_kernels" and name in self._impls:
            self.ops.add(name)
            with self:  # the mode is off inside __torch_dispatch__; switch it back on for the op's body
                out = self._impls[name](*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_are_never_materialised(backend):
    N, H, V = 24, 8, 301
    hidden, weight, targets, bias = _inputs((N,), H, V, torch.float32)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]

    def step(chunk):
        mode = _LargestTensor()
        with mode:
            lp, ent = rk.linear_logprobs(*leaves[:2], targets, leaves[2], return_entropy=True, chunk_size=chunk,
                                         backend=backend)
            (lp.sum() + ent.sum()).backward()
        assert mode.ops == {"linear_logprobs_fwd", "linear_logprobs_bwd"}, mode.ops
        return mode.largest

    assert step(N) >= N * V  # the probe sees the logits when they do exist (one chunk)
    largest = step(7)
    assert largest < N * V and largest <= max(7 * V, V * H), largest

    mode = _LargestTensor()  # no-grad scoring (old-policy / reference log-probs): one chunk
    with torch.no_grad(), mode:
        rk.linear_logprobs(hidden, weight, targets, bias, chunk_size=5, backend=backend)
    assert mode.largest <= max(5 * V, V * H), mode.largest

    for grad in (True, False):  # vocabulary slabs of 50 columns: one [N, 50] slab at a time, no [N, V] tensor
        mode = _LargestTensor()
        with mode, torch.set_grad_enabled(grad):
            lp, ent = rk.linear_logprobs(*leaves[:2], targets, leaves[2], return_entropy=True, chunk_size=50,
                                         backend=backend, chunk_by="vocab")
            if grad:
                (lp.sum() + ent.sum()).backward()
        assert mode.largest <= max(N * 50, V * H), mode.largest


def test_auto_chunk_size():
    cpu = torch.device("cpu")
    rows = L.auto_chunk_size(2048, 512, 50257, torch.float32, cpu)
    assert 32 <= rows < 2048 and rows * 50257 * 4 <= 32 * 2**20
    assert L.auto_chunk_size(5, 512, 50257, torch.float32, cpu) == 5
    assert L.auto_chunk_size(100000, 64, 7, torch.float32, cpu) <= 100000
    assert L.auto_chunk_size(4096, 64, 10**6, torch.float32, cpu) == 32  # min rows keep the dW GEMM efficient
    assert L.auto_chunk_size(2048, 512, 50257, torch.float32, cpu, weight_grad_cast=True) == rows  # GPU-only rule


def test_chunk_rows_grow_to_the_weight_gradient_cast():
    """The GPU rule for a float32-accumulated 16-bit weight gradient: chunks as large as the weight (H rows), capped."""
    V, H, item = 128256, 4096, 2
    row = V * item
    budget = 256 * 2**20
    assert L.chunk_rows(8192, row, budget, 128) == 1024  # 256 MiB of bf16 logits
    assert L.chunk_rows(8192, row, budget, 128, free_rows=H) == 4096  # V·H·2 bytes: the cast's own output
    assert L.chunk_rows(8192, row, budget, 128, free_rows=H // 2) == 2048  # CUDA backend: logits + dlogits share it
    assert L.chunk_rows(8192, row, budget, 128, free_rows=H, cap_bytes=600 * 2**20) == 2432  # free-memory cap
    assert L.chunk_rows(1000, row, budget, 128, free_rows=H) == 1000  # never more than n
    assert L.chunk_rows(8192, row, budget, 128, free_rows=H, cap_bytes=1) == 128  # the cap keeps min_rows


def test_gpu_chunks_are_whole_gemm_tiles(monkeypatch):
    """On the GPU, chunk rows and slab columns are multiples of 256 once that large (whole cuBLAS tiles), else of
    64; the CPU keeps multiples of 64. Free memory is faked, so this runs without a GPU."""
    assert L.chunk_rows(16384, 151936 * 2, 256 * 2**20, 128) == 832  # the CPU's rounding
    assert L.chunk_rows(16384, 151936 * 2, 256 * 2**20, 128, align=256) == 768
    assert L.chunk_rows(16384, 151936 * 2, 64 * 2**20, 128, align=256) == 192  # under 256 rows: multiples of 64
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    cuda = torch.device("cuda")
    rows = L.auto_chunk_size(16384, 4096, 151936, torch.bfloat16, cuda)
    assert rows == 768 and rows * 151936 * 2 <= 256 * 2**20
    assert L.auto_chunk_size(16384, 4096, 128256, torch.bfloat16, cuda) == 1024
    assert L.slab_columns(16384, 151936, torch.bfloat16, cuda, 0) == 3072  # 96 MiB of bf16 logits
    assert L.slab_columns(8192, 128256, torch.bfloat16, cuda, 0, buffers=2) == 3072  # and of dlogits
    assert L.slab_columns(100_000, 151936, torch.bfloat16, cuda, 0) == 256  # 503 fit: whole 256-column tiles
    assert L.slab_columns(16384, 151936, torch.bfloat16, torch.device("cpu"), 0) == 1024


@pytest.mark.skipif(not _ext.available(), reason="needs the C++ extension")
@pytest.mark.parametrize("fused", [False, True])
def test_dlogits_overwrite_the_logits_chunk_cpu(fused):
    """The C++ CPU backward writes each chunk's dlogits over its logits: one chunk-sized buffer, not two;
    for a vocabulary that is not a multiple of 8 the buffer's rows are padded to 16-byte-aligned strides."""
    N, H, V, chunk = 12, 8, 301, 5  # 3 chunks
    hidden, weight, targets, bias = _inputs((N,), H, V, torch.float32)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    seen, strides = [], []

    class _Mode(_LargestTensor):
        def __init__(self):
            super().__init__()
            self._impls["linear_loss_fused"] = L.linear_loss_fused._init_fn

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "rlhf_kernels_C" and func.overloadpacket.__name__.startswith("logprobs_bwd"):
                out_arg = args[-1] if func.overloadpacket.__name__ == "logprobs_bwd_out" else None
                seen.append(out_arg is not None and out_arg.data_ptr() == args[2].data_ptr())
                strides.append(args[2].stride(1))
            return super().__torch_dispatch__(func, types, args, kwargs)

    with _Mode():
        loss = rk.linear_cross_entropy(*leaves[:2], targets, leaves[2], chunk_size=chunk, backend="cpu",
                                       grad_in_forward=fused)
        loss.backward()
    assert seen == [True] * 3, seen
    assert strides == [320] * 3, strides  # V = 301: rows padded to a multiple of 64 elements (16-byte aligned GEMMs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
def test_uninitialised_buffers_are_written_before_use(backend, fused):
    """NaN-filled fresh memory (padded chunk buffer, weight-gradient accumulator without zero-fill) never leaks."""
    hidden, weight, targets, bias = _inputs((11,), 10, 301, torch.float32, ignore=(2,))
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    with poisoned_allocations():
        loss = rk.linear_cross_entropy(*leaves[:2], targets, leaves[2], chunk_size=4, backend=backend,
                                       grad_in_forward=fused)
        loss.backward()
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    nll = -R.logprobs(F.linear(*ref), targets)
    (nll.sum() / (targets != -100).sum()).backward()
    torch.testing.assert_close(loss.double(), (nll.sum() / (targets != -100).sum()).detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["logprobs rows", "logprobs vocab", "cross-entropy rows", "cross-entropy vocab"])
def test_16_bit_gradients_stay_finite_over_dirty_padding(op, dtype):
    """A chunk of 96 rows of V = 301 (rows padded to 320) in 16-bit on the CPU, fresh memory NaN-filled: every
    gradient is finite and matches the float64 oracle. oneDNN's AMX GEMM (Sapphire Rapids and later, as on this
    project's CI) reads the padding as the K tail of ``dlogits @ weight`` (uxlfoundation/oneDNN#5717): with it left
    uninitialised, half the rows of the hidden states' gradient came out NaN here, and once in a full CI run, at
    random. ``_row_buffer`` zeroes it. (Elsewhere the GEMM never reads the padding, and this passes either way.)"""
    hidden, weight, targets, bias = _inputs((96,), 40, 301, dtype, seed=5, ignore=(3,))
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    which, chunk_by = op.split()
    g = torch.Generator().manual_seed(6)
    g_logp, g_ent = torch.randn(96, generator=g), torch.randn(96, generator=g)

    def value(h, w, b):
        if which == "cross-entropy":
            return rk.linear_cross_entropy(h, w, targets, b, chunk_size=96 if chunk_by == "rows" else 128,
                                           chunk_by=chunk_by, backend="cpu")
        lp, ent = rk.linear_logprobs(h, w, targets, b, chunk_size=96 if chunk_by == "rows" else 128,
                                     chunk_by=chunk_by, return_entropy=True, backend="cpu")
        return (lp * g_logp).sum() + (ent * g_ent).sum()

    def reference(h, w, b):
        lp, ent = R.linear_logprobs(h, w, targets, b, return_entropy=True)
        if which == "cross-entropy":
            return -lp.sum() / (targets != -100).sum()
        return (lp * g_logp.to(lp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()

    with poisoned_allocations():
        value(*leaves).backward()
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    reference(*ref).backward()
    low = [t.detach().float().requires_grad_(True) for t in leaves]  # the oracle's rule: our error vs float32's
    reference(*low).backward()
    for name, a, r, o in zip(("hidden", "weight", "bias"), leaves, low, ref):
        assert torch.isfinite(a.grad.float()).all(), f"{op} {dtype}: non-finite grad_{name} rows " + str(
            torch.nonzero(~torch.isfinite(a.grad.float()).reshape(a.shape[0], -1).all(1)).flatten().tolist())
        assert_matches_oracle(a.grad, r.grad.to(dtype), o.grad, dtype, what=f"{op}/{dtype}/grad_{name}")


def test_padded_row_buffers_have_zero_padding():
    with poisoned_allocations():
        view = L._row_buffer(5, 301, torch.empty(1, dtype=torch.bfloat16))
    padding = torch.as_strided(view, (5, view.stride(0) - 301), (view.stride(0), 1), view.storage_offset() + 301)
    assert view.stride(0) == 320 and torch.equal(padding.float(), torch.zeros(5, 19))
    assert L._row_buffer(5, 304, torch.empty(1)) is None  # V % 8 == 0: a plain chunk, no padding


@pytest.mark.skipif(not (triton_importable() and triton_interpreting()), reason="needs TRITON_INTERPRET=1")
def test_dlogits_overwrite_the_logits_chunk_triton(monkeypatch):
    """The Triton backward gets the chunk's logits as its ``out`` and the gradients stay right."""
    from rlhf_kernels.triton import logprobs as T

    original, calls = T.logprobs_bwd, []

    def spy(*args):
        calls.append(args[-1] is not None and args[-1].data_ptr() == args[2].data_ptr())
        return original(*args)

    monkeypatch.setattr(T, "logprobs_bwd", spy)
    hidden, weight, targets, bias = _inputs((2, 5), 12, 37, torch.float32, ignore=(3,))
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    loss = rk.linear_cross_entropy(*leaves[:2], targets, leaves[2], chunk_size=4, backend="triton",
                                   grad_in_forward=True)
    loss.backward()
    assert calls == [True] * 3, calls
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    nll = -R.logprobs(F.linear(*ref), targets)
    (nll.sum() / (targets != -100).sum()).backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not (triton_importable() and (torch.cuda.is_available() or triton_interpreting())),
                    reason="needs triton (GPU, or TRITON_INTERPRET=1 on the CPU)")
def test_triton_backend_small():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, bias = _inputs((2, 5), 12, 37, torch.float32, ignore=(3,))
    hidden, weight, targets, bias = (t.to(device) for t in (hidden, weight, targets, bias))
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    lp, ent = rk.linear_logprobs(*leaves[:2], targets, leaves[2], return_entropy=True, temperature=0.8,
                                 chunk_size=3, backend="triton")
    (lp.sum() + 0.5 * ent.sum()).backward()
    got = [lp.detach(), ent.detach()] + [t.grad for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    lp_r, ent_r = R.linear_logprobs(*ref_leaves[:2], targets, ref_leaves[2], return_entropy=True, temperature=0.8)
    (lp_r.sum() + 0.5 * ent_r.sum()).backward()
    expected = [lp_r.detach(), ent_r.detach()] + [t.grad for t in ref_leaves]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_linear_ppo_loss_matches_ppo_loss(backend, loss_agg):
    hidden, weight, targets, bias = _inputs((3, 6), 10, 41, torch.float64, ignore=(4,))
    g = torch.Generator().manual_seed(2)
    old_logp = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 4
    ref_logp = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 4
    adv = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 6, generator=g) > 0.2
    kw = dict(ref_logp=ref_logp, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, temperature=0.9, loss_agg=loss_agg,
              backend=backend)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    out = rk.linear_ppo_loss(*leaves[:2], targets, old_logp, adv, mask, bias=leaves[2], chunk_size=4, **kw)
    grads = torch.autograd.grad(out.loss, leaves)
    logits = F.linear(*leaves)
    expected = rk.ppo_loss(logits, targets, old_logp, adv, mask, **kw)
    expected_grads = torch.autograd.grad(expected.loss, leaves)
    assert isinstance(out, rk.PPOLossOutput)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["forward-grad", "recompute"])
@pytest.mark.parametrize("chunk_by", ["rows", "vocab"])
@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_linear_ppo_loss_ignores_masked_tokens_whatever_they_hold(backend, grad_in_forward, chunk_by, estimator):
    """Masked-out tokens holding what padding may hold (a reference or old log-prob of -inf, a NaN advantage or
    reference): their terms or slopes are not finite, yet the loss and the three gradients are the oracle's and
    finite on both gradient paths. One such token's NaN dlogits row used to reach every entry of grad_weight."""
    hidden, weight, targets, bias = _inputs((2, 7), 10, 23, torch.float32, ignore=(5,))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        logp = R.linear_logprobs(hidden.double(), weight.double(), targets, bias.double()).float()
    old = logp + 0.2 * torch.randn(2, 7, generator=g)
    ref, adv = logp - 0.3, torch.randn(2, 7, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    padding = [(-3.0, float("-inf"), 0.5), (float("-inf"), -2.0, 0.5), (-3.0, -2.0, float("nan")),
               (-3.0, float("nan"), 0.5)]  # (old, ref, advantage) of masked tokens [0, 1], [1, 2], [0, 3], [1, 4]
    for i, (o, r, a) in enumerate(padding):
        t = (i % 2, i + 1)
        mask[t], old[t], ref[t], adv[t] = False, o, r, a
    kw = dict(ref_logp=ref, kl_coef=0.1, kl_estimator=estimator, entropy_coef=0.01, loss_agg="seq-mean-token-mean")
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = rk.linear_ppo_loss(*leaves[:2], targets, old, adv, mask, bias=leaves[2], chunk_size=4, backend=backend,
                             grad_in_forward=grad_in_forward, chunk_by=chunk_by, **kw)
    grads = torch.autograd.grad(out.loss, leaves)
    leaves64 = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    oracle = R.ppo_loss(F.linear(*leaves64), targets, old.double(), adv.double(), mask,
                        **{**kw, "ref_logp": ref.double()})
    grads64 = torch.autograd.grad(oracle.loss, leaves64)
    assert torch.isfinite(oracle.loss) and all(torch.isfinite(t).all() for t in grads64)
    torch.testing.assert_close(out.loss.double(), oracle.loss, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, grads64):
        assert torch.isfinite(a).all(), f"grad_{name} is not finite"
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))  # no gradient from a masked token


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_torch(reduction):
    hidden, weight, targets, bias = _inputs((4, 5), 9, 23, torch.float64, ignore=(2, 7))
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    got = rk.linear_cross_entropy(*leaves[:2], targets, leaves[2], reduction=reduction, chunk_size=3)
    expected = F.cross_entropy(F.linear(*leaves).reshape(-1, 23), targets.reshape(-1), reduction=reduction)
    if reduction == "none":
        expected = expected.reshape(4, 5)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), leaves)
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)
    empty = rk.linear_cross_entropy(hidden, weight, torch.full_like(targets, -100))
    assert empty.item() == 0.0  # all ignored: 0, not NaN


def test_bad_inputs_raise_clear_errors():
    hidden, weight, targets, bias = _inputs((4,), 8, 11, torch.float32)
    with pytest.raises(ValueError, match="same H"):
        rk.linear_logprobs(hidden, weight[:, :5], targets)
    for empty in ((0, 8), (11, 0)):  # no vocabulary / no hidden units: a clear error, not a reshape failure
        with pytest.raises(ValueError, match=r"weight must be \[V, H\] with V >= 1 and H >= 1"):
            rk.linear_logprobs(hidden[..., : empty[1]], weight.new_zeros(empty), targets)
    with pytest.raises(ValueError, match="targets"):
        rk.linear_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="bias"):
        rk.linear_logprobs(hidden, weight, targets, bias[:4])
    with pytest.raises(ValueError, match="chunk_size"):
        rk.linear_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(TypeError, match="targets"):
        rk.linear_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="temperature"):
        rk.linear_logprobs(hidden, weight, targets, temperature=0.0)
    for fused in (True, False):
        with pytest.raises(ValueError, match="temperature"):
            rk.linear_cross_entropy(hidden.requires_grad_(), weight, targets, temperature=-1.0, grad_in_forward=fused)
    bad = targets.clone()
    bad[2] = 11
    with pytest.raises(ValueError, match=r"targets\[2\] = 11"):
        rk.linear_logprobs(hidden, weight, bad, chunk_size=2)
    with pytest.raises(ValueError, match="reduction"):
        rk.linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="mask"):
        rk.linear_ppo_loss(hidden, weight, targets, torch.zeros(4), torch.zeros(4), torch.ones(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("chunk_by", ["rows", "vocab"])
def test_gpu_bf16_gpt2_shape(backend, chunk_by):
    if backend == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    N, H, V = 4096, 1024, 50257
    hidden, weight, targets, bias = _inputs((N,), H, V, torch.bfloat16, ignore=(0, 17))
    hidden, weight, targets, bias = (t.cuda() for t in (hidden, weight, targets, bias))
    g = torch.Generator().manual_seed(1)
    g_logp = torch.randn(N, generator=g, dtype=torch.float64).cuda()
    g_ent = torch.randn(N, generator=g, dtype=torch.float64).cuda()
    kw = dict(temperature=0.9, return_entropy=True)
    got = _run(lambda h, w, b: rk.linear_logprobs(h, w, targets, b, chunk_by=chunk_by, backend=backend, **kw), hidden,
               weight, bias, g_logp, g_ent)
    in_dtype = _run(_materialised_in_dtype(targets, **kw), hidden, weight, bias, g_logp, g_ent)
    f32 = [t.float() for t in (hidden, weight, bias)]
    oracle = _run(lambda h, w, b: R.linear_logprobs(h, w, targets, b, **kw), *f32, g_logp, g_ent)
    for name, f, r, o in zip(("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), got, in_dtype, oracle):
        assert_matches_oracle(f, r, o, torch.bfloat16, what=f"gpu/bf16/{backend}/{chunk_by}/{name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("V, chunk_size, chunk_by", [(50257, 1000, "rows"), (32000, None, "rows"),
                                                      (50257, 4096, "vocab"), (32000, None, "vocab")])
def test_gpu_bf16_forward_grad_path(backend, V, chunk_size, chunk_by):
    """The fused CE path on the GPU, bf16: padded (odd V) and plain chunks, in-place or spare dlogits buffers,
    first-chunk GEMM into the uninitialised float32 accumulator (poisoned with NaN here); and the same over
    vocabulary slabs (chunk_by="vocab", the last slab of V = 50257 padded)."""
    if backend == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    N, H = 2500, 512
    hidden, weight, targets, bias = _inputs((N,), H, V, torch.bfloat16, ignore=(0, 17))
    hidden, weight, targets, bias = (t.cuda() for t in (hidden, weight, targets, bias))
    leaves = (hidden, weight, bias)

    def fast(h, w, b):
        return rk.linear_cross_entropy(h, w, targets, b, chunk_size=chunk_size, backend=backend,
                                       grad_in_forward=True, chunk_by=chunk_by)

    def materialised(h, w, b):
        nll = -R.logprobs(F.linear(h, w, b), targets)
        return nll.sum() / (targets != -100).sum()

    with poisoned_allocations():
        _, got = _value_and_grads(fast, leaves, 1.0)
    _, in_dtype = _value_and_grads(materialised, leaves, 1.0)
    _, oracle = _value_and_grads(materialised, [t.float() for t in leaves], 1.0)
    for name, f, r, o in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, in_dtype, oracle):
        assert_matches_oracle(f, r, o, torch.bfloat16, what=f"gpu/{backend}/V={V}/{chunk_by}/{name}")


# ------------------------------------------------------------- forward-with-gradient path (CE and PPO losses)

LOSSES = ["ce-mean", "ce-sum"] + [f"ppo:{agg}" for agg in R.LOSS_AGG_MODES]


def _ppo_inputs(hidden, weight, targets, bias, temperature, seed=3):
    """``old_logp`` near the current log-probs (ratios on both sides of the clip range), ``ref_logp``, ``A``, ``mask``."""
    g = torch.Generator().manual_seed(seed)
    lead = targets.shape
    with torch.no_grad():
        logp = R.linear_logprobs(hidden.double(), weight.double(), targets, None if bias is None else bias.double(),
                                 temperature=temperature).float()
    old_logp = logp + 0.3 * torch.randn(lead, generator=g)
    ref_logp = logp + 0.5 * torch.randn(lead, generator=g)
    adv = torch.randn(lead, generator=g)
    mask = torch.rand(lead, generator=g) > 0.25
    if lead[0] > 1:
        mask[-1] = False  # an empty sequence
    return old_logp, adv, mask, ref_logp


_PPO_OPTIONS = dict(kl_coef=0.1, entropy_coef=0.02, clip_low=0.2, clip_high=0.28, dual_clip=3.0)


def _loss_fns(loss, targets, per_token, temperature):
    """``(fast(h, w, b, **kw), materialised(h, w, b))`` for one of ``LOSSES``; materialised = F.linear + the oracle."""
    if loss.startswith("ce-"):
        reduction = loss[3:]

        def fast(h, w, b, **kw):
            return rk.linear_cross_entropy(h, w, targets, b, temperature=temperature, reduction=reduction, **kw)

        def materialised(h, w, b):
            nll = -R.logprobs(F.linear(h, w, b), targets, temperature=temperature)
            if reduction == "sum":
                return nll.sum()
            return R._safe_divide(nll.sum(), (targets != -100).sum().to(nll.dtype))

        return fast, materialised
    loss_agg = loss.split(":", 1)[1]
    old_logp, adv, mask, ref_logp = per_token
    kw_ppo = dict(loss_agg=loss_agg, temperature=temperature, **_PPO_OPTIONS)

    def fast(h, w, b, **kw):
        return rk.linear_ppo_loss(h, w, targets, old_logp, adv, mask, bias=b, ref_logp=ref_logp, **kw_ppo, **kw)

    def materialised(h, w, b):
        d = h.dtype if h.dtype == torch.float64 else torch.float32
        return R.ppo_loss(F.linear(h, w, b), targets, old_logp.to(d), adv.to(d), mask, ref_logp=ref_logp.to(d),
                          **kw_ppo).loss

    return fast, materialised


def assert_loss_and_grads_match(got, in_dtype, oracle, dtype, what):
    """``[loss, grad_hidden, grad_weight, grad_bias]`` of a fast path vs the in-dtype run and the float64 oracle."""
    for name, f, r, o in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, in_dtype, oracle):
        assert f.dtype == (torch.float32 if name == "loss" else dtype), f"{what}/{name}: {f.dtype}"
        assert_matches_oracle(f, r, o, dtype, what=f"{what}/{name}")


def _value_and_grads(fn, leaves, upstream):
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    loss = out.loss if isinstance(out, rk.PPOLossOutput) else out
    grads = torch.autograd.grad(loss * upstream, leaves)
    return out, [loss.detach()] + list(grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_forward_grad_path_matches_oracle_and_recompute(backend, dtype, loss):
    """Values and the three gradients of the forward-with-gradient path vs float64, and vs the recompute path."""
    temperature = 0.7
    cases = [((1, 1), 16, 7, None, ()), ((3, 5), 37, 7, 4, (0, 7)), ((2, 6), 20, 301, 5, (3,))]
    for lead, H, V, chunk_size, ignore in cases:
        hidden, weight, targets, bias = _inputs(lead, H, V, dtype, seed=len(lead) + V, ignore=ignore)
        per_token = _ppo_inputs(hidden, weight, targets, bias, temperature)
        fast, materialised = _loss_fns(loss, targets, per_token, temperature)
        leaves = (hidden, weight, bias)
        kw = dict(chunk_size=chunk_size, backend=backend)
        out, got = _value_and_grads(lambda h, w, b: fast(h, w, b, grad_in_forward=True, **kw), leaves, 1.7)
        _, in_dtype = _value_and_grads(materialised, leaves, 1.7)
        _, oracle = _value_and_grads(materialised, [t.double() for t in leaves], 1.7)
        assert_loss_and_grads_match(got, in_dtype, oracle, dtype, f"{backend}/{dtype}/{loss}/{lead}x{H}x{V}")
        out_r, recomputed = _value_and_grads(lambda h, w, b: fast(h, w, b, grad_in_forward=False, **kw), leaves, 1.7)
        for a, b in zip(got, recomputed):  # bf16: the two paths round dlogits differently; scaled tolerance
            atol = 1e-6 if dtype == torch.float32 else 1e-2 * max(1.0, b.abs().max().item())
            torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=atol)
        if isinstance(out, rk.PPOLossOutput):  # the detached statistics agree too
            for a, b in zip(out[1:], out_r[1:]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _MatmulCounter(_LargestTensor):
    """Counts the matmuls (and records the fused-linear custom ops) a step runs, inside the ops' bodies."""

    _MATMULS = {"linear", "mm", "addmm", "addmm_", "bmm", "matmul"}  # inside a custom op F.linear shows as linear

    def __init__(self):
        super().__init__()
        self._impls["linear_loss_fused"] = L.linear_loss_fused._init_fn
        self._impls["linear_logprobs_frozen_head"] = L.linear_logprobs_frozen_head._init_fn
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten" and func.overloadpacket.__name__ in self._MATMULS:
            self.matmuls += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("loss", ["ce-mean", "ppo:seq-mean-token-mean"])
def test_forward_grad_path_is_what_runs(loss, monkeypatch):
    """Auto picks the 3-matmul forward-with-gradient path when a gradient is needed; the others take 4 (or 1)."""
    N, H, V, chunk = 12, 8, 301, 5  # 3 chunks
    hidden, weight, targets, bias = _inputs((2, 6), H, V, torch.float32)
    fast, _ = _loss_fns(loss, targets, _ppo_inputs(hidden, weight, targets, bias, 1.0), 1.0)

    def step(grad=True, dtype=torch.float32, **kw):
        leaves = [t.to(dtype).requires_grad_(grad) for t in (hidden, weight, bias)]
        mode = _MatmulCounter()
        with mode:
            out = fast(*leaves, chunk_size=chunk, backend=BACKENDS[0], **kw)
            value = out.loss if isinstance(out, rk.PPOLossOutput) else out
            if grad:
                value.backward()
        assert mode.largest < N * V, mode.largest  # the logits never exist whole
        return mode.ops, mode.matmuls

    assert step() == ({"linear_loss_fused"}, 3 * 3)
    assert step(grad_in_forward=False) == ({"linear_logprobs_fwd", "linear_logprobs_bwd"}, 4 * 3)
    assert step(grad=False) == ({"linear_logprobs_fwd"}, 3)
    assert step(dtype=torch.float64)[0] == {"linear_logprobs_fwd", "linear_logprobs_bwd"}  # checks: exact weights
    assert step(dtype=torch.float64, grad_in_forward=True)[0] == {"linear_loss_fused"}
    monkeypatch.setenv("RLHF_KERNELS_LINEAR_GRAD", "recompute")
    assert step()[0] == {"linear_logprobs_fwd", "linear_logprobs_bwd"}
    assert step(grad_in_forward=True)[0] == {"linear_loss_fused"}
    monkeypatch.setenv("RLHF_KERNELS_LINEAR_GRAD", "forward")
    assert step(dtype=torch.float64)[0] == {"linear_loss_fused"}
    monkeypatch.setenv("RLHF_KERNELS_LINEAR_GRAD", "sometimes")
    with pytest.raises(ValueError, match="RLHF_KERNELS_LINEAR_GRAD"):
        step()


def test_forward_grad_path_only_needed_grads_and_reduction_none():
    hidden, weight, targets, bias = _inputs((7,), 9, 13, torch.float32, ignore=(2,))
    h = hidden.clone().requires_grad_(True)  # frozen head
    loss = rk.linear_cross_entropy(h, weight, targets, bias, chunk_size=3)
    (gh,) = torch.autograd.grad(loss, h)
    mode = _MatmulCounter()
    with mode:
        rk.linear_cross_entropy(h, weight, targets, bias, chunk_size=3).backward()
    assert mode.ops == {"linear_loss_fused"} and mode.matmuls == 3 * 2  # no dW GEMM
    h2 = hidden.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.cross_entropy(F.linear(h2, weight.double(), bias.double()), targets), h2)
    torch.testing.assert_close(gh.double(), expected, rtol=1e-5, atol=1e-7)
    mode = _MatmulCounter()
    with mode:  # per-token output, frozen head: the gradient direction in the forward (logits, dX per chunk)
        rk.linear_cross_entropy(h, weight, targets, bias, reduction="none", chunk_size=3).sum().backward()
    assert mode.ops == {"linear_logprobs_frozen_head"} and mode.matmuls == 3 * 2
    mode = _MatmulCounter()
    with mode:  # per-token output, the head trains: the upstream gradient is not known in the forward
        w = weight.clone().requires_grad_(True)
        rk.linear_cross_entropy(h, w, targets, bias, reduction="none", chunk_size=3).sum().backward()
    assert mode.ops == {"linear_logprobs_fwd", "linear_logprobs_bwd"}


@pytest.mark.parametrize("chunk_by", ["rows", "vocab"])
def test_forward_grad_path_gradcheck_float64(chunk_by):
    hidden, weight, targets, bias = _inputs((2, 4), 5, 7, torch.float64, ignore=(2,))
    per_token = [t.double() for t in _ppo_inputs(hidden, weight, targets, bias, 0.8)[:2]] + [
        torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=torch.bool)
    ]
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]

    def ppo(h, w, b):
        return rk.linear_ppo_loss(h, w, targets, *per_token, bias=b, temperature=0.8, entropy_coef=0.05,
                                  loss_agg="seq-mean-token-mean", chunk_size=3, grad_in_forward=True,
                                  chunk_by=chunk_by).loss

    def ce(h, w, b):
        return rk.linear_cross_entropy(h, w, targets, b, chunk_size=3, grad_in_forward=True, chunk_by=chunk_by) * 1.3

    # the forward path's aggregation weights are float32 (module docstring): float32-level tolerances
    assert torch.autograd.gradcheck(ppo, leaves, atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradcheck(ce, leaves, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("chunk_by", ["rows", "vocab"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_grad_opcheck(backend, chunk_by):
    hidden, weight, targets, bias = _inputs((2, 5), 6, 13, torch.float32, ignore=(3,))
    old_logp, adv, mask, ref_logp = _ppo_inputs(hidden, weight, targets, bias, 0.9)
    h, w, b = (t.requires_grad_(True) for t in (hidden.reshape(10, 6), weight, bias))
    flat = [t.reshape(-1) for t in (old_logp, adv, ref_logp)]
    ppo = (h, w, targets.reshape(-1), b, mask, *flat, 0.9, -100, "ppo", "seq-mean-token-mean", 0.1, "k3", 0.01, 0.2,
           0.28, 3.0, 4, backend, True, True, True, chunk_by)  # fmt: skip
    torch.library.opcheck(L.linear_loss_fused, ppo)
    nll = (h, w, targets.reshape(-1), None, targets != -100, None, None, None, 1.0, -100, "nll", "sum", 0.0, "k3", 0.0,
           0.2, 0.2, None, 0, backend, True, False, False, chunk_by)  # fmt: skip
    torch.library.opcheck(L.linear_loss_fused, nll)


def test_forward_grad_torch_compile_fullgraph():
    hidden, weight, targets, bias = _inputs((2, 7), 10, 29, torch.float32, ignore=(4,))
    old_logp, adv, mask, ref_logp = _ppo_inputs(hidden, weight, targets, bias, 1.0)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]

    def loss_fn(h, w, b):
        ppo = rk.linear_ppo_loss(h, w, targets, old_logp, adv, mask, bias=b, ref_logp=ref_logp, kl_coef=0.1,
                                 loss_agg="seq-mean-token-mean", chunk_size=4, backend=BACKENDS[0])
        return 2.0 * ppo.loss + rk.linear_cross_entropy(h, w, targets, b, chunk_size=3, backend=BACKENDS[0])

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    grads = torch.autograd.grad(got, leaves)
    expected = loss_fn(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch.testing.assert_close(got, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_forward_grad_backward_twice():
    """On the CPU the kept gradients are returned as they are (upstream gradient 1) or scaled into a copy: a retained
    graph's backward can run again and gives the same gradient."""
    hidden, weight, targets, _ = _inputs((6,), 8, 11, torch.float32)
    h = hidden.requires_grad_(True)
    for scale in (1.0, 3.0):
        h.grad = None
        loss = scale * rk.linear_cross_entropy(h, weight, targets, chunk_size=4)
        loss.backward(retain_graph=True)
        first = h.grad.clone()
        loss.backward()
        torch.testing.assert_close(h.grad, 2 * first)
        if scale == 1.0:
            unit = first
    torch.testing.assert_close(first, 3 * unit)


def test_forward_grad_handed_over_backward_runs_once(monkeypatch):
    """Where the gradients are handed over (CUDA; here the CPU too, by HAND_OVER_DEVICES): the upstream gradient
    scales them, and a retained graph's second backward raises by name and adds nothing."""
    monkeypatch.setattr(forward_grads, "HAND_OVER_DEVICES", ("cpu", "cuda"))
    hidden, weight, targets, _ = _inputs((6,), 8, 11, torch.float32)
    h = hidden.requires_grad_(True)
    grads = {}
    for scale in (1.0, 3.0):
        h.grad = None
        loss = scale * rk.linear_cross_entropy(h, weight, targets, chunk_size=4)
        loss.backward(retain_graph=True)
        grads[scale] = h.grad.clone()
        with pytest.raises(RuntimeError, match="linear_loss_fused: its backward already ran"):
            loss.backward()
        torch.testing.assert_close(h.grad, grads[scale])
    torch.testing.assert_close(grads[3.0], 3 * grads[1.0])


@pytest.mark.parametrize("chunk_by", ["rows", "vocab"])
@pytest.mark.parametrize("scale", [1.0, -0.5])
def test_forward_grads_become_dot_grad_without_a_copy(chunk_by, scale, monkeypatch):
    """Where they are handed over (CUDA; here the CPU too), AccumulateGrad adopts the forward's gradient buffers as
    ``.grad`` (no copy, no second buffer): the ``.grad`` tensors are the very storage the forward wrote. A tensor
    saved with ``save_for_backward`` would still be referenced while AccumulateGrad runs, and it would copy it."""
    monkeypatch.setattr(forward_grads, "HAND_OVER_DEVICES", ("cpu", "cuda"))
    hidden, weight, targets, bias = _inputs((7,), 8, 13, torch.float32, ignore=(2,))
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    mask = targets != -100
    outs = L.linear_loss_fused(
        h, w, targets, b, mask, None, None, None, 1.0, -100, "nll", "token-mean", 0.0, "k3", 0.0, 0.2, 0.2, None,
        4, "torch", True, True, True, chunk_by,
    )
    written = [t.data_ptr() for t in outs[3:6]]
    expected = [t.clone() * scale for t in outs[3:6]]
    loss = outs[0] * scale
    del outs
    loss.backward()
    assert [t.grad.data_ptr() for t in (h, w, b)] == written
    for t, e in zip((h, w, b), expected):
        torch.testing.assert_close(t.grad, e)


@pytest.mark.skipif(not (triton_importable() and (torch.cuda.is_available() or triton_interpreting())),
                    reason="needs triton (GPU, or TRITON_INTERPRET=1 on the CPU)")
@pytest.mark.parametrize("loss", ["ce-mean", "ppo:seq-mean-token-mean"])
def test_forward_grad_triton_backend_small(loss):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, bias = _inputs((2, 5), 12, 37, torch.float32, ignore=(3,))
    per_token = _ppo_inputs(hidden, weight, targets, bias, 0.8)
    hidden, weight, targets, bias, *per_token = (t.to(device) for t in (hidden, weight, targets, bias, *per_token))
    fast, materialised = _loss_fns(loss, targets, per_token, 0.8)
    leaves = (hidden, weight, bias)
    _, got = _value_and_grads(lambda h, w, b: fast(h, w, b, chunk_size=3, backend="triton"), leaves, 1.0)
    _, expected = _value_and_grads(materialised, [t.double() for t in leaves], 1.0)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_by", ["rows", "vocab"])
def test_fused_backward_materialises_no_zero_gradients(chunk_by, monkeypatch):
    """The fused loss's gradient outputs take no upstream gradient: its backward must not be handed zero-filled
    tensors shaped like them (autograd's default for unused outputs), which for the [V, H] weight gradient is a
    head-sized buffer per step."""
    monkeypatch.setattr(forward_grads, "HAND_OVER_DEVICES", ("cpu", "cuda"))
    hidden, weight, targets, bias = _inputs((7,), 8, 13, torch.float32, ignore=(2,))
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss = rk.linear_cross_entropy(h, w, targets, bias=b, chunk_size=4, chunk_by=chunk_by)
    assert zero_fills_during(loss.backward, min(h.numel(), w.numel())) == []
    assert all(t.grad is not None for t in (h, w, b))


def test_float32_gemm_reduction_turns_off_reduced_precision_split_k_for_16_bit_cuda_gemms():
    """The vocabulary slabs' weight-gradient GEMM writes 16-bit output straight away; inside
    ``float32_gemm_reduction`` cuBLAS may not sum its split-K parts in 16 bits, and the flag comes back after,
    also on an error. Only ``is_cuda`` and ``dtype`` are read, so a stand-in operand runs this without a GPU."""
    from types import SimpleNamespace

    matmul = torch.backends.cuda.matmul
    flags = {torch.bfloat16: "allow_bf16_reduced_precision_reduction",
             torch.float16: "allow_fp16_reduced_precision_reduction"}
    saved = {name: getattr(matmul, name) for name in flags.values()}
    try:
        for dtype, name in flags.items():
            other = flags[torch.float16 if dtype == torch.bfloat16 else torch.bfloat16]
            setattr(matmul, name, True)
            setattr(matmul, other, True)
            with L.float32_gemm_reduction(SimpleNamespace(is_cuda=True, dtype=dtype)):
                assert getattr(matmul, name) is False and getattr(matmul, other) is True
            assert getattr(matmul, name) is True
            with pytest.raises(RuntimeError, match="boom"):
                with L.float32_gemm_reduction(SimpleNamespace(is_cuda=True, dtype=dtype)):
                    raise RuntimeError("boom")
            assert getattr(matmul, name) is True
            with L.float32_gemm_reduction(SimpleNamespace(is_cuda=False, dtype=dtype)):
                assert getattr(matmul, name) is True  # the CPU: untouched
            setattr(matmul, name, False)  # the user's choice stays
            with L.float32_gemm_reduction(SimpleNamespace(is_cuda=True, dtype=dtype)):
                assert getattr(matmul, name) is False
            assert getattr(matmul, name) is False
        for name in flags.values():
            setattr(matmul, name, True)
        with L.float32_gemm_reduction(SimpleNamespace(is_cuda=True, dtype=torch.float32)):
            assert all(getattr(matmul, name) is True for name in flags.values())  # float32: untouched
    finally:
        for name, value in saved.items():
            setattr(matmul, name, value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["forward-grad", "recompute"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_linear_ppo_loss_in_every_clip_regime(backend, grad_in_forward, dual_clip):
    """Loss and the three gradients against the oracle for ratios on each side of each clip, beyond a dual clip of 3
    and past the ±20 log-ratio clamp, with both signs of the advantage (test_small_ops' clip-regime test for the
    fused-linear head). The forward-gradient path's max(pg_u, pg_c) turned into min(...) passed every other test:
    their old log-probs were near the policy's, or compared with ``ppo_loss``, which shares that derivative."""
    hidden, weight, targets, bias = _inputs((2, 8), 10, 37, torch.float32, seed=6)  # 8 tokens a row: LOG_RATIOS
    with torch.no_grad():
        logp = R.linear_logprobs(hidden.double(), weight.double(), targets, bias.double(), temperature=0.9)
    old, adv = old_logp_and_advantages(logp)
    mask = torch.ones(2, 8, dtype=torch.bool)
    kw = dict(ref_logp=old + 0.3, kl_coef=0.1, entropy_coef=0.01, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip,
              temperature=0.9)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = rk.linear_ppo_loss(*leaves[:2], targets, old, adv, mask, bias=leaves[2], chunk_size=5, backend=backend,
                             grad_in_forward=grad_in_forward, **kw)
    grads = torch.autograd.grad(out.loss, leaves)
    leaves64 = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    oracle = R.ppo_loss(F.linear(*leaves64), targets, old.double(), adv.double(), mask,
                        **{**kw, "ref_logp": kw["ref_logp"].double()})
    grads64 = torch.autograd.grad(oracle.loss, leaves64)
    for name in ("loss", "clip_frac", "approx_kl"):
        torch.testing.assert_close(getattr(out, name).double(), getattr(oracle, name), atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, grads64):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"grad_{name}: {m}")
