"""The build and import contract of DESIGN.md §3: extension contents, CUDA_HOME discovery, no-extension fallback."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.build_expectations import cuda_kernels_expected

ROOT = Path(__file__).resolve().parents[1]


def _load_setup_module():
    spec = importlib.util.spec_from_file_location("rlhf_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # guarded by __main__: builds nothing
    return module


@pytest.mark.skipif(os.environ.get("RLHF_KERNELS_REQUIRE_EXTENSION") != "1", reason="only where the build is required")
def test_extension_is_built_with_everything_this_machine_can_build():
    from rlhf_kernels import _ext

    assert _ext.available(), _ext.load_error()
    if cuda_kernels_expected():
        # nvcc present: the CUDA kernels must have compiled (make test sets RLHF_KERNELS_FORCE_CUDA=1)
        assert _ext.has_cuda_kernels()
        assert "8.0" in _ext.cuda_arch_list() and "9.0" in _ext.cuda_arch_list()
    import torch

    assert hasattr(torch.ops.rlhf_kernels_C, "logprobs_fwd") and hasattr(torch.ops.rlhf_kernels_C, "gae")


def test_cuda_home_is_found_behind_a_wrapper_script(tmp_path):
    setup_module = _load_setup_module()
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    assert setup_module._toolkit_root_from_nvcc(str(wrapper)) == str(toolkit)
    # a symlink into the toolkit works too
    (toolkit / "bin").mkdir()
    (toolkit / "bin" / "nvcc").write_text("")
    link = tmp_path / "nvcc-link"
    link.symlink_to(toolkit / "bin" / "nvcc")
    assert setup_module._toolkit_root_from_nvcc(str(link)) == str(toolkit)
    assert setup_module._toolkit_root_from_nvcc(str(tmp_path / "bin" / "missing")) is None


@pytest.mark.parametrize("cflags, expected", [(None, ["-g0"]), ("-O2 -march=native", ["-g0"]), ("-O1 -g", []),
                                              ("-fsanitize=address,undefined -g", []), ("-ggdb3", [])])
def test_debug_information_only_when_cflags_ask_for_it(monkeypatch, cflags, expected):
    """Python's own -g doubled each C++ file's compile; a builder's CFLAGS with -g (make asan) keep it."""
    setup_module = _load_setup_module()
    if cflags is None:
        monkeypatch.delenv("CFLAGS", raising=False)
    else:
        monkeypatch.setenv("CFLAGS", cflags)
    assert setup_module.debug_info_flags() == expected


def test_compiles_start_with_the_cuda_files_largest_first():
    """setuptools sorts the sources by name, which left csrc/cuda/ppo.cu, the longest compile, to run last alone."""
    setup_module = _load_setup_module()
    by_name = ["csrc/bindings.cpp", "csrc/cpu/kl.cpp", "csrc/cuda/kl.cu", "csrc/cuda/ppo.cu"]
    assert setup_module.longest_compiles_first(by_name) == ["csrc/cuda/ppo.cu", "csrc/cuda/kl.cu", "csrc/bindings.cpp",
                                                             "csrc/cpu/kl.cpp"]


def test_package_works_without_the_extension_and_says_so_once():
    script = textwrap.dedent(
        """
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "rlhf_kernels._C":
                    raise ImportError("blocked by the test")
        sys.meta_path.insert(0, Block())
        import torch, rlhf_kernels as rk
        from rlhf_kernels import reference as R
        logits, targets = torch.randn(3, 50), torch.randint(0, 50, (3,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = rk.logprobs(logits, targets)
            b = rk.logprobs(logits, targets)
            rewards, values, mask = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4)
            adv, _ = rk.gae(rewards, values, mask)
        assert torch.allclose(a, R.logprobs(logits, targets), atol=1e-6)
        assert torch.allclose(adv, R.gae(rewards, values, mask)[0])
        messages = [str(w.message) for w in caught if "compiled extension not available" in str(w.message)]
        assert len(messages) == 1, messages
        report = rk.info(print_report=False)
        assert report["extension"]["loaded"] is False and "blocked by the test" in report["extension"]["error"]
        assert report["backends"]["cpu (cpu)"].startswith("compiled extension missing")
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_cli_info_lists_backends():
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_kernels.cli", "info"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for word in ("torch", "backends:", "cpu (cpu)", "extension", "fused-linear ops", "RLHF_KERNELS_LINEAR_CHUNK_BY"):
        assert word in result.stdout
