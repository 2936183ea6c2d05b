"""The CUDA row sweeps without a GPU: row_stats.cuh / kl_stats.cuh / row_grad.cuh emulated on the CPU.

``row_stats_emulation.cpp`` compiles the very templates the logprobs, PPO and KL kernels
call as host C++ and replays each kernel's thread decomposition: every thread's sweep (its
strided body vectors, the partial head / tail vectors, the unrolled groups), the block
reduction tree, the PPO cluster's per-CTA slices and rank-order merge, the values the
kernels write, the logprobs backward's column splits, and the fused PPO kernel's second
sweep (from its shared-memory copy of the row or from the logits). These tests hold that against the float64 oracle
(``rlhf_kernels.reference``) under DESIGN.md §5's accuracy rule: random rows, V from 1 to
50257, rows starting at every 16-byte misalignment, bf16 / fp16 / fp32, temperature,
extreme and -inf logits, NaN, ignored and out-of-range targets, and the KL's exact zero.

Not covered here: the GPU's approximate ex2 and the memory system (``pytest -m gpu``,
``test_cuda_gpu.py``, runs the kernels themselves).
"""

from __future__ import annotations

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference
from tests.aggregate_cases import aggregate_case, aggregate_oracle, with_masked_non_finite
from tests.tolerance import assert_matches_oracle

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.version_independent]

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES = tuple(DTYPE_CODE)
VEC = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}  # elements per 16-byte vector
IGNORE = -100


def _rows(x: torch.Tensor) -> tuple[int, int]:
    assert x.dim() == 2 and x.stride(1) == 1
    return x.shape[0], x.stride(0)


def emulate_logprobs(lib, x, y, *, temperature=1.0, threads=128, cluster=1):
    rows, stride = _rows(x)
    out = [torch.full((rows,), float("nan")) for _ in range(3)]  # poisoned: every row must be written
    rc = lib.rk_emulate_logprobs(DTYPE_CODE[x.dtype], x.data_ptr(), y.contiguous().data_ptr(), rows, stride,
                                 x.shape[1], 1.0 / temperature, IGNORE, threads, cluster,
                                 *(o.data_ptr() for o in out))
    assert rc == 0, "the sweep visited a vector of its slice other than exactly once, or cached wrong values"
    return out  # logp, entropy, lse


def emulate_kl(lib, x, r, *, temperature=1.0, threads=128):
    rows, stride = _rows(x)
    _, ref_stride = _rows(r)
    out = [torch.full((rows,), float("nan")) for _ in range(3)]
    rc = lib.rk_emulate_kl(DTYPE_CODE[x.dtype], x.data_ptr(), r.data_ptr(), rows, stride, ref_stride, x.shape[1],
                           1.0 / temperature, threads, *(o.data_ptr() for o in out))
    assert rc == 0
    return out  # kl, lse_z, lse_r


def at_offset(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x's values in a view whose rows start ``offset`` elements into a wider buffer (another alignment)."""
    buf = torch.zeros(x.shape[0], x.shape[1] + offset + 3, dtype=x.dtype)
    buf[:, offset : offset + x.shape[1]] = x
    return buf[:, offset : offset + x.shape[1]]


def random_logits(rows, V, dtype, *, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, V, generator=g) * scale).to(dtype)


def random_targets(rows, V, *, seed, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, V, (rows,), generator=g)
    y[torch.rand(rows, generator=g) < ignore_frac] = IGNORE
    return y


def check_logprobs(lib, x, y, *, temperature=1.0, threads=128, cluster=1):
    logp, ent, lse = emulate_logprobs(lib, x, y, temperature=temperature, threads=threads, cluster=cluster)
    lp64, ent64 = reference.logprobs(x.double(), y, temperature=temperature, return_entropy=True)
    lpl, entl = reference.logprobs(x, y, temperature=temperature, return_entropy=True)
    lse64 = torch.logsumexp(x.double() / temperature, dim=-1)
    lsel = torch.logsumexp(x.float() / temperature, dim=-1)
    assert_matches_oracle(logp, lpl, lp64, x.dtype, "logp")
    assert_matches_oracle(ent, entl, ent64, x.dtype, "entropy")
    assert_matches_oracle(lse, lsel, lse64, x.dtype, "lse")
    assert not (logp > 0).any(), "a log-probability above 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", (1, 7, 8, 9, 33, 4097, 50257))
def test_logprobs_sweep_every_alignment(emu, V, dtype):
    x = random_logits(3, V, dtype, seed=V)
    y = random_targets(3, V, seed=V)
    for offset in range(VEC[dtype]):
        check_logprobs(emu, at_offset(x, offset), y, threads=32 if V < 100 else 128)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cluster,in_smem", ((1, False), (4, True)), ids=("global", "cluster4"))
