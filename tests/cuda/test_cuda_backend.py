"""The cuda backend where no GPU is needed: the build holds its kernels, dispatch and errors, the fused-PPO contract.

The kernels themselves run in ``test_cuda_gpu.py`` (``pytest -m gpu``). Here: the
extension compiled them (nvcc is present in CI), ``backend="cuda"`` on CPU tensors
fails with a clear error, the per-op preference table drives the automatic choice,
and the fused forward-with-gradient op of ``ppo_loss`` keeps its contract
(aggregation weights, loss, gradient, opcheck, compile) through its ``torch`` branch.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _ext, reference
from rlhf_kernels.ops import _dispatch
from rlhf_kernels.ops import _forward_grads as forward_grads
from rlhf_kernels.ops import kl as kl_ops
from rlhf_kernels.ops import logprobs as lp_ops
from rlhf_kernels.ops import ppo as ppo_ops
from tests.build_expectations import cuda_kernels_expected

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

REQUIRED = os.environ.get("RLHF_KERNELS_REQUIRE_EXTENSION") == "1" and cuda_kernels_expected()


def _has_cuda_kernels() -> bool:
    if REQUIRED:
        assert _ext.has_cuda_kernels(), "nvcc is present but the extension has no CUDA kernels"
    return _ext.has_cuda_kernels()


def test_extension_holds_the_cuda_kernels_and_info_lists_them():
    if not _has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    for name in ("logprobs_fwd", "logprobs_bwd", "kl_divergence_fwd", "kl_divergence_bwd", "ppo_fwd",
                 "ppo_fwd_loss", "scale_unless_one_"):
        assert hasattr(torch.ops.rlhf_kernels_C, name), name
    # the CUDA dispatch key has an implementation of each (not only a schema)
    for name in ("logprobs_fwd", "logprobs_bwd", "kl_divergence_fwd", "ppo_fwd", "ppo_fwd_loss"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rlhf_kernels_C::{name}", "CUDA"), name
    report = rk.info(print_report=False)
    assert {"logprobs", "kl_divergence", "ppo_loss"} <= set(report["extension"]["cuda_kernels_per_op"])
    for op in ("logprobs", "kl_divergence", "ppo_loss"):
        assert "cuda" in report["ops"][op]
    text = rk.info.__globals__["format_report"](report)
    assert "cuda kernels (csrc/cuda, compiled for" in text and report["extension"]["cuda_archs"] in text


def test_oldest_cuda_arch_reads_the_arch_list(monkeypatch):
    for listed, oldest in (("8.0;9.0+PTX", (8, 0)), ("", (0, 0)), ("7.5 8.6+PTX", (7, 5)), ("9.0a;10.0", (9, 0))):
        monkeypatch.setattr(_ext, "cuda_arch_list", lambda listed=listed: listed)
        assert _ext.oldest_cuda_arch() == oldest, listed


@pytest.mark.parametrize("capability, runs", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((8, 6), True),
                                              ((9, 0), True), ((10, 0), True)])
def test_a_gpu_older_than_the_kernels_is_not_given_the_cuda_backend(capability, runs, monkeypatch):
    """On a GPU older than the oldest architecture compiled (a T4 against the default 8.0;9.0+PTX) the CUDA kernels
    have no image: the cuda backend is unavailable there, by name (the automatic choice moves on, a forced one
    raises). The target check and the backward's scale ask the same ``cuda_kernels_run_on`` before they use the
    extension's kernels. No GPU needed: the device's capability is faked."""
    if not _has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    monkeypatch.setattr(_ext, "cuda_arch_list", lambda: "8.0;9.0+PTX")
    monkeypatch.setattr(_ext, "_runs_on", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gpu = torch.device("cuda")
    assert _ext.cuda_kernels_run_on(gpu) is runs
    reason = _dispatch.unavailable_reason("cuda", gpu)
    if runs:
        assert reason is None
    else:
        assert f"sm_{capability[0]}{capability[1]}" in reason and "8.0;9.0+PTX" in reason
        assert "TORCH_CUDA_ARCH_LIST" in reason
        assert _dispatch.resolve_backend("logprobs", gpu, None, lp_ops.IMPLEMENTED) != "cuda"
        with pytest.raises(RuntimeError, match="cannot run logprobs"):
            _dispatch.resolve_backend("logprobs", gpu, "cuda", lp_ops.IMPLEMENTED)


def test_no_cuda_kernel_spills_to_local_memory():
    """Every compiled kernel keeps its state in registers, on every built architecture: no local memory, no stack.

    The row sweeps are issue-bound (benchmarks/sass_report.py); a spill would add a local-memory
    round trip per value. The resource table comes from the built fat binary, no GPU needed.
    """
    if not _has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    from benchmarks import sass_report
    from rlhf_kernels import _C

    cuobjdump = sass_report.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found")
    listed = _ext.cuda_arch_list().replace(" ", ";").split(";")
    archs = sorted({"sm_" + a.split("+")[0].replace(".", "") for a in listed if a})
    assert archs, "the extension reports no CUDA architectures"
    for arch in archs:
        usage = sass_report.resource_usage(cuobjdump, _C.__file__, arch)
        names = sass_report.short_names(list(usage))
        assert any("logprobs_fwd_kernel" in n for n in names.values()), f"no {arch} kernels found in {_C.__file__}"
        spilled = {names[s]: r for s, r in usage.items() if "LOCAL:0" not in r or "STACK:0" not in r}
        assert not spilled, f"{arch}: kernels using local memory / stack: {spilled}"


@pytest.mark.parametrize("op", ["logprobs", "kl_divergence", "ppo_loss"])
def test_cuda_backend_on_cpu_tensors_raises_clearly(op):
    logits = torch.randn(2, 3, 7)
    y = torch.randint(0, 7, (2, 3))
    z = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run .*needs CUDA tensors|extension"):
        if op == "logprobs":
            rk.logprobs(logits, y, backend="cuda")
        elif op == "kl_divergence":
            rk.kl_divergence(logits, logits, backend="cuda")
        else:
            rk.ppo_loss(logits, y, z, z, z + 1, backend="cuda")


def test_kl_estimate_has_no_cuda_kernel():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="has no kernel for kl_estimate"):
        rk.kl_estimate(x, x, backend="cuda")


def test_gpu_preference_table_drives_the_automatic_choice(monkeypatch):
    cuda = torch.device("cuda")  # a device object only: no GPU is touched
    for op, order in _dispatch.GPU_PREFERENCE.items():
        assert set(order) <= {"triton", "cuda"} and order, (op, order)
    # live backends for the check: triton always, cuda as this build allows
    monkeypatch.setattr(_dispatch, "unavailable_reason", lambda backend, device: None)
    assert _dispatch.resolve_backend("logprobs", cuda, None, lp_ops.IMPLEMENTED) == _dispatch.GPU_PREFERENCE[
        "logprobs"][0]
    monkeypatch.setitem(_dispatch.GPU_PREFERENCE, "logprobs", ("cuda", "triton"))
    assert _dispatch.resolve_backend("logprobs", cuda, None, lp_ops.IMPLEMENTED) == "cuda"
    monkeypatch.setitem(_dispatch.GPU_PREFERENCE, "kl_divergence", ("triton", "cuda"))
    assert _dispatch.resolve_backend("kl_divergence", cuda, None, kl_ops.IMPLEMENTED) == "triton"
    # the process-wide override wins over the table
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "cuda")
    assert _dispatch.resolve_backend("kl_divergence", cuda, None, kl_ops.IMPLEMENTED) == "cuda"


def test_float64_stays_off_the_fp32_gpu_kernels(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(_dispatch, "unavailable_reason", lambda backend, device: None)
    probe = SimpleNamespace(device=cuda, dtype=torch.float64)  # resolve_for reads only these two
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "cuda")
    assert lp_ops.resolve_for("logprobs", probe, None, lp_ops.IMPLEMENTED) == "torch"
    with pytest.raises(RuntimeError, match="float64"):
        lp_ops.resolve_for("logprobs", probe, "cuda", lp_ops.IMPLEMENTED)


def test_cuda_ppo_path_setting(monkeypatch):
    assert ppo_ops.cuda_ppo_path() in ppo_ops.CUDA_PPO_PATHS
    monkeypatch.setenv("RLHF_KERNELS_CUDA_PPO", "Cluster")
    assert ppo_ops.cuda_ppo_path() == "cluster"
    monkeypatch.setenv("RLHF_KERNELS_CUDA_PPO", "bogus")
    with pytest.raises(ValueError, match="RLHF_KERNELS_CUDA_PPO"):
        ppo_ops.cuda_ppo_path()


def test_ppo_plan_takes_every_setting_and_refuses_other_codes():
    """Each RLHF_KERNELS_CUDA_PPO value maps to a code the bindings accept (two-pass, -1, never reaches them), and
    the plan query refuses any other code, naming the paths, before it asks the GPU anything."""
    if not _has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    ext = _ext.load()
    for bad in (-1, 4, 7):
        with pytest.raises(RuntimeError, match=r"ppo path must be .*5 \(l2\) or 6 \(pipe\), got " + str(bad)):
            ext.ppo_plan(151936, "bfloat16", bad, True, 0)
    codes = {name: code for name, code in ppo_ops.CUDA_PPO_PATHS.items() if name != "two-pass"}
    assert sorted(codes.values()) == [0, 1, 2, 3, 5, 6], codes
    if torch.cuda.is_available():
        for code in codes.values():
            assert ext.ppo_plan(151936, "bfloat16", code, True, torch.cuda.current_device())[0] in (
                "auto", "global", "shared", "cluster", "l2", "pipe", "none")


def test_a_forced_ppo_path_that_cannot_run_is_refused_by_name(monkeypatch):
    """RLHF_KERNELS_CUDA_PPO=shared / cluster / pipe where the plan says "none": ValueError naming the setting, V and
    dtype, before any kernel (the binding's own C++ refusal crashed an H200 process in run 5); auto and two-pass
    never ask; one question per (device, V, dtype, path, cluster setting)."""
    asked = []

    def fake_plan(vocab, dtype_name, code, with_grad, device):
        asked.append((vocab, dtype_name, code, device))
        return ("none", 0, 256, 0) if code in (2, 6) else ("global", 1, 256, 0)

    monkeypatch.setattr(_ext, "load", lambda: SimpleNamespace(ppo_plan=fake_plan))
    ppo_ops._cuda_ppo_plan_name.cache_clear()
    monkeypatch.delenv("RLHF_KERNELS_CUDA_CLUSTER", raising=False)
    logits = SimpleNamespace(device=torch.device("cuda", 1), dtype=torch.bfloat16, shape=(2, 3, 151936))
    for path in ("shared", "pipe"):
        with pytest.raises(ValueError, match=f"RLHF_KERNELS_CUDA_PPO={path} cannot run for V = 151936 in bfloat16"):
            ppo_ops.check_cuda_ppo_path_runs(path, logits, ppo_ops.cuda_ppo_cluster())
    for path in ("auto", "two-pass"):
        ppo_ops.check_cuda_ppo_path_runs(path, logits, ppo_ops.cuda_ppo_cluster())
    for _ in range(3):
        ppo_ops.check_cuda_ppo_path_runs("global", logits, ppo_ops.cuda_ppo_cluster())
    assert asked == [(151936, "bfloat16", 2, 1), (151936, "bfloat16", 6, 1), (151936, "bfloat16", 1, 1)]
    monkeypatch.setenv("RLHF_KERNELS_CUDA_CLUSTER", "8")  # changes the plan, so it is asked again
    ppo_ops.check_cuda_ppo_path_runs("global", logits, ppo_ops.cuda_ppo_cluster())
    assert len(asked) == 4
    ppo_ops._cuda_ppo_plan_name.cache_clear()


def test_cuda_forward_threads_setting(monkeypatch):
    monkeypatch.delenv("RLHF_KERNELS_CUDA_FWD_THREADS", raising=False)
    assert _dispatch.cuda_forward_threads() is None  # each kernel's own default
    monkeypatch.setenv("RLHF_KERNELS_CUDA_FWD_THREADS", " 128 ")
    assert _dispatch.cuda_forward_threads() == 128
    for bad in ("100", "1024", "16", "-64", "many"):
        monkeypatch.setenv("RLHF_KERNELS_CUDA_FWD_THREADS", bad)
        with pytest.raises(ValueError, match="RLHF_KERNELS_CUDA_FWD_THREADS"):
            _dispatch.cuda_forward_threads()
    # checked whenever the cuda backend is picked, before any launch; other backends ignore it
    monkeypatch.setattr(_dispatch, "_resolve", lambda *args: "cuda")
    with pytest.raises(ValueError, match="RLHF_KERNELS_CUDA_FWD_THREADS"):
        _dispatch.resolve_backend("logprobs", torch.device("cpu"), None, ("cuda",))
    monkeypatch.setattr(_dispatch, "_resolve", lambda *args: "cpu")
    assert _dispatch.resolve_backend("logprobs", torch.device("cpu"), None, ("cpu",)) == "cpu"


def test_cuda_prefetch_setting(monkeypatch):
    monkeypatch.delenv("RLHF_KERNELS_CUDA_PREFETCH", raising=False)
    assert ppo_ops.cuda_ppo_prefetch() == "1"  # cp.async, the default since the H200's run 3
    for value, expected in (("0", "0"), ("1", "1"), ("", "1"), ("bulk", "bulk")):
        monkeypatch.setenv("RLHF_KERNELS_CUDA_PREFETCH", value)
        assert ppo_ops.cuda_ppo_prefetch() == expected
    for bad in ("yes", "2", " 1", "true", "Bulk", "tma"):  # the launcher reads exactly these: the rest is refused
        monkeypatch.setenv("RLHF_KERNELS_CUDA_PREFETCH", bad)
        with pytest.raises(ValueError, match="RLHF_KERNELS_CUDA_PREFETCH must be one of"):
            ppo_ops.cuda_ppo_prefetch()


def test_cuda_cluster_setting(monkeypatch):
    monkeypatch.delenv("RLHF_KERNELS_CUDA_CLUSTER", raising=False)
    assert ppo_ops.cuda_ppo_cluster() is None
    for value, expected in (("", None), ("2", 2), ("4", 4), ("8", 8)):
        monkeypatch.setenv("RLHF_KERNELS_CUDA_CLUSTER", value)
        assert ppo_ops.cuda_ppo_cluster() == expected
    for bad in ("16", "3", "auto", " 4", "1"):  # the launcher reads exactly 2, 4 or 8
        monkeypatch.setenv("RLHF_KERNELS_CUDA_CLUSTER", bad)
        with pytest.raises(ValueError, match="RLHF_KERNELS_CUDA_CLUSTER must be one of"):
            ppo_ops.cuda_ppo_cluster()


# ------------------------------------------------------------- the fused forward-with-gradient contract


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
def test_aggregation_weights_are_the_gradient_of_the_aggregate(loss_agg):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(4, 6, generator=g) > 0.4
    mask[1] = False  # an empty sequence
    term = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(reference.aggregate_loss(term, mask, loss_agg), term)
    weights = ppo_ops.aggregation_weights(mask, loss_agg)
    assert weights.dtype == torch.float32 and weights.shape == mask.shape
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=1e-8)
    # an all-empty mask gives zero weights, never NaN
    assert torch.equal(ppo_ops.aggregation_weights(torch.zeros(3, 5), loss_agg), torch.zeros(3, 5))
    # as does a signed mask whose sums are zero (the denominators, not the entries, decide), as the reference's
    # aggregate has a zero gradient there
    signed = torch.tensor([[1.0, -1.0, 0.5, -0.5], [2.0, 0.0, -2.0, 0.0]])
    term64 = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(reference.aggregate_loss(term64, signed, loss_agg), term64)
    torch.testing.assert_close(ppo_ops.aggregation_weights(signed, loss_agg).double(), expected, rtol=1e-6, atol=1e-8)


def _fused_args(logits, seed, *, ref=True, loss_agg="token-mean", dual_clip=3.0):
    g = torch.Generator().manual_seed(seed)
    lead = logits.shape[:-1]
    V = logits.shape[-1]
    y = torch.randint(0, V, lead, generator=g)
    y.view(-1)[1] = -100
    old = (torch.randn(lead, generator=g) * 0.3 - 2).double()
    adv = torch.randn(lead, generator=g).double()
    ref_logp = (torch.randn(lead, generator=g) * 0.3 - 2).double() if ref else None
    mask = torch.rand(lead, generator=g) > 0.25
    options = {"ref_logp": ref_logp, "kl_coef": 0.1 if ref else 0.0, "kl_estimator": "k3", "entropy_coef": 0.01,
               "clip_low": 0.2, "clip_high": 0.28, "dual_clip": dual_clip, "loss_agg": loss_agg}
    return y, old, adv, mask, options


_FUSED = {"op": ppo_ops.ppo_loss_fused}  # the route _fused takes (fused_route)


@pytest.fixture(params=["op", "eager"])
def fused_route(request, monkeypatch):
    """A fused-op test runs through the registered op and through ops/_eager.py's autograd.Function (eager calls)."""
    route = ppo_ops.ppo_loss_fused if request.param == "op" else ppo_ops.ppo_loss_fused_call
    monkeypatch.setitem(_FUSED, "op", route)
    return request.param


def _fused(logits, y, old, adv, mask, o, backend="torch"):
    return _FUSED["op"](logits, y, old, adv, o["ref_logp"], mask, 1.0, -100, o["kl_coef"], o["kl_estimator"],
                                  o["entropy_coef"], o["clip_low"], o["clip_high"], o["dual_clip"], o["loss_agg"], 0,
                                  backend)


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
def test_fused_op_loss_and_gradient_match_the_reference(loss_agg, fused_route):
    logits = torch.randn(3, 6, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(2))[:, :-1]
    y, old, adv, mask, o = _fused_args(logits, 3, loss_agg=loss_agg)
    x = logits.detach().clone().requires_grad_()
    expected = reference.ppo_loss(x, y, old, adv, mask, **o)
    (g_ref,) = torch.autograd.grad(expected.loss * 2.5, x)
    x2 = logits.detach().clone().requires_grad_()
    out = _fused(x2, y, old, adv, mask, o)
    torch.testing.assert_close(out[0].double(), expected.loss, rtol=1e-6, atol=1e-7)
    assert all(not t.requires_grad for t in out[1:])
    # clip_frac and approx_kl (token means over the mask whatever loss_agg is), as the CUDA sums kernel gives them
    torch.testing.assert_close(out[7].double(), torch.stack((expected.clip_frac, expected.approx_kl)).double(),
                               rtol=1e-6, atol=1e-7)  # fmt: skip
    # the forward's dlogits is the gradient for an upstream gradient of 1; backward scales it
    (g,) = torch.autograd.grad(out[0] * 2.5, x2)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sliced", (False, True), ids=("whole", "range"))
@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
def test_fused_op_without_grad_gives_the_same_loss_and_statistics_and_no_gradient(loss_agg, sliced):
    """with_grad=False (ppo_loss under no_grad on the cuda backend): the loss, the per-token values and the means of
    the with-gradient call, and an empty tensor where dlogits was; both routes, a whole tensor and a row range."""
    base = torch.randn(3, 7, 13, generator=torch.Generator().manual_seed(5))
    logits, rng = (base, ()) if not sliced else (base, (1, 5))
    lead = (3, 5) if sliced else (3, 7)
    y, old, adv, mask, o = _fused_args(torch.empty(*lead, 13), lead[1], loss_agg=loss_agg)
    old, adv, o["ref_logp"] = old.float(), adv.float(), o["ref_logp"].float()
    args = (logits, y, old, adv, o["ref_logp"], mask, 1.0, -100, o["kl_coef"], o["kl_estimator"], o["entropy_coef"],
            o["clip_low"], o["clip_high"], o["dual_clip"], loss_agg, 0, "torch") + (rng or (0, ppo_ops.WHOLE))
    with_grad = ppo_ops.ppo_loss_fused(args[0].clone().requires_grad_(), *args[1:])
    for route in (ppo_ops.ppo_loss_fused, ppo_ops.ppo_loss_forward_call):
        with torch.no_grad():
            out = route(*args, False, False)
        assert out[6].numel() == 0
        for i in (0, 1, 2, 3, 4, 5, 7):
            assert torch.equal(out[i], with_grad[i].detach()), i
    torch.library.opcheck(ppo_ops.ppo_loss_fused, args + (False, False))


def test_fused_op_passes_opcheck_and_compiles():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 11, generator=g).requires_grad_()
    y, old, adv, mask, _ = _fused_args(logits, 5, ref=False, dual_clip=None)
    old, adv = old.float(), adv.float()
    args = (logits, y, old, adv, None, mask, 1.0, -100, 0.0, "k3", 0.01, 0.2, 0.2, None, "token-mean", 0, "torch")
    torch.library.opcheck(ppo_ops.ppo_loss_fused, args)

    def loss(x):
        return ppo_ops.ppo_loss_fused(x, *args[1:])[0]

    eager = torch.autograd.grad(loss(logits), logits)[0]
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(logits), logits)[0]
    torch.testing.assert_close(compiled, eager)


