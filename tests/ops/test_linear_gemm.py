"""``ops/_linear_gemm.py``: the fused-linear GEMMs split at the last whole 16-byte vector of the vocabulary.

The split runs on CUDA only; here ``SPLIT_DEVICES`` is widened to the CPU, so
the same code paths run: every GEMM of every fused-linear path (row chunks,
vocabulary slabs, the frozen head, the losses' forward-with-gradient path) must
see a vocabulary extent that is a whole number of vectors, and the values and
all three gradients must still match the float64 oracle (DESIGN.md §5's rule).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rlhf_kernels as rk
from rlhf_kernels import reference as R
from rlhf_kernels.ops import _linear_gemm as gemm
from tests.ops.test_linear import (
    BACKENDS,
    LOSSES,
    _check,
    _inputs,
    _loss_fns,
    _MatmulCounter,
    _ppo_inputs,
    _value_and_grads,
    assert_loss_and_grads_match,
)
from tests.tolerance import assert_matches_oracle


@pytest.fixture
def split_on_cpu(monkeypatch):
    monkeypatch.setattr(gemm, "SPLIT_DEVICES", ("cuda", "cpu"))


@pytest.mark.parametrize(
    "dtype, v, parts",
    [
        (torch.bfloat16, 50257, ((0, 50256), (50256, 50257))),
        (torch.float16, 301, ((0, 296), (296, 301))),
        (torch.float32, 50257, ((0, 50256), (50256, 50257))),
        (torch.float32, 7, ((0, 4), (4, 7))),
        (torch.float64, 301, ((0, 300), (300, 301))),
        (torch.bfloat16, 7, ((0, 7),)),  # shorter than one vector: nothing to split off
        (torch.bfloat16, 151936, ((0, 151936),)),  # aligned already
        (torch.float32, 0, ((0, 0),)),
    ],
)
def test_vocab_parts(split_on_cpu, dtype, v, parts):
    assert gemm.vocab_parts(v, torch.empty(0, dtype=dtype)) == parts


def test_vocab_parts_leave_other_devices_alone():
    assert gemm.SPLIT_DEVICES == ("cuda",)
    assert gemm.vocab_parts(50257, torch.empty(0, dtype=torch.bfloat16)) == ((0, 50257),)


class _GemmShapes(_MatmulCounter):
    """Records the shape of every 2-D operand and output of every matmul, inside the fused-linear ops' bodies."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten" and func.overloadpacket.__name__ in self._MATMULS:
            tensors = [t for t in list(args) + list((kwargs or {}).values()) if isinstance(t, torch.Tensor)]
            self.shapes.append(tuple(tuple(t.shape) for t in tensors if t.dim() == 2))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _logprobs(leaves, targets, chunk, chunk_by, backend, entropy=True):
    return rk.linear_logprobs(leaves[0], leaves[1], targets, leaves[2], chunk_size=chunk, chunk_by=chunk_by,
                              backend=backend, return_entropy=entropy)


def _all_paths_gemm_shapes(V):
    """Every fused-linear path's GEMM shapes, bf16, ``N = 16``, ``H = 24`` (multiples of 8), vocabulary ``V``:
    ``linear_logprobs`` in row chunks of 8 and in slabs of 64 columns (the last one ``V % 64`` wide), the frozen
    head, and the losses' forward-with-gradient path in rows and in slabs."""
    hidden, weight, targets, bias = _inputs((2, 8), 24, V, torch.bfloat16, ignore=(3,))
    per_token = _ppo_inputs(hidden, weight, targets, bias, 1.0)
    mode = _GemmShapes()
    backend = BACKENDS[0]
    with mode:
        for chunk_by, chunk in (("rows", 8), ("vocab", 64)):
            leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
            lp, ent = _logprobs(leaves, targets, chunk, chunk_by, backend)
            (lp.sum() + ent.sum()).backward()
            for loss in ("ce-mean", "ppo:token-mean"):
                fast, _ = _loss_fns(loss, targets, per_token, 1.0)
                leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
                out = fast(*leaves, chunk_size=chunk, chunk_by=chunk_by, backend=backend, grad_in_forward=True)
                (out.loss if hasattr(out, "loss") else out).backward()
        h = hidden.clone().requires_grad_(True)  # the frozen head: only the hidden states train
        _logprobs([h, weight, bias], targets, 8, "rows", backend, entropy=False).sum().backward()
    assert {"linear_logprobs_fwd", "linear_logprobs_bwd", "linear_loss_fused",
            "linear_logprobs_frozen_head"} <= mode.ops, mode.ops
    return mode.shapes


