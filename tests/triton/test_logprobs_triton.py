"""Triton logprobs (+ entropy): forward/backward vs the float64 oracle, odd shapes, extremes, ops."""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference
from rlhf_kernels.ops import logprobs as lp_ops
from triton_testutils import DEVICE, DTYPES, assert_rule, make_logits, make_targets, poisoned_outputs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _oracle(x, y, temperature, g_logp, g_ent, *, op_torch=False):
    """(logp, entropy, dlogits) from the reference on ``x`` as given (float64 for the oracle).

    ``op_torch`` uses the op's ``torch`` backend (closed-form backward), whose
    gradient stays finite on ``-inf`` logits where the reference's autograd gives NaN.
    """
    x = x.detach().clone().requires_grad_()
    if op_torch:
        logp, ent = rk.logprobs(x, y, temperature=temperature, return_entropy=True, backend="torch")
    else:
        logp, ent = reference.logprobs(x, y, temperature=temperature, return_entropy=True)
    (logp.double() * g_logp.double() + ent.double() * g_ent.double()).sum().backward()
    return logp.detach(), ent.detach(), x.grad


def _check(x, y, *, temperature=1.0, seed=0, op_torch=False, check_grad=True):
    dtype = x.dtype
    g = torch.Generator().manual_seed(seed + 7)
    g_logp = torch.randn(y.shape, generator=g).to(x.device)
    g_ent = torch.randn(y.shape, generator=g).to(x.device)
    xt = x.detach().clone().requires_grad_()
    with poisoned_outputs():
        logp, ent = rk.logprobs(xt, y, temperature=temperature, return_entropy=True, backend="triton")
        if check_grad:
            (logp * g_logp + ent * g_ent).sum().backward()
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    lp64, ent64, grad64 = _oracle(x.double(), y, temperature, g_logp, g_ent, op_torch=op_torch)
    lpl, entl, gradl = _oracle(x, y, temperature, g_logp, g_ent, op_torch=op_torch)
    assert_rule("logp", logp, lpl, lp64, dtype)
    assert_rule("entropy", ent, entl, ent64, dtype)
    if check_grad:
        assert xt.grad.dtype == dtype and xt.grad.shape == x.shape
        assert_rule("dlogits", xt.grad, gradl, grad64, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (1, 3, 7), (2, 5, 300), (3, 65), (130,)], ids=lambda s: "x".join(map(str, s))
)
def test_matches_reference(shape, dtype):
    x = make_logits(shape, dtype, seed=len(shape) * 100 + shape[-1])
    y = make_targets(shape[:-1], shape[-1], seed=shape[-1])
    _check(x, y, temperature=0.7 if shape[-1] % 2 else 1.0, seed=shape[-1])