def test_fused_op_backward_runs_once(monkeypatch, fused_route):
    monkeypatch.setattr(forward_grads, "HAND_OVER_DEVICES", ("cpu", "cuda"))  # as on CUDA
    logits = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(6)).requires_grad_()
    y, old, adv, mask, o = _fused_args(logits, 7, ref=False)
    loss = _fused(logits, y, old.float(), adv.float(), mask, {**o, "kl_coef": 0.0})[0]
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    with pytest.raises(RuntimeError, match="its backward already ran"):
        loss.backward()
    torch.testing.assert_close(logits.grad, first)  # the failed second pass added nothing


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_fused_op_gradient_becomes_dot_grad_without_a_copy(scale, monkeypatch, fused_route):
    """On CUDA (here the CPU too) the forward's dlogits is adopted as ``.grad`` itself (ops/_forward_grads.py): no
    second gradient buffer, no copy. A tensor kept with ``save_for_backward`` would still be referenced while
    AccumulateGrad runs and be copied (on an H200, bf16 [8192, 151936]: 2.4 GB and ~1.2 ms more per step)."""
    monkeypatch.setattr(forward_grads, "HAND_OVER_DEVICES", ("cpu", "cuda"))
    logits = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(7)).requires_grad_()
    y, old, adv, mask, o = _fused_args(logits, 7, ref=False)
    outs = _fused(logits, y, old.float(), adv.float(), mask, {**o, "kl_coef": 0.0})
    written = outs[6].data_ptr()
    expected = outs[6].clone() * scale
    loss = outs[0] * scale
    del outs
    loss.backward()
    assert logits.grad.data_ptr() == written
    torch.testing.assert_close(logits.grad, expected)