def test_every_gemm_sees_a_whole_number_of_vectors_along_the_vocabulary(split_on_cpu):
    """With the split, no GEMM extent is an unaligned stretch of 8 or more (N, H are multiples of 8 here, so any
    such extent would be the vocabulary's); without it (the CPU's default), V = 301 itself reaches the GEMMs,
    so the recorder does see the extents that matter."""
    shapes = _all_paths_gemm_shapes(301)
    unaligned = {s for s in shapes for dims in s for d in dims if d % 8 and d >= 8}
    assert shapes and not unaligned, sorted(unaligned)[:5]
    assert any(d in (5, 45) for s in shapes for dims in s for d in dims)  # tails of 301 and of the last slab


def test_without_the_split_the_recorder_sees_the_unaligned_vocabulary():
    shapes = _all_paths_gemm_shapes(301)
    assert any(301 in dims or 45 in dims for s in shapes for dims in s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_by", ["rows", "vocab"])
@pytest.mark.parametrize("lead, H, V, chunk_size", [((13,), 37, 7, 4), ((2, 9), 40, 301, 5), ((3,), 24, 1001, None)])
def test_split_gemms_match_the_oracle(split_on_cpu, backend, dtype, chunk_by, lead, H, V, chunk_size):
    """``linear_logprobs`` (values, entropy, the three gradients) with every GEMM split: fp32 V = 7 splits 4 + 3,
    bf16 V = 7 does not; slabs of ``chunk_size - 2`` columns end in a split slab."""
    hidden, weight, targets, bias = _inputs(lead, H, V, dtype, ignore=(0,))
    if chunk_by == "vocab" and chunk_size is not None:
        chunk_size -= 2
    _check(hidden, weight, targets, bias, backend=backend, temperature=0.7, chunk_size=chunk_size, chunk_by=chunk_by)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", [LOSSES[0], LOSSES[-1]])
@pytest.mark.parametrize("chunk_by", ["rows", "vocab"])
def test_split_gemms_match_the_oracle_in_the_losses(split_on_cpu, backend, dtype, loss, chunk_by):
    """The forward-with-gradient path (loss and the three gradients) and the frozen head's direction."""
    hidden, weight, targets, bias = _inputs((2, 6), 20, 301, dtype, seed=5, ignore=(3,))
    per_token = _ppo_inputs(hidden, weight, targets, bias, 0.7)
    fast, materialised = _loss_fns(loss, targets, per_token, 0.7)
    leaves = (hidden, weight, bias)
    kw = dict(chunk_size=5 if chunk_by == "rows" else 60, chunk_by=chunk_by, backend=backend, grad_in_forward=True)
    _, got = _value_and_grads(lambda h, w, b: fast(h, w, b, **kw), leaves, 1.3)
    _, in_dtype = _value_and_grads(materialised, leaves, 1.3)
    _, oracle = _value_and_grads(materialised, [t.double() for t in leaves], 1.3)
    assert_loss_and_grads_match(got, in_dtype, oracle, dtype, f"{backend}/{dtype}/{loss}/{chunk_by}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_with_split_gemms_matches_the_oracle(split_on_cpu, dtype):
    hidden, weight, targets, bias = _inputs((3, 7), 24, 301, dtype, seed=2, ignore=(4,))
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def run(fn, h):
        h = h.detach().requires_grad_(True)
        lp = fn(h)
        (grad,) = torch.autograd.grad((lp.double() * upstream).sum(), h)
        return lp, grad

    mode = _MatmulCounter()
    with mode:
        got = run(lambda h: rk.linear_logprobs(h, weight, targets, bias, chunk_size=8, backend=BACKENDS[0]), hidden)
    assert "linear_logprobs_frozen_head" in mode.ops, mode.ops
    in_dtype = run(lambda h: R.logprobs(F.linear(h, weight, bias), targets), hidden)
    oracle = run(lambda h: R.linear_logprobs(h, weight.double(), targets, bias.double()), hidden.double())
    for name, f, r, o in zip(("logp", "grad_hidden"), got, in_dtype, oracle):
        assert_matches_oracle(f, r, o, dtype, what=f"frozen/{dtype}/{name}")


def test_a_second_gradient_buffer_is_aligned_too():
    """The CUDA backend writes ``dlogits`` into a second buffer (``_chunk_buffers``); made fresh, as for a slab, it
    is padded like the logits' (``_row_buffer``), else its rows' odd stride would undo the split."""
    from rlhf_kernels.ops import _linear_common as C

    logits = C._row_buffer(5, 301, torch.empty(0, dtype=torch.bfloat16))
    grad = C._grad_buffer(logits, "cuda", None)
    assert grad.shape == (5, 301) and grad.stride(0) % 8 == 0 and grad.data_ptr() != logits.data_ptr()
    assert C._grad_buffer(torch.empty(5, 304, dtype=torch.bfloat16), "cuda", None).is_contiguous()
    assert C._grad_buffer(logits, "cpu", None) is logits  # one buffer: dlogits over the logits


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["frozen", "rows", "vocab"])
def test_gpu_split_at_gpt2_vocab_matches_the_oracle_and_one_gemm(monkeypatch, dtype, path):
    """At V = 50257 on the GPU (bf16 splits 50256 + 1, fp32 too): the frozen head's direction (a float32 output
    summed over the split), the row chunks and the slabs, against the float64 oracle, and close to the same call
    with one GEMM each (``SPLIT_DEVICES`` emptied)."""
    N, H, V = 1500, 256, 50257
    assert gemm.vocab_parts(V, torch.empty(0, dtype=dtype, device="cuda")) == ((0, 50256), (50256, V))
    hidden, weight, targets, bias = (t.cuda() for t in _inputs((N,), H, V, dtype, seed=4, ignore=(0, 9)))
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64).cuda()
    frozen = path == "frozen"
    chunk_by = "rows" if frozen else path

    def run(h, w, b, fn):
        leaves = [h.detach().requires_grad_(True)] + [t.detach().requires_grad_(not frozen) for t in (w, b)]
        lp = fn(*leaves)
        grads = torch.autograd.grad((lp.double() * upstream).sum(), [t for t in leaves if t.requires_grad])
        return [lp] + list(grads)

    def fast(h, w, b):
        return rk.linear_logprobs(h, w, targets, b, chunk_size=700 if chunk_by == "rows" else 4096, chunk_by=chunk_by)

    split = run(hidden, weight, bias, fast)
    monkeypatch.setattr(gemm, "SPLIT_DEVICES", ())
    single = run(hidden, weight, bias, fast)
    in_dtype = run(hidden, weight, bias, lambda h, w, b: R.logprobs(F.linear(h, w, b), targets))
    oracle = run(hidden.double(), weight.double(), bias.double(),
                 lambda h, w, b: R.linear_logprobs(h, w, targets, b))
    names = ("logp", "grad_hidden", "grad_weight", "grad_bias")
    for name, s, one, r, o in zip(names, split, single, in_dtype, oracle):
        assert_matches_oracle(s, r, o, dtype, what=f"gpu/{path}/{dtype}/{name}")
        scale = max(1.0, one.abs().max().item())
        atol = (2e-2 if dtype == torch.bfloat16 else 1e-5) * scale
        torch.testing.assert_close(s.double(), one.double(), rtol=0, atol=atol)