def test_strided_rows_need_no_copy():
    full = make_logits((2, 6, 77), torch.float32, seed=1)
    x = full[:, :-1]
    assert not x.is_contiguous()
    rows = lp_ops.as_rows(x)
    assert rows.data_ptr() == full.data_ptr()
    y = make_targets((2, 5), 77, seed=1)
    _check(x, y, seed=1)
    # a transposed-leading layout (rows strided in both levels)
    xt = make_logits((5, 3, 40), torch.bfloat16, seed=2).transpose(0, 1)
    _check(xt, make_targets((3, 5), 40, seed=2), seed=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(dtype):
    V = 150
    big = 1e4 if dtype != torch.float16 else 6e4
    x = make_logits((4, V), torch.float32, seed=3, scale=big).clamp(-6e4, 6e4)
    x[1] = 2.5  # all-equal row
    x[2, ::3] = float("-inf")  # masked vocabulary
    x[3, :] = float("-inf")
    x[3, 5] = 1.0  # one live entry
    x = x.to(dtype)
    y = torch.tensor([3, 7, 2, 5], device=DEVICE)  # y=2 hits a -inf logit in row 2: logp = -inf
    y[2] = 1
    _check(x, y, seed=3, op_torch=True)
    y[2] = 0  # target on a -inf logit
    with poisoned_outputs():
        logp = rk.logprobs(x, y, backend="triton")
    assert logp[2].item() == float("-inf")
    assert torch.isfinite(logp[[0, 1, 3]]).all()


def test_temperature_and_fp16_near_overflow():
    x = (make_logits((3, 90), torch.float32, seed=4, scale=1.0) * 3e4).clamp(-65000, 65000).to(torch.float16)
    _check(x, make_targets((3,), 90, seed=4, ignore_frac=0.0), temperature=0.35, seed=4, op_torch=True)


def test_all_ignored_rows_and_custom_ignore_index():
    x = make_logits((2, 4, 33), torch.float32, seed=5)
    y = torch.full((2, 4), 7, device=DEVICE)
    y[0] = 7
    y[1, 1] = 3
    xt = x.clone().requires_grad_()
    with poisoned_outputs():
        logp, ent = rk.logprobs(xt, y, ignore_index=7, return_entropy=True, backend="triton")
        (logp.sum() + ent.sum()).backward()
    assert (logp[0] == 0).all() and (ent[0] == 0).all()
    assert (xt.grad[0] == 0).all() and (xt.grad[1, [0, 2, 3]] == 0).all()
    assert (xt.grad[1, 1] != 0).any()
    _check(x, y.masked_fill(y == 7, -100), seed=5)


def test_bad_targets(monkeypatch):
    x = make_logits((3, 20), torch.float32, seed=6)
    y = torch.tensor([1, 25, -3], device=DEVICE)
    with pytest.raises(ValueError, match=r"targets\[1\] = 25"):
        rk.logprobs(x, y, backend="triton")
    monkeypatch.setenv("RLHF_KERNELS_VALIDATE", "0")
    xt = x.clone().requires_grad_()
    with poisoned_outputs():
        logp, ent = rk.logprobs(xt, y, return_entropy=True, backend="triton")
        logp.nan_to_num().sum().backward()
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()
    assert torch.isfinite(ent).all() and torch.isfinite(xt.grad).all()


def test_nan_logits_stay_in_their_row():
    x = make_logits((3, 40), torch.float32, seed=8)
    x[1, 17] = float("nan")
    y = make_targets((3,), 40, seed=8, ignore_frac=0.0)
    logp, ent = rk.logprobs(x, y, return_entropy=True, backend="triton")
    assert torch.isnan(logp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(ent[[0, 2]]).all()


def test_int32_targets_and_float64_logits():
    x = make_logits((2, 3, 50), torch.float64, seed=9)
    y = make_targets((2, 3), 50, seed=9).int()
    lp64 = reference.logprobs(x, y.long())
    # forced Triton computes float64 inputs in fp32 and returns float64
    out = rk.logprobs(x, y, backend="triton")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, lp64, rtol=1e-5, atol=1e-5)


def test_opcheck():
    x = make_logits((2, 3, 45), torch.float32, seed=10)
    y = make_targets((2, 3), 45, seed=10)
    torch.library.opcheck(lp_ops.logprobs_fwd, (x.requires_grad_(), y, 0.8, -100, "triton"))
    logp, ent, lse = lp_ops.logprobs_fwd(x.detach(), y, 0.8, -100, "triton")
    g = torch.randn_like(logp)
    torch.library.opcheck(lp_ops.logprobs_bwd, (g, g.flip(0), x.detach(), y, lse, ent, 0.8, -100, "triton"))


def test_torch_compile_fullgraph():
    x = make_logits((2, 4, 70), torch.float32, seed=11)
    y = make_targets((2, 4), 70, seed=11)

    def f(logits, targets):
        logp, ent = rk.logprobs(logits[:, :-1], targets[:, 1:], return_entropy=True, backend="triton")
        return (logp - 0.01 * ent).sum()

    xc = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(xc, y)
    out_c.backward()
    out_e = f(xe, y)
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("table", ["_ROW_FWD_CANDIDATES", "_TWO_ROW_FWD_CANDIDATES"])
def test_row_autotune_candidates_fit_the_row(table):
    """The forward autotuner's candidates and pruning: each tile a whole number of state rows of at least one warp's
    256 lanes (bf16 vectors across the warp), no block wider than the row, none narrower than 512 for long rows,
    and the tiled candidates only from V = 32768 on."""
    import triton

    from rlhf_kernels.triton import _common

    candidates = getattr(_common, table)
    for block, lanes, warps in candidates:
        assert block % lanes == 0 and lanes <= block, (block, lanes)
        assert lanes == block or lanes == 256 * warps, (block, lanes, warps)
    configs = [triton.Config({"BLOCK_V": b, "LANES_V": n}, num_warps=w) for b, n, w in candidates]
    for v in (1, 7, 300, 4097, 32767, 32768, 50257, 151936):
        kept = _common._prune_row_configs(configs, {"V": v})
        assert kept, f"V={v}: no candidate left"
        cap = max(128, _common.next_pow2(v))
        assert all(k.kwargs["BLOCK_V"] <= cap for k in kept)
        assert all(k.kwargs["BLOCK_V"] >= min(cap, 512) for k in kept)
        tiled = [k for k in kept if k.kwargs["LANES_V"] < k.kwargs["BLOCK_V"]]
        assert bool(tiled) == (v >= _common._TILED_MIN_V), f"V={v}: {[(k.kwargs, k.num_warps) for k in tiled]}"


@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "view"])
def test_overwrite_logits_writes_the_gradient_over_them(sliced):
    """The Triton backward writes each block's gradient over the logits block it read (``overwrite_logits=True``):
    bit for bit the gradient of a normal call, in the logits' own storage (the base's for a ``[:, :-1]`` view)."""
    base = make_logits((2, 6, 300), torch.bfloat16, seed=31)
    y = make_targets((2, 5 if sliced else 6), 300, seed=31)
    grads = []
    for overwrite in (False, True):
        x = base.clone().requires_grad_()
        logp, ent = rk.logprobs(x[:, :-1] if sliced else x, y, return_entropy=True, temperature=0.9,
                                backend="triton", overwrite_logits=overwrite)  # fmt: skip
        (logp.sum() - 0.1 * ent.sum()).backward()
        grads.append((x.grad, x.grad.data_ptr() == x.data_ptr(), x.detach()))
    (g0, shared0, _), (g1, shared1, x1) = grads
    assert torch.equal(g0, g1) and not shared0 and shared1 and torch.equal(x1, g1)