def test_fused_op_backward_materialises_no_zero_gradient(monkeypatch, fused_route):
    """The fused op's dlogits output takes no upstream gradient: the backward must not be handed a zero-filled
    tensor shaped like the logits for it (autograd's default for unused outputs). On an H200 that was a second
    2.4 GB buffer and about 0.8 ms per step at bf16 [8192, 151936] (benchmarks/results/nvidia-h200, run 3)."""
    from tests.poison import zero_fills_during

    monkeypatch.setattr(forward_grads, "HAND_OVER_DEVICES", ("cpu", "cuda"))
    logits = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(8)).requires_grad_()
    y, old, adv, mask, o = _fused_args(logits, 7, ref=False)
    loss = _fused(logits, y, old.float(), adv.float(), mask, {**o, "kl_coef": 0.0})[0]
    assert zero_fills_during(loss.backward, logits.numel()) == []
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# ------------------------------------------------------------------ ppo_loss(overwrite_logits=True)


def _overwrite_case(seed, sliced):
    """A model-like (non-leaf) ``[2, 6, 11]`` logits tensor and the fused op's call on it (or on its first 5 rows)."""
    base = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(seed))
    y, old, adv, mask, o = _fused_args(base[:, :-1] if sliced else base, seed + 1)
    old, adv, ref = old.float(), adv.float(), o["ref_logp"].float()
    start, count = (0, 5) if sliced else (0, -1)

    def call(h, overwrite):
        return ppo_ops.ppo_loss_fused_call(h, y, old, adv, ref, mask, 1.0, -100, o["kl_coef"], o["kl_estimator"],
                                           o["entropy_coef"], o["clip_low"], o["clip_high"], o["dual_clip"],
                                           o["loss_agg"], 0, "torch", start, count, overwrite)  # fmt: skip

    return base, call