def test_fused_ppo_gradient_without_entropy_is_the_full_formulas(emu, cluster, in_smem, dtype):
    # ppo.cu's kNoEntropy launches (entropy_coef = 0, so G_H = 0 in every row): LogprobGradNoEntropy drops the
    # entropy term's select and fma and must give what LogprobGrad gives there, bit for bit, -inf and NaN logits too
    for V, offset in ((50257, 3), (4097, 1), (9, 5)):
        x = at_offset(random_logits(4, V, dtype, seed=V + 11), offset)
        x[1, ::7] = float("-inf")  # p = 0 exactly: the full formula's select guards 0·(-inf) there
        x[2, 3] = float("nan")
        y = random_targets(4, V, seed=V + 11)
        g_logp = upstream(4, seed=V + 5)[0]
        g_logp[3] = 0.0  # a token whose upstream gradient is zero: dz = p·0
        g_ent = torch.zeros(4)
        kw = dict(temperature=0.9, threads=64, cluster=cluster, in_smem=in_smem)
        lean, outs = emulate_fused(emu, x, y, g_logp, g_ent, no_entropy=True, **kw)
        full, outs_full = emulate_fused(emu, x, y, g_logp, g_ent, **kw)
        assert torch.equal(lean.nan_to_num(nan=7.0), full.nan_to_num(nan=7.0))
        assert torch.equal(lean.isnan(), full.isnan()) and not lean[[0, 1, 3]].isnan().any()
        assert lean[2].isnan().all() or y[2] == IGNORE  # the NaN logit's row: NaN, unless its token is ignored
        for a, b in zip(outs, outs_full):
            assert torch.equal(a.nan_to_num(nan=7.0), b.nan_to_num(nan=7.0))
        ok = torch.tensor([0, 1, 3])
        g64, gl = _grad_oracle(x[ok], y[ok], 0.9, g_logp[ok], g_ent[ok], op_torch=True)
        assert_matches_oracle(lean[ok], gl, g64, dtype, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threads", (32, 64, 512))
def test_logprobs_sweep_thread_counts_and_temperature(emu, threads, dtype):
    V = 50257
    x = at_offset(random_logits(4, V, dtype, seed=threads, scale=6.0), 3)
    check_logprobs(emu, x, random_targets(4, V, seed=threads), temperature=0.7, threads=threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cluster", (2, 3, 8))
def test_ppo_cluster_slices_merge_to_the_row(emu, cluster, dtype):
    # the PPO kernel's kCluster path: CTA `rank` sweeps its slice of the row's vectors, the
    # slices' statistics are merged in rank order; also checks the shared-memory cache contents
    for V, offset in ((4097, 1), (50257, 5), (9, 3)):
        x = at_offset(random_logits(2, V, dtype, seed=V + cluster), offset)
        check_logprobs(emu, x, random_targets(2, V, seed=V, ignore_frac=0.0), cluster=cluster, threads=64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", (4097, 50257))
def test_logprobs_sweep_extreme_logits(emu, V, dtype):
    big = 6e4 if dtype == torch.float16 else 1e4
    x = (random_logits(6, V, torch.float32, seed=V + 1) * big).clamp(-6e4, 6e4)
    x[1] = 1.5  # all-equal row
    x[2, ::7] = float("-inf")
    x[3, : V - 3] = float("-inf")  # live entries only in the ragged tail
    x[4, V // 2] = x[4].max() + 50  # one dominant logit
    x[5, 1:] = float("-inf")  # one live entry, at column 0
    x = at_offset(x.to(dtype), 1)
    y = torch.tensor([0, V - 1, 1, V - 2, V // 2, 0])
    check_logprobs(emu, x, y)
    check_logprobs(emu, x, y, temperature=0.7)
    y[2] = 0  # a target on a -inf logit
    logp, ent, _ = emulate_logprobs(emu, x, y)
    assert logp[2].item() == float("-inf") and torch.isfinite(logp[[0, 1, 3, 4, 5]]).all()
    assert torch.isfinite(ent).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprobs_of_a_near_one_hot_top_token_stay_at_most_zero(emu, dtype):
    # max/T and the target's x/T must round alike: with a fused x·(1/T) - max the top token's
    # log-prob keeps the product's residue and can come out above 0 (T != 1)
    V = 4097
    top = torch.linspace(20.0, 60.0, 64)
    x = torch.full((64, V), -60.0)
    x[:, 7] = top
    x = x.to(dtype)
    y = torch.full((64,), 7)
    for temperature in (0.7, 0.3, 1.3):
        logp, _, _ = emulate_logprobs(emu, x, y, temperature=temperature)
        assert (logp <= 0).all(), f"T={temperature}: max logp {logp.max().item():.3e}"
        check_logprobs(emu, x, y, temperature=temperature)


def test_logprobs_sweep_nan_stays_in_its_row_and_targets(emu):
    V = 4097
    x = random_logits(4, V, torch.bfloat16, seed=11)
    x[1, 100] = float("nan")
    y = torch.tensor([5, 6, IGNORE, V])  # an ignored row, an out-of-range target
    logp, ent, lse = emulate_logprobs(emu, x, y)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1]) and torch.isnan(lse[1])
    assert torch.isfinite(logp[0]) and torch.isfinite(ent[0])
    assert logp[2].item() == 0.0 and ent[2].item() == 0.0 and torch.isfinite(lse[2])  # ignored: 0, lse still written
    assert torch.isnan(logp[3]) and torch.isfinite(ent[3])  # out of range: NaN, never read


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cluster", (1, 4))
def test_an_infinite_logit_makes_its_row_nan_as_the_oracle(emu, cluster, dtype):
    """+inf in a row: lse = inf, so the log-prob is -inf or inf - inf and the entropy inf - inf: the oracle's NaN
    (tests/ops/test_nonfinite_logits.py holds every CPU backend to it, and the GPU kernels under -m gpu). Every other
    row is the oracle's; a KL row with +inf in either row is NaN too."""
    V = 4097
    x = random_logits(6, V, dtype, seed=12)
    x[0, 5] = float("inf")  # away from the target
    x[1, 7] = float("inf")  # at the target
    x[2, [5, V - 1]] = float("inf")  # two, one in the ragged tail
    x[3, V - 1] = float("inf")  # the last column alone
    y = torch.tensor([3, 7, 3, 3, 3, IGNORE])
    x[5, 9] = float("inf")  # an ignored token: 0 and 0, as the oracle's
    lp64, ent64 = reference.logprobs(x.double(), y, return_entropy=True)
    assert torch.isnan(lp64[:4]).all() and torch.isnan(ent64[:4]).all() and lp64[5] == 0
    lp_in_dtype, ent_in_dtype = reference.logprobs(x, y, return_entropy=True)
    for offset in (0, 1):
        logp, ent, _ = emulate_logprobs(emu, at_offset(x, offset), y, cluster=cluster, threads=64)
        assert_matches_oracle(logp, lp_in_dtype, lp64, dtype, "logp")
        assert_matches_oracle(ent, ent_in_dtype, ent64, dtype, "entropy")
    r = random_logits(6, V, dtype, seed=13)
    r[4, 11] = float("inf")
    kl, _, _ = emulate_kl(emu, x, r)
    kl64 = reference.kl_divergence(x.double(), r.double())
    assert torch.isnan(kl64[[0, 1, 2, 3, 4, 5]]).all()
    assert torch.equal(torch.isnan(kl), torch.isnan(kl64))


def test_bad_launch_arguments_are_refused(emu):
    x = random_logits(1, 8, torch.float32, seed=0)
    y = torch.zeros(1, dtype=torch.int64)
    out = [torch.empty(1) for _ in range(3)]
    for threads, cluster in ((31, 1), (2048, 1), (32, 0)):
        rc = emu.rk_emulate_logprobs(0, x.data_ptr(), y.data_ptr(), 1, 8, 8, 1.0, IGNORE, threads, cluster,
                                     *(o.data_ptr() for o in out))
        assert rc == 2


# ------------------------------------------------------------------ KL


def random_kl_pair(V, dtype, *, seed, scale):
    """Logits and a reference row near them (their difference ~ ``scale``), both of ``dtype``."""
    x = random_logits(3, V, dtype, seed=seed)
    return x, (x.float() + random_logits(3, V, torch.float32, seed=seed + 1, scale=scale)).to(dtype)


def check_kl(lib, x, r, *, temperature=1.0, threads=128):
    kl, lse_z, lse_r = emulate_kl(lib, x, r, temperature=temperature, threads=threads)
    kl64 = reference.kl_divergence(x.double(), r.double(), temperature=temperature)
    kll = reference.kl_divergence(x, r, temperature=temperature)
    assert_matches_oracle(kl, kll, kl64, x.dtype, "kl")
    for got, logits in ((lse_z, x), (lse_r, r)):
        lse64 = torch.logsumexp(logits.double() / temperature, dim=-1)
        assert_matches_oracle(got, torch.logsumexp(logits.float() / temperature, dim=-1), lse64, x.dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", (1, 7, 9, 4097, 50257))
def test_kl_sweep_alignments_and_non_co_aligned_reference(emu, V, dtype):
    x, r = random_kl_pair(V, dtype, seed=V + 2, scale=0.5)
    for offset in range(0, VEC[dtype], 3):
        check_kl(emu, at_offset(x, offset), at_offset(r, offset), temperature=0.9, threads=32 if V < 100 else 128)
        # the reference row at another alignment: its body is read element by element
        check_kl(emu, at_offset(x, offset), at_offset(r, offset + 1), threads=64)


@pytest.mark.parametrize("V", (7, 50257))
def test_kl_sweep_extremes_and_exact_zero(emu, V):
    x = random_logits(4, V, torch.float32, seed=V + 4)
    x[0] *= 3000.0  # logits of size 1e4: almost every p underflows
    x[1] = 2.0  # all-equal row
    x[2, ::5] = float("-inf")  # a masked vocabulary, shared by both rows
    r = x + random_logits(4, V, torch.float32, seed=V + 5, scale=0.3)
    r[1] = -1.0
    r[2, ::5] = float("-inf")
    r[3, 1::5] = float("-inf")  # q = 0 where p > 0: KL = +inf
    check_kl(emu, x[:3], r[:3])
    kl, _, _ = emulate_kl(emu, x, r)
    assert kl[3].item() == float("inf") and torch.isfinite(kl[:3]).all()
    # equal rows and rows shifted by a constant: exactly 0 / tiny (no lse cancellation)
    z = random_logits(3, V, torch.bfloat16, seed=V + 5)
    assert torch.equal(emulate_kl(emu, z, z)[0], torch.zeros(3))
    assert torch.equal(emulate_kl(emu, z.float(), z.float(), temperature=0.7)[0], torch.zeros(3))
    shifted = emulate_kl(emu, z.float(), z.float() + 7.0)[0]
    assert shifted.abs().max().item() < 1e-5


@pytest.mark.parametrize("V", (300, 50257))
@pytest.mark.parametrize("threads", (32, 128))
def test_kl_sweep_one_live_column_in_each_row_is_an_infinite_kl(emu, V, threads):
    """p one-hot at column 7, q one-hot at column 8: KL = +inf. Most threads see no live column in either row, so
    the merge folds states whose reference maxima are both -inf (H200 run 7: the CUDA forward gave NaN for this
    row of test_nonfinite_logits, from (-inf) - (-inf) in kl_fold's shift of the reference maximum)."""
    x = torch.full((3, V), float("-inf"))
    r = torch.full((3, V), float("-inf"))
    x[0, 7], r[0, 8] = 1.5, -0.5  # different live columns: +inf
    x[1, 7], r[1, 7] = 1.5, -0.5  # the same live column: KL 0
    x[2, 7], r[2, V - 1] = 1.5, 2.0  # the reference's live column at the row's far end: +inf
    for temperature in (1.0, 0.9):
        kl, lse_z, lse_r = emulate_kl(emu, x, r, temperature=temperature, threads=threads)
        assert kl.tolist() == [float("inf"), 0.0, float("inf")], kl
        torch.testing.assert_close(lse_z, torch.full((3,), 1.5 / temperature))  # one live column: its z
        torch.testing.assert_close(lse_r, r.max(-1).values / temperature)
    expected = reference.kl_divergence(x.double(), r.double())
    assert expected.tolist() == [float("inf"), 0.0, float("inf")]


def test_kl_sweep_underflowed_p_against_zero_q(emu):
    # where p underflows to 0 even in float64 and q = 0, the term is 0 (the reference's 0·x = 0)
    V = 4097
    row = torch.full((1, V), -1e4)
    row[0, 0], row[0, 2] = 0.0, -5.0
    ref_row = row.clone()
    ref_row[0, 1::5] = float("-inf")
    ref_row[0, 0] = 0.5
    got = emulate_kl(emu, row, ref_row)[0]
    expected = reference.kl_divergence(row.double(), ref_row.double())
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ gradients (logprobs backward, fused PPO sweep 2)


def _grad_oracle(x, y, temperature, g_logp, g_ent, *, op_torch):
    def run(inp):
        inp = inp.detach().clone().requires_grad_()
        if op_torch:  # closed form: finite on -inf logits, where autograd of the reference gives NaN
            lp, ent = rk.logprobs(inp, y, temperature=temperature, return_entropy=True, backend="torch")
        else:
            lp, ent = reference.logprobs(inp, y, temperature=temperature, return_entropy=True)
        (lp.double() * g_logp.double() + ent.double() * g_ent.double()).sum().backward()
        return inp.grad

    return run(x.double()), run(x)


def grad_buffer_like(x, offset):
    """A NaN-poisoned gradient with x's shape whose rows start ``offset`` elements into a wider buffer."""
    buf = torch.full((x.shape[0], x.shape[1] + offset + 5), float("nan"), dtype=x.dtype)
    return buf[:, offset : offset + x.shape[1]]


def assert_only_rows_written(grad):
    """The poison around each row of ``grad`` (see grad_buffer_like) is intact: nothing was written out of range."""
    buf = torch.as_strided(grad, (grad.shape[0], grad.stride(0)), (grad.stride(0), 1),
                           grad.storage_offset() - (grad.stride(0) - grad.shape[1] - 5))
    offset = grad.stride(0) - grad.shape[1] - 5
    outside = torch.cat([buf[:, :offset], buf[:, offset + grad.shape[1] :]], dim=1)
    assert torch.isnan(outside.float()).all(), "a kernel wrote outside the row's columns"


def upstream(rows, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, generator=g), torch.randn(rows, generator=g)


def check_logprobs_backward(lib, x, y, *, temperature=1.0, threads=256, cols_per_cta=None, grad_offset=0,
                            op_torch=False):
    rows, stride = _rows(x)
    V = x.shape[1]
    _, ent, lse = emulate_logprobs(lib, x, y, temperature=temperature)
    g_logp, g_ent = upstream(rows, seed=V + grad_offset)
    grad = grad_buffer_like(x, grad_offset)
    cols = cols_per_cta or 256 * 8 * VEC[x.dtype]  # the kernel's split (row_common.cuh: split_grid)
    rc = lib.rk_emulate_logprobs_bwd(DTYPE_CODE[x.dtype], grad.data_ptr(), x.data_ptr(), y.data_ptr(),
                                     g_logp.data_ptr(), g_ent.data_ptr(), lse.data_ptr(), ent.data_ptr(), rows, stride,
                                     grad.stride(0), V, 1.0 / temperature, IGNORE, cols, threads)
    assert rc == 0
    assert_only_rows_written(grad)
    g64, gl = _grad_oracle(x, y, temperature, g_logp, g_ent, op_torch=op_torch)
    assert_matches_oracle(grad, gl, g64, x.dtype, "dlogits")


def check_kl_backward(lib, x, r, *, temperature=1.0, threads=256, cols_per_cta=None, grad_offset=0,
                      ref_grad=False):
    """kl.cu's backward (write_kl_grad_range) against the float64 oracle's gradients of Σ g·KL."""
    rows, stride = _rows(x)
    _, ref_stride = _rows(r)
    V = x.shape[1]
    kl, lse_z, lse_r = emulate_kl(lib, x, r, temperature=temperature)
    g = upstream(rows, seed=V + 17)[0]
    gz = grad_buffer_like(x, grad_offset)
    gr = grad_buffer_like(x, grad_offset) if ref_grad else None
    cols = cols_per_cta or 256 * 8 * VEC[x.dtype]  # the kernel's split (row_common.cuh: split_grid)
    rc = lib.rk_emulate_kl_bwd(DTYPE_CODE[x.dtype], gz.data_ptr(), gr.data_ptr() if ref_grad else None, x.data_ptr(),
                               r.data_ptr(), g.data_ptr(), kl.data_ptr(), lse_z.data_ptr(), lse_r.data_ptr(), rows,
                               stride, ref_stride, gz.stride(0), V, 1.0 / temperature, cols, threads)
    assert rc == 0
    assert_only_rows_written(gz)

    def oracle(a, b):
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        (reference.kl_divergence(a, b, temperature=temperature).double() * g.double()).sum().backward()
        return a.grad, b.grad

    (gz64, gr64), (gzl, grl) = oracle(x.double(), r.double()), oracle(x, r)
    assert_matches_oracle(gz, gzl, gz64, x.dtype, "dlogits")
    if ref_grad:
        assert_only_rows_written(gr)
        assert_matches_oracle(gr, grl, gr64, x.dtype, "dref")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", (1, 7, 9, 4097, 50257))
def test_kl_backward_alignments_splits_and_reference_gradient(emu, V, dtype):
    # the frozen reference's loop (head / tail partial vectors, then whole ones compiled for co-aligned inputs) and
    # the reference-gradient one, at every row alignment, a reference row at another alignment, several CTA splits
    x, r = random_kl_pair(V, dtype, seed=V + 40, scale=0.7)
    for offset in range(0, VEC[dtype], 3):
        xo = at_offset(x, offset)
        check_kl_backward(emu, xo, at_offset(r, offset), temperature=0.9, threads=64, grad_offset=offset)
        check_kl_backward(emu, xo, at_offset(r, offset + 1), cols_per_cta=3 * VEC[dtype] + 1, threads=32)
        check_kl_backward(emu, xo, at_offset(r, offset), ref_grad=True, threads=32, grad_offset=offset + 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_backward_row_of_zero_upstream_gradient_is_zero_even_with_an_infinite_kl(emu, dtype):
    """A masked row (upstream gradient 0) whose KL is infinite (p > 0 where the reference's q = 0) gets a zero
    gradient, as the oracle's (reference.kl_divergence with a mask), not 0·inf = NaN; with a gradient the same
    row stays non-finite, as the oracle's."""
    V = 37
    x = random_logits(4, V, dtype, seed=61, scale=1.0)
    r = random_logits(4, V, dtype, seed=62, scale=1.0)
    r[:, 5] = float("-inf")  # q = 0 where p > 0: KL = inf in every row
    kl, lse_z, lse_r = emulate_kl(emu, x, r)
    assert torch.isinf(kl).all()
    g = torch.tensor([0.0, 0.7, 0.0, -1.2])
    gz = grad_buffer_like(x, 0)
    rc = emu.rk_emulate_kl_bwd(DTYPE_CODE[dtype], gz.data_ptr(), None, x.data_ptr(), r.data_ptr(), g.data_ptr(),
                               kl.data_ptr(), lse_z.data_ptr(), lse_r.data_ptr(), 4, x.stride(0), r.stride(0),
                               gz.stride(0), V, 1.0, V, 32)
    assert rc == 0
    assert_only_rows_written(gz)
    assert torch.equal(gz[0::2].float(), torch.zeros(2, V)) and not torch.isfinite(gz[1::2].float()).all()
    x64 = x.double().requires_grad_()
    kl64 = reference.kl_divergence(x64, r.double(), mask=g != 0)
    (kl64 * g.double()).sum().backward()
    assert torch.equal(x64.grad[0::2], torch.zeros(2, V, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", (1, 7, 9, 4097, 50257))
def test_logprobs_backward_alignments_and_splits(emu, V, dtype):
    x = random_logits(3, V, dtype, seed=V + 30)
    y = random_targets(3, V, seed=V + 30)
    y[0] = V - 1  # a target in the last (often partial) vector
    for offset in range(0, VEC[dtype], 3):
        xs = at_offset(x, offset)
        check_logprobs_backward(emu, xs, y, temperature=0.8, threads=32 if V < 100 else 256)
        # the gradient at another alignment than the logits (element loads), column splits that cut vectors
        check_logprobs_backward(emu, xs, y, grad_offset=offset + 1, cols_per_cta=37 if V < 100 else 1000, threads=64)


def emulate_logprobs_backward(lib, x, y, g_logp, g_ent, *, grad_offset, threads):
    """logprobs_bwd_rows' gradient of x (one CTA per row) into a gradient buffer at ``grad_offset``."""
    rows, stride = _rows(x)
    _, ent, lse = emulate_logprobs(lib, x, y)
    grad = grad_buffer_like(x, grad_offset)
    rc = lib.rk_emulate_logprobs_bwd(DTYPE_CODE[x.dtype], grad.data_ptr(), x.data_ptr(), y.data_ptr(),
                                     g_logp.data_ptr(), g_ent.data_ptr(), lse.data_ptr(), ent.data_ptr(), rows, stride,
                                     grad.stride(0), x.shape[1], 1.0, IGNORE, x.shape[1], threads)
    assert rc == 0
    return grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", (7, 9, 13, 4097))
def test_gradient_bits_do_not_depend_on_the_gradient_rows_alignment(emu, V, dtype):
    """The same logits and statistics give the same gradient bits wherever the gradient's rows start: a target
    column lands in a partial vector at one alignment and in a whole one (rewritten after the loop) at another, and
    both must round alike. In the contracted build (FMA wherever the compiler likes, as nvcc) the sum at the target
    had been fused at one and rounded twice at the other: run 6 on the H200 saw fp32 V = 7 gradients written into
    the logits' base differ in the last bit from those written into a fresh buffer."""
    rows = 16
    x = at_offset(random_logits(rows, V, dtype, seed=V + 50), 1)
    y = torch.arange(rows) * 5 % V  # targets in every position of a vector
    g_logp, g_ent = upstream(rows, seed=V + 51)
    for no_entropy in (False, True):
        g_e = torch.zeros_like(g_ent) if no_entropy else g_ent
        first = None
        for grad_offset in range(VEC[dtype]):
            bwd = emulate_logprobs_backward(emu, x, y, g_logp, g_e, grad_offset=grad_offset, threads=32)
            fused, _ = emulate_fused(emu, x, y, g_logp, g_e, threads=32, in_smem=False, grad_offset=grad_offset,
                                     no_entropy=no_entropy)
            first = (bwd, fused) if first is None else first
            assert torch.equal(bwd, first[0]), f"logprobs backward, gradient rows at +{grad_offset}"
            assert torch.equal(fused, first[1]), f"fused PPO gradient, gradient rows at +{grad_offset}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprobs_backward_extreme_logits(emu, dtype):
    V = 4097
    big = 6e4 if dtype == torch.float16 else 1e4
    x = (random_logits(5, V, torch.float32, seed=40) * big).clamp(-6e4, 6e4)
    x[1] = 1.5
    x[2, ::7] = float("-inf")
    x[3, : V - 3] = float("-inf")
    x[4, V // 2] = x[4].max() + 50
    x = at_offset(x.to(dtype), 1)
    check_logprobs_backward(emu, x, torch.tensor([0, V - 1, 1, V - 2, V // 2]), op_torch=True)


# rk_emulate_fused_grad's cache_mode flag for the slice copied by row_bulk.cuh (RLHF_KERNELS_CUDA_PREFETCH=bulk)
BULK = 8


def emulate_fused(lib, x, y, g_logp, g_ent, *, temperature=1.0, threads=128, cluster=1, in_smem=True, grad_offset=0,
                  prefetch=False, reverse=False, no_entropy=False, bulk=False):
    rows, stride = _rows(x)
    grad = grad_buffer_like(x, grad_offset)
    out = [torch.full((rows,), float("nan")) for _ in range(3)]
    mode = (3 if reverse else 2 if prefetch else int(in_smem or bulk)) | (4 if no_entropy else 0) | (BULK if bulk else 0)
    rc = lib.rk_emulate_fused_grad(DTYPE_CODE[x.dtype], grad.data_ptr(), x.data_ptr(), y.data_ptr(), g_logp.data_ptr(),
                                   g_ent.data_ptr(), rows, stride, grad.stride(0), x.shape[1], 1.0 / temperature,
                                   IGNORE, threads, cluster, mode, *(o.data_ptr() for o in out))
    assert rc == 0
    assert_only_rows_written(grad)
    return grad, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cluster,in_smem,prefetch",
                         ((1, True, False), (1, False, False), (2, True, False), (3, True, False), (8, True, False),
                          (1, True, True), (4, True, True), (1, True, "bulk"), (4, True, "bulk")),
                         ids=("shared", "global", "cluster2", "cluster3", "cluster8", "shared-prefetch",
                              "cluster4-prefetch", "shared-bulk", "cluster4-bulk"))
def test_fused_ppo_gradient_paths(emu, cluster, in_smem, prefetch, dtype):
    # ppo.cu's kShared / kGlobal / kCluster paths: the gradient of G_logp·logp + G_H·H written in
    # the forward, per CTA slice, from the cached row or the logits
    for V, offset, grad_offset in ((50257, 3, 3), (4097, 1, 2), (9, 5, 5)):
        x = at_offset(random_logits(3, V, dtype, seed=V + cluster), offset)
        y = random_targets(3, V, seed=V + cluster)
        g_logp, g_ent = upstream(3, seed=V)
        grad, (logp, ent, lse) = emulate_fused(emu, x, y, g_logp, g_ent, temperature=0.9, threads=64,
                                               cluster=cluster, in_smem=in_smem, grad_offset=grad_offset,
                                               prefetch=prefetch is True, bulk=prefetch == "bulk")
        lp64, ent64 = reference.logprobs(x.double(), y, temperature=0.9, return_entropy=True)
        lpl, entl = reference.logprobs(x, y, temperature=0.9, return_entropy=True)
        assert_matches_oracle(logp, lpl, lp64, dtype, "logp")
        assert_matches_oracle(ent, entl, ent64, dtype, "entropy")
        g64, gl = _grad_oracle(x, y, 0.9, g_logp, g_ent, op_torch=False)
        assert_matches_oracle(grad, gl, g64, dtype, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threads", (32, 64, 512))
def test_l2_path_reversed_second_sweep_is_bit_identical(emu, dtype, threads):
    """ppo.cu's kL2 (RLHF_KERNELS_CUDA_PPO=l2): each thread writes the same vectors as kGlobal, last first, so every
    dlogits element (and logp, entropy, lse) equals kGlobal's bit for bit: rows shorter than the CTA, partial head
    and tail vectors at every misalignment, a gradient at another alignment than the logits, ignored targets."""
    for V, offset, grad_offset in ((50257, 3, 3), (4097, 1, 2), (9, 5, 5), (1031, 0, 7), (40, 2, 0)):
        x = random_logits(4, V, dtype, seed=V + threads)
        x[2, : V // 3] = float("-inf")
        x = at_offset(x.to(dtype), offset)
        y = random_targets(4, V, seed=V + 2)
        y[3] = IGNORE
        g_logp, g_ent = upstream(4, seed=V + 3)
        runs = [emulate_fused(emu, x, y, g_logp, g_ent, temperature=0.8, threads=threads, in_smem=False,
                              grad_offset=grad_offset, reverse=r) for r in (False, True)]
        (g0, outs0), (g1, outs1) = runs
        bits = torch.int16 if dtype != torch.float32 else torch.int32
        assert torch.equal(g0.view(bits), g1.view(bits)), f"V={V} dlogits"
        for a, b, name in zip(outs0, outs1, ("logp", "entropy", "lse")):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"V={V} {name}"
        g64, gl = _grad_oracle(x, y, 0.8, g_logp, g_ent, op_torch=False)
        assert_matches_oracle(g1, gl, g64, dtype, "dlogits")


def emulate_pipe(lib, x, y, g_logp, g_ent, *, temperature, threads, cluster, clusters, grad_offset):
    rows, stride = _rows(x)
    grad = grad_buffer_like(x, grad_offset)
    out = [torch.full((rows,), float("nan")) for _ in range(3)]
    rc = lib.rk_emulate_fused_grad_pipe(DTYPE_CODE[x.dtype], grad.data_ptr(), x.data_ptr(), y.data_ptr(),
                                        g_logp.data_ptr(), g_ent.data_ptr(), rows, stride, grad.stride(0), x.shape[1],
                                        1.0 / temperature, IGNORE, threads, cluster, clusters,
                                        *(o.data_ptr() for o in out))
    assert rc == 0
    assert_only_rows_written(grad)
    return grad, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threads,cluster,clusters", ((32, 1, 1), (64, 2, 3), (128, 4, 2), (64, 8, 4)))
def test_pipe_path_matches_the_cluster_path_bit_for_bit(emu, dtype, threads, cluster, clusters):
    """ppo.cu's kPipe (RLHF_KERNELS_CUDA_PPO=pipe): persistent clusters taking every `clusters`-th row, each CTA
    staging the next row's slice into its second buffer before it sweeps this one. Every dlogits element and logp,
    entropy, lse equal the cluster path's (same threads, same cluster) bit for bit: rows at every misalignment (their
    partial vectors staged one row ahead), clusters with unequal row counts (both buffers reused), targets in a
    partial vector, at a slice boundary, ignored or out of range, -inf and extreme logits. Buffers start as NaN bytes,
    so a vector read before it was staged, or from the wrong buffer, shows up."""
    rows = 9
    for V, offset, grad_offset in ((50257, 3, 3), (4097, 1, 2), (9, 5, 5), (1031, 0, 7), (40, 2, 0)):
        x = random_logits(rows, V, torch.float32, seed=V + threads + cluster)
        x[2, : V // 3] = float("-inf")
        x[4, V // 2] = 1e4 if dtype != torch.float16 else 6e4
        x = at_offset(x.to(dtype), offset)
        y = random_targets(rows, V, seed=V + clusters, ignore_frac=0.0)
        y[1] = IGNORE
        y[3] = V - 1  # the last, often partial, vector
        per = -(-(-(-V // VEC[dtype]) + 1) // cluster)  # ppo.cu's vecs_per_cta: ceil((ceil(V / kVec) + 1) / cluster)
        y[5] = min(V - 1, max(0, per * VEC[dtype] - 1))  # near the first slice boundary
        y[6] = V + 3  # out of range: logp NaN, as every path
        g_logp, g_ent = upstream(rows, seed=V + 4)
        kw = dict(temperature=0.85, threads=threads, cluster=cluster, grad_offset=grad_offset)
        g_cluster, outs_cluster = emulate_fused(emu, x, y, g_logp, g_ent, in_smem=True, **kw)
        g_pipe, outs_pipe = emulate_pipe(emu, x, y, g_logp, g_ent, clusters=clusters, **kw)
        bits = torch.int16 if dtype != torch.float32 else torch.int32
        assert torch.equal(g_cluster.view(bits), g_pipe.view(bits)), f"V={V} dlogits"
        for a, b, name in zip(outs_cluster, outs_pipe, ("logp", "entropy", "lse")):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"V={V} {name}"
        ok = torch.arange(rows) != 6
        g64, gl = _grad_oracle(x[ok], y[ok], 0.85, g_logp[ok], g_ent[ok], op_torch=True)
        assert_matches_oracle(g_pipe[ok], gl, g64, dtype, "dlogits")
        lp64, ent64 = reference.logprobs(x[ok].double(), y[ok], temperature=0.85, return_entropy=True)
        lpl, entl = reference.logprobs(x[ok], y[ok], temperature=0.85, return_entropy=True)
        assert_matches_oracle(outs_pipe[0][ok], lpl, lp64, dtype, "logp")
        assert_matches_oracle(outs_pipe[1][ok], entl, ent64, dtype, "entropy")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threads,cluster", ((32, 1), (64, 3), (128, 4), (256, 2)))
def test_prefetch_sweep_is_bit_identical(emu, dtype, threads, cluster):
    """row_prefetch.cuh (RLHF_KERNELS_CUDA_PREFETCH=1) and row_bulk.cuh (=bulk): the cp.async pipeline and the fold
    of the TMA's chunks take each thread's vectors in the register sweep's grouping, so logp, entropy, lse and dlogits
    equal the cached register sweep's bit for bit, for every misalignment, row lengths that leave partial groups, a
    pipeline deeper than a thread's vectors (V = 9), slices of one to eight bulk chunks, and -inf / extreme logits.
    The bulk emulation lands a chunk only when a thread waits for it (its slice reset to NaN bytes before each
    thread), so a fold that read a chunk before waiting for it would not match."""
    for V, offset in ((50257, 3), (4097, 1), (9, 5), (1031, 0), (777, 7)):
        x = random_logits(3, V, dtype, seed=V + threads)
        x[1, : V // 3] = float("-inf")
        x[2, V // 2] = 1e4 if dtype != torch.float16 else 6e4
        x = at_offset(x.to(dtype), offset)
        y = random_targets(3, V, seed=V + cluster)
        g_logp, g_ent = upstream(3, seed=V + 1)
        kw = {"temperature": 0.7, "threads": threads, "cluster": cluster, "grad_offset": offset}
        g0, outs0 = emulate_fused(emu, x, y, g_logp, g_ent, **kw)
        bits = torch.int16 if dtype != torch.float32 else torch.int32
        for sweep in ("prefetch", "bulk"):
            g1, outs1 = emulate_fused(emu, x, y, g_logp, g_ent, **kw, **{sweep: True})
            assert torch.equal(g0.view(bits), g1.view(bits)), f"{sweep} V={V} dlogits"
            for a, b, name in zip(outs0, outs1, ("logp", "entropy", "lse")):
                assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{sweep} V={V} {name}"


def _in_place_fused(lib, x, y, g_logp, g_ent, *, mode, threads, cluster):
    """rk_emulate_fused_grad with the gradient written over the logits (``ppo_loss(overwrite_logits=True)``)."""
    rows, stride = _rows(x)
    base = x if x._base is None else x._base
    buf = base.clone().as_strided(x.shape, x.stride(), x.storage_offset())  # x's values at x's alignment
    out = [torch.full((rows,), float("nan")) for _ in range(3)]
    rc = lib.rk_emulate_fused_grad(DTYPE_CODE[x.dtype], buf.data_ptr(), buf.data_ptr(), y.data_ptr(),
                                   g_logp.data_ptr(), g_ent.data_ptr(), rows, stride, stride, x.shape[1], 1.0,
                                   IGNORE, threads, cluster, mode, *(o.data_ptr() for o in out))
    assert rc == 0
    return buf, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,cluster", ((0, 1), (3, 1), (1, 1), (1, 4), (2, 4), (1 | BULK, 4), (4, 1), (5, 4)),
                         ids=("global", "l2", "shared", "cluster4", "cluster4-prefetch", "cluster4-bulk",
                              "global-no-entropy", "cluster4-no-entropy"))
def test_fused_ppo_gradient_written_over_the_logits_is_the_out_of_place_one(emu, dtype, mode, cluster):
    """``overwrite_logits``: each thread of sweep 2 writes its vectors over the very logits it reads (global and l2
    re-read them from there), so every read of a column must come before its write; the target's column, rewritten
    after the loop, is read before it. The same bits as into a separate buffer, every alignment of the target.
    In the exact build only: with FMA contraction the host compiler versions some loops on whether the two
    buffers alias, and its two versions contract differently (a last-bit difference that is the emulation's own)."""
    if "contracted" in getattr(emu, "_name", ""):
        pytest.skip("bit identity across the host compiler's alias-versioned loops needs the exact build")
    for V, offset in ((4097, 1), (1031, 0), (40, 2), (9, 5)):
        x = at_offset(random_logits(6, V, dtype, seed=V + mode), offset)
        y = random_targets(6, V, seed=V + mode, ignore_frac=0.0)
        y[:4] = torch.tensor([0, V - 1, V // 2, min(8, V - 1)])  # first / last / middle / a whole vector's column
        y[5] = IGNORE
        g_logp, g_ent = upstream(6, seed=V)
        if mode & 4:
            g_ent = torch.zeros(6)
        ref, outs_ref = emulate_fused(emu, x, y, g_logp, g_ent, threads=32, cluster=cluster, in_smem=mode & 3 in (1, 2),
                                      prefetch=mode & 3 == 2, reverse=mode & 3 == 3, no_entropy=bool(mode & 4),
                                      bulk=bool(mode & BULK))
        got, outs = _in_place_fused(emu, x, y, g_logp, g_ent, mode=mode, threads=32, cluster=cluster)
        bits = torch.int16 if dtype != torch.float32 else torch.int32
        assert torch.equal(got.view(bits), ref.view(bits)), f"V={V} dlogits"
        for a, b in zip(outs, outs_ref):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"V={V}"


# ------------------------------------------------------------------ the fused step's loss aggregation

def emulate_loss_aggregate(lib, mask, term, clipped, logp, old_logp, loss_agg, threads):
    """ppo_aggregate.cu's kernels on [rows, cols] float32 inputs: (weights, loss, means)."""
    rows, cols = mask.shape
    inputs = [t.float().contiguous() for t in (mask, term, clipped, logp, old_logp)]
    weights = torch.full_like(inputs[0], float("nan"))  # poisoned: every weight must be written
    loss, means = torch.full((), float("nan")), torch.full((2,), float("nan"))
    code = reference.LOSS_AGG_MODES.index(loss_agg)
    rc = lib.rk_emulate_loss_aggregate(inputs[0].data_ptr(), rows, cols, code, threads,
                                       *(t.data_ptr() for t in inputs[1:]), weights.data_ptr(), loss.data_ptr(),
                                       means.data_ptr())
    assert rc == 0
    return weights, loss, means


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
@pytest.mark.parametrize("threads", (32, 512))
@pytest.mark.parametrize("rows,cols", ((1, 1), (3, 5), (4, 37), (40, 7), (2, 1000), (0, 5), (5, 0)))
@pytest.mark.parametrize("kind", ("binary", "empty", "fractional", "signed"))
def test_loss_aggregation_matches_the_float64_aggregate(emu, loss_agg, threads, rows, cols, kind):
    """ppo_fwd_loss's weights kernel gives ``aggregation_weights``' values (the same bits for 0/1 masks, whose sums
    are exact) and its sums kernel the float64 oracle's loss (``reference.aggregate_loss``) and token means of
    ``clipped`` and ``½(logp - old_logp)²`` over the mask (0 for an empty mask): every loss_agg, rows over more
    than one warp's turn (40 rows against 16 warps), rows longer than a warp, empty and signed masks."""
    from rlhf_kernels.ops import ppo as ppo_ops

    mask, term, clipped, logp, old_logp = aggregate_case(rows, cols, kind, seed=rows * 1000 + cols + threads)
    weights, loss, means = emulate_loss_aggregate(emu, mask, term, clipped, logp, old_logp, loss_agg, threads)
    expected = ppo_ops.aggregation_weights(mask, loss_agg)
    if kind in ("binary", "empty"):
        assert torch.equal(weights, expected), loss_agg
    else:
        torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
    loss64, means64 = aggregate_oracle(mask, term, clipped, logp, old_logp, loss_agg)
    scale = max(1.0, float(mask.abs().sum()))  # signed masks: sums of cancelling terms
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(means.double(), means64, rtol=1e-5, atol=1e-6 * scale)
    if kind == "empty":
        assert loss.item() == 0.0 and means.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
@pytest.mark.parametrize("kind", ("binary", "empty", "fractional"))
def test_masked_tokens_with_non_finite_terms_add_nothing(emu, loss_agg, kind):
    """A token of mask 0 whose term and log-prob are +-inf or NaN (padding, a masked vocabulary entry as target)
    leaves the loss and the means as they are without it (``reference.masked``); 0·inf had made them NaN, also for
    an empty mask, which DESIGN §2 gives a loss of 0."""
    mask, term, clipped, logp, old_logp = aggregate_case(6, 9, kind, seed=77)
    if kind == "fractional":
        mask[mask < 0.3] = 0.0
    assert (mask == 0).any()
    term, logp = with_masked_non_finite(mask, term, logp)
    weights, loss, means = emulate_loss_aggregate(emu, mask, term, clipped, logp, old_logp, loss_agg, 64)
    loss64, means64 = aggregate_oracle(mask, term, clipped, logp, old_logp, loss_agg)
    assert torch.isfinite(loss64) and torch.isfinite(loss) and torch.isfinite(means).all()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(means.double(), means64, rtol=1e-5, atol=1e-6)


def test_loss_aggregation_rejects_a_bad_launch(emu):
    x = torch.zeros(2, 3)
    out = torch.zeros(2, 3)
    for threads, code in ((48, 0), (2048, 0), (64, 4), (64, -1)):
        assert emu.rk_emulate_loss_aggregate(x.data_ptr(), 2, 3, code, threads, x.data_ptr(), x.data_ptr(),
                                             x.data_ptr(), x.data_ptr(), out.data_ptr(), out.data_ptr(),
                                             out.data_ptr()) == 2
