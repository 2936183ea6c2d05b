"""``chunk_by="vocab"``: the fused-linear ops' gradient over vocabulary slabs (no [V, H] float32 accumulator).

Against the float64 oracle (values and the three gradients, DESIGN.md §5's rule)
and the row-chunked path, on odd shapes (N = 1, V = 7 in slabs of 3, V = 301,
50257, H not a multiple of 8), ignored and all-ignored targets, temperature,
every PPO aggregation, a slab whose logits are all -inf, poisoned allocations;
plus the matmul counts (the losses: 2 per row chunk, then 2 per slab; linear_logprobs: 4 per slab), torch.compile, the Triton backend under
the interpreter and the setting's errors (gradcheck and opcheck: test_linear.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference as R
from rlhf_kernels.ops import _linear_layout as layout
from rlhf_kernels.ops import _linear_slabs as slabs
from rlhf_kernels.ops import linear as L
from rlhf_kernels.ops._dispatch import triton_importable, triton_interpreting
from tests.ops.test_linear import (
    BACKENDS,
    LOSSES,
    _inputs,
    _loss_fns,
    _MatmulCounter,
    _ppo_inputs,
    _value_and_grads,
    assert_loss_and_grads_match,
)
from tests.poison import poisoned_allocations


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_vocab_slabs_match_oracle_and_row_chunks(backend, dtype, loss):
    temperature = 0.7
    # (lead, H, V, slab columns, ignored positions)
    cases = [((1, 1), 16, 7, 3, ()), ((3, 5), 37, 7, None, (0, 7)), ((2, 6), 20, 301, 64, (3,)),
             ((2, 3), 13, 301, 100, (0, 1, 2, 3, 4, 5)),
             ((4, 5), 11, 29, 4, (2, 9))]  # fmt: skip  (the last: 5 row chunks of 4, then 8 slabs of 4 columns)
    for lead, H, V, cols, ignore in cases:
        hidden, weight, targets, bias = _inputs(lead, H, V, dtype, seed=len(lead) + V + H, ignore=ignore)
        per_token = _ppo_inputs(hidden, weight, targets, bias, temperature)
        fast, materialised = _loss_fns(loss, targets, per_token, temperature)
        leaves = (hidden, weight, bias)
        kw = dict(chunk_size=cols, backend=backend, grad_in_forward=True)
        with poisoned_allocations():
            out, got = _value_and_grads(lambda h, w, b: fast(h, w, b, chunk_by="vocab", **kw), leaves, 1.7)
        _, in_dtype = _value_and_grads(materialised, leaves, 1.7)
        _, oracle = _value_and_grads(materialised, [t.double() for t in leaves], 1.7)
        what = f"{backend}/{dtype}/{loss}/{lead}x{H}x{V}/slab {cols}"
        assert_loss_and_grads_match(got, in_dtype, oracle, dtype, what)
        out_rows, rows = _value_and_grads(lambda h, w, b: fast(h, w, b, chunk_by="rows", **kw), leaves, 1.7)
        # both paths match the oracle (above); against each other, a scaled tolerance: bf16 rounds dlogits
        # differently on each, and float32 sums over rows in another order (row chunks vs one GEMM over N)
        for a, b in zip(got, rows):
            atol = (1e-6 if dtype == torch.float32 else 1e-2) * max(1.0, b.abs().max().item())
            torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=atol)
        if isinstance(out, rk.PPOLossOutput):  # logp, entropy, kl, clip_frac, approx_kl
            for a, b in zip(out[1:], out_rows[1:]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_vocab_slabs_gpt2_vocab_default_width():
    """V = 50257 (not a multiple of 8) in the default slab width: several slabs, the last one padded."""
    hidden, weight, targets, bias = _inputs((16, 32), 12, 50257, torch.float32, seed=5, ignore=(4,))
    n = targets.numel()
    assert 1 < -(-50257 // L.slab_columns(n, 50257, torch.float32, torch.device("cpu"), 0))
    fast, materialised = _loss_fns("ce-mean", targets, None, 1.0)
    leaves = (hidden, weight, bias)
    _, got = _value_and_grads(lambda h, w, b: fast(h, w, b, chunk_by="vocab", grad_in_forward=True), leaves, 1.0)
    _, in_dtype = _value_and_grads(materialised, leaves, 1.0)
    _, oracle = _value_and_grads(materialised, [t.double() for t in leaves], 1.0)
    assert_loss_and_grads_match(got, in_dtype, oracle, torch.float32, "V=50257")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_slab_of_masked_logits(backend):
    """A bias of -inf over a whole slab (a masked vocabulary range): that slab adds nothing, nothing turns NaN."""
    hidden, weight, targets, bias = _inputs((2, 4), 9, 11, torch.float32, seed=2)
    bias = bias.clone()
    bias[:4] = float("-inf")  # slab 0 with 4 columns
    targets = targets.clamp(min=4)
    loss, ent = "ppo:token-mean", 0.05
    per_token = _ppo_inputs(hidden, weight, targets, bias, 1.0)
    fast, _ = _loss_fns(loss, targets, per_token, 1.0)
    leaves = (hidden, weight, bias)
    kw = dict(chunk_size=4, backend=backend, grad_in_forward=True)
    out, got = _value_and_grads(lambda h, w, b: fast(h, w, b, chunk_by="vocab", **kw), leaves, 1.0)
    out_rows, rows = _value_and_grads(lambda h, w, b: fast(h, w, b, chunk_by="rows", **kw), leaves, 1.0)
    assert all(torch.isfinite(t).all() for t in got[:3]) and torch.isfinite(out.entropy).all()
    for a, b in zip(got[:3], rows[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.entropy, out_rows.entropy, rtol=1e-5, atol=1e-6)
    assert ent  # entropy_coef of _PPO_OPTIONS is non-zero: the entropy's gradient is exercised


def test_vocab_slab_losses_run_two_matmuls_per_row_chunk_then_two_per_slab():
    """The losses' ``chunk_by="vocab"``: row chunks (logits, dX) then slabs (logits, dW), 4 matmuls' worth in all,
    with ``chunk_size`` the rows of a chunk and the columns of a slab; no slab sweep without a weight or bias
    gradient."""
    hidden, weight, targets, bias = _inputs((2, 6), 8, 301, torch.float32)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]

    def count(*leaves):
        mode = _MatmulCounter()
        with mode:
            loss = rk.linear_cross_entropy(*leaves[:2], targets, leaves[2], chunk_size=5, chunk_by="vocab",
                                           backend=BACKENDS[0], grad_in_forward=True)
            loss.backward()
        return mode.matmuls

    chunks, slabs = -(-12 // 5), -(-301 // 5)
    assert count(*leaves) == 2 * chunks + 2 * slabs  # bias: a sum, no matmul
    assert count(leaves[0], weight.detach(), bias.detach()) == 2 * chunks  # hidden only: the row sweep alone


def test_linear_logprobs_slabs_run_four_matmuls_per_slab_and_the_recompute_losses_follow(monkeypatch):
    """``linear_logprobs(chunk_by="vocab")``: one logits GEMM per slab in the forward, then logits, dX and dW per
    slab in the backward; the losses' recompute path (``grad_in_forward=False``) passes ``chunk_by`` through, and
    the environment setting reaches ``linear_logprobs`` too."""
    monkeypatch.delenv("RLHF_KERNELS_LINEAR_CHUNK_BY", raising=False)
    hidden, weight, targets, bias = _inputs((2, 6), 8, 301, torch.float32)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    slabs = -(-301 // 64)

    def count(fn, **kw):
        mode = _MatmulCounter()
        with mode:
            fn(*leaves[:2], targets, leaves[2], chunk_size=64, backend=BACKENDS[0], **kw).sum().backward()
        return mode.matmuls

    assert count(rk.linear_logprobs, chunk_by="vocab") == 4 * slabs
    assert count(rk.linear_cross_entropy, chunk_by="vocab", grad_in_forward=False) == 4 * slabs
    monkeypatch.setenv("RLHF_KERNELS_LINEAR_CHUNK_BY", "vocab")
    assert count(rk.linear_logprobs) == 4 * slabs
    monkeypatch.setenv("RLHF_KERNELS_LINEAR_CHUNK_BY", "rows")
    assert count(rk.linear_logprobs) == 4 * -(-12 // 64)  # one 12-row chunk: logits, then logits, dX, dW
    with pytest.raises(ValueError, match="chunk_by"):
        rk.linear_logprobs(hidden, weight, targets, chunk_by="columns")


def test_linear_logprobs_auto_takes_slabs_for_a_16_bit_head_that_trains(monkeypatch):
    """``chunk_by="auto"`` for ``linear_logprobs``: the vocabulary slabs when the row chunks would hold a float32
    ``[V, H]`` weight-gradient accumulator (a 16-bit weight that needs a gradient, no ``chunk_size`` given) on an
    AUTO_CHUNK_DEVICES device (CUDA; widened to the CPU here); the row chunks otherwise. The slabs give the row
    chunks' values and gradients."""
    monkeypatch.delenv("RLHF_KERNELS_LINEAR_CHUNK_BY", raising=False)
    hidden, weight, targets, bias = _inputs((2, 6), 8, 301, torch.bfloat16, ignore=(4,))
    monkeypatch.setattr(slabs, "slab_columns", lambda *args: 100)  # 4 slabs, so that they show in the matmul count
    assert L.logprobs_chunk_by(None, weight.clone().requires_grad_(True)) == "rows"  # the CPU: rows
    monkeypatch.setattr(layout, "AUTO_CHUNK_DEVICES", ("cpu", "cuda"))

    def run(dtype=torch.bfloat16, train_head=True, **kw):
        leaves = [t.to(dtype).requires_grad_(True) for t in (hidden, bias)]
        w = weight.to(dtype).requires_grad_(train_head)
        mode = _MatmulCounter()
        with mode:
            lp, ent = rk.linear_logprobs(leaves[0], w, targets, leaves[1], return_entropy=True, backend=BACKENDS[0],
                                         **kw)
            grads = torch.autograd.grad((lp * 0.7 - ent).sum(), leaves + ([w] if train_head else []))
        return (lp, ent) + grads, mode.matmuls

    auto, matmuls = run()
    assert matmuls == 4 * 4  # per slab: logits, then logits, dX, dW (one row chunk of 12 would be 4 in all)
    rows, matmuls = run(chunk_by="rows")
    assert matmuls == 4
    for a, b in zip(auto, rows):  # bf16: the paths round dlogits differently
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-2 * max(1.0, b.abs().max().item()))
    assert run(chunk_size=12)[1] == 4  # chunk_size given: rows of it
    assert run(dtype=torch.float32)[1] == 4  # float32 accumulates in its own gradient: rows
    assert run(train_head=False)[1] == 3  # frozen head: rows (logits, then logits and dX)
    with torch.no_grad():  # no gradient at all: one row chunk
        mode = _MatmulCounter()
        with mode:
            rk.linear_logprobs(hidden, weight.requires_grad_(True), targets, backend=BACKENDS[0])
        assert mode.matmuls == 1
    assert L.logprobs_chunk_by(None, weight.requires_grad_(True)) == "vocab"
    assert L.logprobs_chunk_by("rows", weight) == "rows" and L.logprobs_chunk_by(None, None) == "rows"


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_slabs_compile(backend):
    # gradcheck and opcheck of the slab path: test_linear.py (parametrized over chunk_by)
    hidden, weight, targets, bias = _inputs((2, 5), 6, 13, torch.float32, ignore=(3,))
    h, w, b = (t.requires_grad_(True) for t in (hidden.reshape(10, 6), weight, bias))

    def loss_fn(h, w, b):
        return rk.linear_cross_entropy(h, w, targets.reshape(-1), b, chunk_size=5, backend=backend, chunk_by="vocab")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(h, w, b)
    expected = loss_fn(h, w, b)
    torch.testing.assert_close(got, expected)
    for a, e in zip(torch.autograd.grad(got, (h, w, b)), torch.autograd.grad(expected, (h, w, b))):
        torch.testing.assert_close(a, e)