@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "rows-of-base"])
def test_fused_op_can_write_the_gradient_over_the_logits(sliced, monkeypatch):
    """``overwrite``: the same loss, statistics and gradient, bit for bit, but the gradient is the logits' own
    storage (no gradient-sized buffer); for a row range the base's other rows become its zero gradient. The
    logits' version counter moves, so autograd knows their values are gone."""
    monkeypatch.setattr(forward_grads, "HAND_OVER_DEVICES", ("cpu", "cuda"))  # as on CUDA
    base, call = _overwrite_case(11, sliced)
    results = {}
    for overwrite in (False, True):
        x = base.clone().requires_grad_()
        h = x * 1.0  # the model's logits: not a leaf
        version = h._version
        outs = call(h, overwrite)
        moved = h._version != version
        (grad,) = torch.autograd.grad(outs[0] * 2.5, h)
        results[overwrite] = (outs[:6], grad, moved, grad.data_ptr() == h.data_ptr(), h.detach())
    (outs0, g0, moved0, shared0, _), (outs1, g1, moved1, shared1, h1) = results[False], results[True]
    for a, b in zip(outs0, outs1):
        assert torch.equal(a, b)
    assert torch.equal(g0, g1) and g1.shape == base.shape
    assert not moved0 and not shared0  # out of place: a new buffer, the logits untouched
    assert moved1 and shared1 and torch.equal(h1, g1)  # in place: the logits hold the (scaled) gradient
    if sliced:
        assert torch.equal(h1[:, 5:], torch.zeros_like(h1[:, 5:]))


