"""The fused PPO kernel's probe (csrc/cuda/ppo_probe.cuh, benchmarks/probe_ppo.py).

On a GPU (``pytest -m gpu``): the probe with nothing left out is the production kernel bit for bit on every path
it covers, every CTA writes a full, ordered row of stamps on the SM it names, each skipped stage runs, and the
binding refuses what the probe cannot do. Without one: the binding and the script say so instead of failing
obscurely.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import probe_analysis as pa
from benchmarks import probe_ppo
from rlhf_kernels import _ext
from rlhf_kernels.ops.ppo import CUDA_PPO_PATHS
from tests.child_process import run_in_child

needs_cuda_build = pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="extension built without CUDA kernels")


def on_gpu(test):
    """``pytest -m gpu`` only, and only with a device and the CUDA kernels."""
    for mark in (pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
                 needs_cuda_build):
        test = mark(test)
    return test


def _inputs(n: int, v: int, dtype: torch.dtype, device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(n + v)
    y = torch.randint(0, v, (1, n), generator=g, device=device)
    y[0, ::5] = -100  # ignored tokens: their gradient rows are zero-filled
    return {"x": (torch.randn((1, n, v), generator=g, device=device) * 3).to(dtype), "y": y,
            "old": torch.randn((1, n), generator=g, device=device) - 3,
            "adv": torch.randn((1, n), generator=g, device=device),
            "ref": torch.randn((1, n), generator=g, device=device) - 3,
            "w": torch.full((1, n), 1.0 / n, device=device)}


def _plan(path: str, v: int, dtype: torch.dtype):
    return _ext.load().ppo_plan(v, str(dtype).replace("torch.", ""), CUDA_PPO_PATHS[path], True,
                                torch.cuda.current_device())


def _probe(t, path: str, stamps, skip: int):
    return _ext.load().ppo_fwd_probe(*probe_ppo._args(t, True, CUDA_PPO_PATHS[path]), stamps, skip)


@needs_cuda_build
def test_the_probe_refuses_cpu_tensors_by_name():
    t = _inputs(2, 7, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="ppo_fwd_probe needs CUDA tensors, got logits on cpu"):
        _probe(t, "global", None, 0)


def test_the_script_without_a_gpu_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert probe_ppo.main(["--n", "4", "--v", "7"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_script_rejects_a_path_without_a_probe():
    with pytest.raises(SystemExit):
        probe_ppo.main(["--paths", "pipe"])


@pytest.mark.parametrize("path, v, dtype", [
    ("global", 4097, torch.bfloat16), ("global", 151936, torch.float32), ("shared", 4097, torch.float16),
    ("cluster", 151936, torch.bfloat16), ("cluster", 50257, torch.float32), ("l2", 50257, torch.bfloat16),
])
@on_gpu
def test_the_probe_is_the_production_kernel_bit_for_bit_and_stamps_every_cta(path, v, dtype):
    plan = _plan(path, v, dtype)
    if plan[0] == "none":
        pytest.skip(f"{path} cannot run for V = {v} {dtype} on this GPU")
    n = 37
    t = _inputs(n, v, dtype)
    code = CUDA_PPO_PATHS[path]
    for entropy_coef in (0.01, 0.0):  # the full gradient formula, then the no-entropy kernels (kNoEntropy)
        args = probe_ppo._args(t, True, code, entropy_coef)
        production = [o for o in torch.ops.rlhf_kernels_C.ppo_fwd(*args) if o.numel()]
        stamps = torch.zeros((n * plan[1], pa.SLOTS), dtype=torch.int64, device="cuda")
        probed = [o for o in _ext.load().ppo_fwd_probe(*args, stamps, 0) if o.numel()]
        assert len(probed) == len(production) == 7
        for a, b in zip(probed, production):
            assert torch.equal(a, b)
    if path == "cluster" and plan[1] <= 8:  # the alternatives keep the results, bit for bit
        for alternative in (pa.PUSH_EXCHANGE, pa.RELAXED_ARRIVE):
            other = [o for o in _probe(t, path, None, alternative) if o.numel()]
            for a, b in zip(other, production):
                assert torch.equal(a, b), alternative
    s = pa.check_stamps(stamps.cpu().numpy())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert (s[:, pa.SM] >= 0).all() and (s[:, pa.SM] < sms).all()
    if plan[1] == 1:  # no cluster: the barrier and merge stamps are taken back to back
        assert ((s[:, pa.SYNCED] - s[:, pa.SWEEP1]) < (s[:, pa.EXIT] - s[:, pa.START])).all()
    summary = pa.summarize(s)
    assert 0.5 < summary["cycles_per_ns"] < 3.0  # a GPU's SM clock, in GHz
    assert summary["sms"].ctas_per_sm > 0


@on_gpu
def test_every_skipped_stage_runs_and_stamps():
    v, dtype, n = 151936, torch.bfloat16, 16
    t = _inputs(n, v, dtype)
    for path in ("cluster", "global"):
        plan = _plan(path, v, dtype)
        if plan[0] == "none":
            continue
        for _, skip, cluster_only in probe_ppo.VARIANTS:
            if cluster_only and path != "cluster":
                continue
            stamps = torch.zeros((n * plan[1], pa.SLOTS), dtype=torch.int64, device="cuda")
            _probe(t, path, stamps, skip)
            torch.cuda.synchronize()
            pa.check_stamps(stamps.cpu().numpy())


def _probe_refusals():
    t = _inputs(4, 4097, torch.bfloat16)
    with pytest.raises(RuntimeError, match="skip must be a combination of the ProbeSkip bits 1, 2, 4, 8, 16 and 32"):
        _probe(t, "global", None, 64)
    with pytest.raises(RuntimeError, match=r"skip bit 8 \(copy in sweep 2\) exists on the 'cluster' path only"):
        _probe(t, "global", None, pa.COPY_SWEEP2)
    with pytest.raises(RuntimeError, match=r"skip bit 16 \(push exchange\) exists on the 'cluster' path"):
        _probe(t, "global", None, pa.PUSH_EXCHANGE)
    with pytest.raises(RuntimeError, match=r"skip bit 32 \(relaxed closing arrive\) exists on the 'cluster' path"):
        _probe(t, "global", None, pa.RELAXED_ARRIVE)
    if _plan("cluster", 151936, torch.bfloat16)[0] != "none":
        big = _inputs(2, 151936, torch.bfloat16)
        with pytest.raises(RuntimeError, match="skip bits 1 .* and 16 .* exclude each other"):
            _probe(big, "cluster", None, pa.PUSH_EXCHANGE | pa.NO_EXCHANGE)
        with pytest.raises(RuntimeError, match=r"skip bit 32 \(relaxed closing arrive\) excludes bits 1"):
            _probe(big, "cluster", None, pa.RELAXED_ARRIVE | pa.PUSH_EXCHANGE)
    with pytest.raises(RuntimeError, match=r"stamps must be a contiguous int64 tensor of \[4, 10\]"):
        _probe(t, "global", torch.zeros((3, pa.SLOTS), dtype=torch.int64, device="cuda"), 0)
    if _plan("pipe", 151936, torch.bfloat16)[0] != "none":
        big = _inputs(2, 151936, torch.bfloat16)
        with pytest.raises(RuntimeError, match="the 'pipe' path has no probe"):
            _probe(big, "pipe", None, 0)


@on_gpu
def test_the_probe_refuses_what_it_cannot_do():
    # in a child process: on the H200 (run 6) the binding's C++ check ended the process instead of raising
    run_in_child(_probe_refusals)


@on_gpu
def test_the_probe_script_end_to_end(tmp_path):
    paths = [p for p in ("global", "shared") if _plan(p, 4097, torch.bfloat16)[0] != "none"]
    assert probe_ppo.main(["--n", "64", "--v", "4097", "--paths", ",".join(paths), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "probe.md").read_text()
    assert text.count("bit-identical to the production kernel: **yes**") == len(paths)
    for p in paths:
        assert (tmp_path / f"probe_{p}.npz").exists() and (tmp_path / f"probe_{p}.png").exists()