def test_chunk_by_setting(monkeypatch):
    hidden, weight, targets, _ = _inputs((5,), 4, 9, torch.float32)
    h = hidden.requires_grad_(True)
    with pytest.raises(ValueError, match="chunk_by"):
        rk.linear_cross_entropy(h, weight, targets, chunk_by="columns")
    monkeypatch.setenv("RLHF_KERNELS_LINEAR_CHUNK_BY", "bogus")
    with pytest.raises(ValueError, match="RLHF_KERNELS_LINEAR_CHUNK_BY"):
        rk.linear_cross_entropy(h, weight, targets)
    monkeypatch.setenv("RLHF_KERNELS_LINEAR_CHUNK_BY", "Vocab")
    assert L.linear_chunk_by(None) == "vocab" and L.linear_chunk_by("rows") == "rows"
    mode = _MatmulCounter()
    with mode:  # the environment picks the slabs' path: 3-row chunks of N = 5 give logits and dX (no dW wanted)
        rk.linear_cross_entropy(h, weight, targets, chunk_size=3, backend=BACKENDS[0]).backward()
    assert mode.matmuls == 4


def test_chunk_by_auto_falls_back_to_slabs_when_the_accumulator_does_not_fit(monkeypatch):
    """chunk_by="auto" (the default): the row chunks unless their [V, H] float32 weight-gradient accumulator would
    take more than 90% of the device's free memory; then the vocabulary slabs, warning once. Only on
    AUTO_CHUNK_DEVICES (CUDA; widened to the CPU here, with the free memory faked), never for a float32 weight (it
    accumulates in its own gradient) or a weight that needs no gradient."""
    monkeypatch.delenv("RLHF_KERNELS_LINEAR_CHUNK_BY", raising=False)
    hidden, weight, targets, _ = _inputs((5,), 4, 9, torch.float32)
    w16 = weight.to(torch.bfloat16).requires_grad_(True)
    need = w16.numel() * 4
    monkeypatch.setattr(layout, "SLABS_FIRST_DEVICES", ())  # the CPU's own rule: the next test
    assert L.linear_chunk_by(None, w16) == "rows"  # the CPU: not an AUTO_CHUNK_DEVICES device
    monkeypatch.setattr(layout, "AUTO_CHUNK_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(layout, "_auto_fallback_warned", False)
    monkeypatch.setattr(layout, "_free_device_bytes", lambda device: int(need / 0.9) + 1)
    assert L.linear_chunk_by(None, w16) == "rows"
    monkeypatch.setattr(layout, "_free_device_bytes", lambda device: need)
    with pytest.warns(UserWarning, match="chunk_by='vocab'"):
        assert L.linear_chunk_by(None, w16) == "vocab"
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert L.linear_chunk_by(None, w16) == "vocab"
    assert not again  # the warning comes once per process
    assert L.linear_chunk_by("rows", w16) == "rows"  # named: as asked
    assert L.linear_chunk_by(None, weight.requires_grad_(True)) == "rows"  # float32: no separate accumulator
    assert L.linear_chunk_by(None, w16.detach()) == "rows"  # no weight gradient
    # end to end: the auto choice runs the slabs' path (3-row chunks of N = 5: logits and dX; then 3-column slabs
    # of V = 9: logits and dW)
    mode = _MatmulCounter()
    with mode:
        rk.linear_cross_entropy(hidden.to(torch.bfloat16).requires_grad_(True), w16, targets, chunk_size=3,
                                backend=BACKENDS[0]).backward()
    assert mode.matmuls == 2 * 2 + 2 * 3


def test_chunk_by_auto_takes_the_slabs_on_the_cpu_for_a_16_bit_head_that_trains(monkeypatch):
    """On SLABS_FIRST_DEVICES (the CPU) the losses' "auto" takes the slabs whenever the row chunks would hold a float32
    weight-gradient accumulator (measured faster and leaner there, linear_losses_cpu_bf16.md), with no warning; a
    float32 head (its gradient is its own accumulator), a frozen head and a named choice keep the rows."""
    monkeypatch.delenv("RLHF_KERNELS_LINEAR_CHUNK_BY", raising=False)
    hidden, weight, targets, _ = _inputs((5,), 4, 9, torch.float32)
    w16 = weight.to(torch.bfloat16).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert L.linear_chunk_by(None, w16) == "vocab"
    assert L.linear_chunk_by(None, weight.requires_grad_(True)) == "rows"
    assert L.linear_chunk_by(None, w16.detach()) == "rows" and L.linear_chunk_by("rows", w16) == "rows"
    mode = _MatmulCounter()  # end to end: 3-row chunks of N = 5 (logits, dX), then 3-column slabs of V = 9 (logits, dW)
    with mode:
        rk.linear_cross_entropy(hidden.to(torch.bfloat16).requires_grad_(True), w16, targets, chunk_size=3,
                                backend=BACKENDS[0]).backward()
    assert mode.matmuls == 2 * 2 + 2 * 3


def test_slab_columns():
    cpu = torch.device("cpu")
    assert L.slab_columns(100, 50, torch.float32, cpu, 7) == 7  # given
    assert L.slab_columns(100, 5, torch.float32, cpu, 7) == 5  # at most V
    cols = L.slab_columns(8192, 128256, torch.bfloat16, cpu, 0)
    assert cols == 2048 and cols * 8192 * 2 <= 32 * 2**20  # the slab of logits within 32 MiB
    assert L.slab_columns(8192, 128256, torch.bfloat16, cpu, 0, buffers=2) == 1024  # logits and dlogits
    assert L.slab_columns(10, 30, torch.float32, cpu, 0) == 30  # small: one slab


@pytest.mark.skipif(not (triton_importable() and (torch.cuda.is_available() or triton_interpreting())),
                    reason="needs triton (GPU, or TRITON_INTERPRET=1 on the CPU)")
def test_vocab_slabs_triton_backend_small():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, bias = _inputs((2, 5), 12, 37, torch.float32, ignore=(3,))
    per_token = _ppo_inputs(hidden, weight, targets, bias, 0.8)
    hidden, weight, targets, bias, *per_token = (t.to(device) for t in (hidden, weight, targets, bias, *per_token))
    fast, materialised = _loss_fns("ppo:seq-mean-token-mean", targets, per_token, 0.8)
    leaves = (hidden, weight, bias)
    _, got = _value_and_grads(
        lambda h, w, b: fast(h, w, b, chunk_size=16, chunk_by="vocab", backend="triton", grad_in_forward=True),
        leaves, 1.0)  # fmt: skip
    _, expected = _value_and_grads(materialised, [t.double() for t in leaves], 1.0)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.double().cpu(), e.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not (triton_importable() and (torch.cuda.is_available() or triton_interpreting())),
                    reason="needs triton (GPU, or TRITON_INTERPRET=1 on the CPU)")
def test_linear_logprobs_vocab_slabs_triton_backend_small():
    """``linear_logprobs(chunk_by="vocab")`` on the Triton kernels: log-prob, entropy and all three gradients."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, bias = (t.to(device) for t in _inputs((2, 5), 12, 37, torch.float32, ignore=(3,)))
    g = torch.Generator().manual_seed(4)
    g_logp, g_ent = (torch.randn(2, 5, generator=g, dtype=torch.float64).to(device) for _ in range(2))

    def run(fn, leaves):
        leaves = [t.detach().requires_grad_(True) for t in leaves]
        lp, ent = fn(*leaves)
        grads = torch.autograd.grad((lp.double() * g_logp + ent.double() * g_ent).sum(), leaves)
        return (lp, ent) + grads

    got = run(lambda h, w, b: rk.linear_logprobs(h, w, targets, b, return_entropy=True, chunk_size=16,
                                                  chunk_by="vocab", backend="triton"), (hidden, weight, bias))
    expected = run(lambda h, w, b: R.linear_logprobs(h, w, targets, b, return_entropy=True),
                   [t.double() for t in (hidden, weight, bias)])
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.double().cpu(), e.cpu(), rtol=1e-4, atol=1e-5)