def test_a_backward_that_needed_the_overwritten_logits_raises():
    base, call = _overwrite_case(12, False)
    h = base.clone().requires_grad_() * 1.0
    side = h.pow(2).sum()  # PowBackward keeps h for its backward
    loss = call(h, True)[0]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + side).backward()


def test_overwrite_needs_a_contiguous_base_whose_rows_are_views():
    base = torch.randn(2, 6, 11)
    rows = base.narrow(1, 0, 5)
    for backend in ("torch", "cuda"):  # the CUDA kernel on every path (write_row_range reads before it writes)
        assert ppo_ops.overwrites_logits(base, rows, backend)
        assert not ppo_ops.overwrites_logits(base, rows.clone(), backend)  # as_rows had to copy
    wide = torch.randn(6, 2, 11).transpose(0, 1)  # unit vocab stride, not contiguous
    assert not ppo_ops.overwrites_logits(wide, wide, "cuda")
    assert not ppo_ops.overwrites_logits(base, rows, "triton")  # its gradient comes from the backward


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="the CUDA op's schema comes with the CUDA kernels")
def test_ppo_loss_without_grad_on_cuda_takes_the_forward_only_aggregating_call(monkeypatch):
    """No gradient wanted (no_grad, or logits that do not require it): ppo_loss on the cuda backend makes one
    ppo_fwd_loss call with with_grad=False (the forward-only kernel and the aggregation kernels), not the per-token
    op and PyTorch's aggregation; its loss and means are what ppo_loss returns. Stubbed on the CPU."""
    calls = []

    def stub(logits, targets, old_logp, advantages, ref_logp, mask, *scalars):
        with_grad = scalars[11] if len(scalars) > 11 else True
        calls.append(with_grad)
        stats = [torch.full(logits.shape[:2], 0.5) for _ in range(6)]
        grad = torch.zeros_like(logits) if with_grad else logits.new_empty(0)
        return stats + [grad, torch.tensor(1.25), torch.tensor([0.125, 0.375])]

    lib = torch.library.Library("rlhf_kernels_C", "IMPL")
    lib.impl("ppo_fwd_loss", stub, "CPU")
    try:
        monkeypatch.setattr(ppo_ops, "resolve_for", lambda *a: "cuda")
        monkeypatch.setattr(ppo_ops, "ppo_term_fwd_call", None)  # the per-token route must not be taken
        y, z = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)
        x = torch.randn(2, 4, 7)
        with torch.no_grad():
            out = rk.ppo_loss(x.requires_grad_()[:, :-1], y, z, z + 1, z + 1)
        out2 = rk.ppo_loss(x.detach()[:, :-1], y, z, z + 1, z + 1)  # grad enabled, logits without it
        assert calls == [False, False]
        for o in (out, out2):
            assert o.loss.item() == 1.25 and (o.clip_frac.item(), o.approx_kl.item()) == (0.125, 0.375)
            assert o.logp.shape == (2, 3) and not o.loss.requires_grad
    finally:
        lib._destroy()


