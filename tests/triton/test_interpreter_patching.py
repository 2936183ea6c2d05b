"""tests/interpreter_patching.py: under Triton's interpreter a launch patches ``triton.language`` once, its nested
``@triton.jit`` helpers compute as before, and the language is restored after the launch as Triton does it."""

import pytest
import torch

from rlhf_kernels.ops._dispatch import triton_importable, triton_interpreting

pytestmark = pytest.mark.skipif(not (triton_importable() and triton_interpreting()),
                                reason="the wrapper is for Triton's CPU interpreter (TRITON_INTERPRET=1)")

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _doubled_exp(x):
        return tl.exp(x) * 2.0

    @triton.jit
    def _nested_helpers_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = offsets < n
        x = tl.load(x_ptr + offsets, mask=keep, other=0.0)
        tl.store(out_ptr + offsets, _doubled_exp(_doubled_exp(x) - 3.0), mask=keep)


def test_a_launch_patches_the_language_once_and_its_helpers_compute_as_before(monkeypatch):
    from triton.runtime import interpreter

    from tests.interpreter_patching import patch_the_language_once_per_launch

    installed = interpreter._patch_lang
    assert getattr(installed, "_once_per_launch", False), "tests/conftest.py installs the wrapper"
    assert patch_the_language_once_per_launch() and interpreter._patch_lang is installed, "a second call wraps nothing"
    # _patch_lang_core: called by Triton's _patch_lang once per language module it patches
    calls = []
    core = interpreter._patch_lang_core
    monkeypatch.setattr(interpreter, "_patch_lang_core", lambda *args: calls.append(1) or core(*args))

    x = torch.linspace(-2.0, 1.5, 37)
    out = torch.full_like(x, float("nan"))
    for launch in range(2):
        _nested_helpers_kernel[(3,)](x, out, x.numel(), BLOCK=16)  # 3 programs, 2 helper calls each
        assert len(calls) == launch + 1, "one patch per launch, none per helper call"
    x64 = x.double()
    torch.testing.assert_close(out.double(), 2.0 * torch.exp(2.0 * torch.exp(x64) - 3.0), rtol=1e-6, atol=0.0)

    if hasattr(interpreter, "_LangPatchScope"):  # Triton 3.3+: the launch restores the compiler's builtins
        assert tl.core.is_builtin(tl.exp) and tl.core.is_builtin(tl.core.tensor.__add__)