def test_ppo_loss_overwrites_only_in_eager_calls_on_the_fused_path(monkeypatch):
    """Through ``ppo_loss`` (its CUDA route, with the kernel replaced by a CPU stub that records ``grad_out``): the
    eager call passes the logits themselves as the kernel's ``grad_out``; a call the registered op must take (here
    under a dispatch mode) and a call without ``overwrite_logits`` pass a separate buffer. Non-bools are refused."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    def stub(logits, targets, old_logp, advantages, ref_logp, mask, *scalars):
        grad_out = scalars[10] if len(scalars) > 10 else None  # (the dispatcher drops a trailing default)
        seen.append(grad_out is not None and grad_out.data_ptr() == logits.data_ptr())
        stats = [torch.zeros(logits.shape[:2]) for _ in range(6)]
        grad = logits.new_empty(0) if grad_out is not None else torch.zeros_like(logits)
        return stats + [grad, torch.zeros(()), torch.zeros(2)]

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    lib = torch.library.Library("rlhf_kernels_C", "IMPL")
    lib.impl("ppo_fwd_loss", stub, "CPU")
    try:
        monkeypatch.setattr(ppo_ops, "resolve_for", lambda *a: "cuda")
        y, z = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)
        for overwrite, mode in ((True, None), (False, None), (True, Passthrough)):
            x = torch.randn(2, 3, 7, requires_grad=True)
            with mode() if mode else torch.enable_grad():
                rk.ppo_loss(x * 1.0, y, z, z + 1, z + 1, overwrite_logits=overwrite)
        assert seen == [True, False, False]
    finally:
        lib._destroy()
    with pytest.raises(TypeError, match="overwrite_logits must be True or False"):
        rk.ppo_loss(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), z[:1, :2], z[:1, :2], z[:1, :2],
                    overwrite_logits="yes")  # fmt: skip
