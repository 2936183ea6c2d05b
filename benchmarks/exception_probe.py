"""Which C++ errors reach Python as exceptions, and which end the process: one child process per case.

Why: on the lent H200 (torch 2.11, the extension built there) a ``TORCH_CHECK`` of this extension ended the process
with SIGSEGV instead of raising ``RuntimeError``, twice (run 5: the ``ppo_fwd`` op's path refusal; run 6: the
probe binding's argument check, which took the whole ``pytest -m gpu`` run down with it). Here, on CI and with
torch 2.6 the same checks raise. Each case below throws from a different place (PyTorch's own C++, this
extension's CPU op through the dispatcher, its pybind11 functions (a plain C++ throw, which needs only the unwinder,
and a ``TORCH_CHECK``, whose ``c10::Error`` also walks the stack for a backtrace), its CUDA op), so the table says
where the exception path breaks::

    python -m benchmarks.exception_probe            # a markdown table; exit status 1 when a case crashed

The GPU suite's setup stage writes it to ``exceptions.md``; ``tests/cuda/test_cuda_gpu.py`` asserts on it.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import textwrap
from typing import Dict, List, NamedTuple, Optional

_PRELUDE = """
import torch
from rlhf_kernels import _ext
_ext.load()
"""

# name -> (needs a GPU and the CUDA kernels, code that must raise RuntimeError, a phrase its message holds)
CASES: Dict[str, tuple] = {
    "torch's own C++ check": (False, "torch.empty(2).view(3)", "invalid for input of size"),
    "extension pybind11, plain C++ throw": (False, "_ext.load().throw_for_diagnosis(0)", "plain C++ exception"),
    "extension pybind11, TORCH_CHECK": (False, "_ext.load().throw_for_diagnosis(1)", "throw_for_diagnosis"),
    "extension CPU op (dispatcher)": (
        False,
        "torch.ops.rlhf_kernels_C.logprobs_fwd(torch.zeros(2, 3, 8).transpose(1, 2), "
        "torch.zeros(2, 8, dtype=torch.long), 1.0, -100)",
        "",
    ),
    "extension pybind11 function": (
        True,
        "_ext.load().ppo_fwd_probe(torch.zeros(1, 2, 7), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), "
        "torch.zeros(1, 2), None, None, 1.0, -100, 0.0, 3, 0.0, 0.2, 0.2, None, 0, None, 0)",
        "needs CUDA tensors",
    ),
    "extension CUDA op (dispatcher)": (
        True,
        "rows = torch.zeros(1, 2, device='cuda')\n"
        "torch.ops.rlhf_kernels_C.ppo_fwd(torch.zeros(1, 2, 151936, dtype=torch.bfloat16, device='cuda'), "
        "torch.zeros(1, 2, dtype=torch.long, device='cuda'), rows, rows, None, rows, 1.0, -100, 0.0, 3, 0.0, 0.2, "
        "0.2, None, 2, None)",
        "cannot run",
    ),
    # H200 run 7: the path refusal above crashed, the overlap check below raised, both in the same op and after
    # the same device guard and plan. These three split the difference: a check before the guard, one after it
    # whose message formats a dtype and sizes (as the refusal's does), and the refusal's own throw
    # (bindings.cpp's ppo_plan_for) reached through pybind11 instead of the dispatcher.
    "extension CUDA op, check before the device guard": (
        True,
        "rows = torch.zeros(1, 2, device='cuda')\n"
        "torch.ops.rlhf_kernels_C.ppo_fwd(torch.zeros(1, 2, 4097, dtype=torch.bfloat16, device='cuda'), "
        "torch.zeros(1, 2, dtype=torch.long, device='cuda'), rows, rows, None, rows, 1.0, -100, 0.0, 4, 0.0, 0.2, "
        "0.2, None, 0, None)",
        "kl_estimator must be 1, 2 or 3",
    ),
    "extension CUDA op, check after the guard, dtype in its message": (
        True,
        "rows = torch.zeros(1, 2, device='cuda')\n"
        "torch.ops.rlhf_kernels_C.ppo_fwd(torch.zeros(1, 2, 4097, dtype=torch.bfloat16, device='cuda'), "
        "torch.zeros(1, 2, dtype=torch.long, device='cuda'), rows, rows, None, rows, 1.0, -100, 0.0, 3, 0.0, 0.2, "
        "0.2, None, 0, torch.zeros(1, 2, 4096, dtype=torch.bfloat16, device='cuda'))",
        "must be shaped like",
    ),
    "extension pybind11 function, the path refusal": (
        True,
        "rows = torch.zeros(1, 2, device='cuda')\n"
        "_ext.load().ppo_fwd_probe(torch.zeros(1, 2, 151936, dtype=torch.bfloat16, device='cuda'), "
        "torch.zeros(1, 2, dtype=torch.long, device='cuda'), rows, rows, None, rows, 1.0, -100, 0.0, 3, 0.0, 0.2, "
        "0.2, None, 2, None, 0)",
        "cannot run",
    ),
    "extension CUDA op, overlap check": (
        True,
        "rows, w = torch.zeros(1, 2, device='cuda'), torch.ones(1, 2, device='cuda')\n"
        "big = torch.zeros(1, 3, 4097, dtype=torch.bfloat16, device='cuda')\n"
        "# grad_out overlapping the logits other than being them: rows 1-2 of a buffer whose rows 0-1 they are\n"
        "torch.ops.rlhf_kernels_C.ppo_fwd(big[:, :2], torch.zeros(1, 2, dtype=torch.long, device='cuda'), rows, "
        "rows, None, w, 1.0, -100, 0.0, 3, 0.0, 0.2, 0.2, None, 0, big[:, 1:])",
        "may overlap logits only",
    ),
}


class Outcome(NamedTuple):
    case: str
    status: str  # "raised", "no error", "wrong error", "crashed (SIGSEGV)", "skipped: ..."
    detail: str

    @property
    def crashed(self) -> bool:
        return self.status.startswith("crashed") or self.status.startswith("exit")


def _child_code(code: str) -> str:
    body = textwrap.indent(code, "    ")
    return (_PRELUDE + "try:\n" + body + "\n    print('OUTCOME no error')\n"
            "except RuntimeError as e:\n    print('OUTCOME raised', str(e).splitlines()[0][:200] if str(e) else '')\n"
            "except Exception as e:\n    print('OUTCOME wrong error', type(e).__name__, str(e)[:200])\n")


def run_case(name: str, timeout: float = 180.0, env: Optional[dict] = None) -> Outcome:
    """Runs one case in a fresh interpreter (``python -X faulthandler``) and says how it ended."""
    needs_gpu, code, phrase = CASES[name]
    if needs_gpu:
        import torch

        from rlhf_kernels import _ext

        if not _ext.has_cuda_kernels():
            return Outcome(name, "skipped: extension built without CUDA kernels", "")
        if "cuda" in code and not torch.cuda.is_available():
            return Outcome(name, "skipped: no CUDA device", "")
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _child_code(code)], capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("OUTCOME ")]
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = str(-proc.returncode)
        return Outcome(name, f"crashed ({sig})", proc.stderr.strip()[-1500:])
    if proc.returncode != 0 or not lines:
        return Outcome(name, f"exit {proc.returncode}", (proc.stdout + proc.stderr).strip()[-1500:])
    last = lines[-1][len("OUTCOME "):]
    for status in ("no error", "raised", "wrong error"):
        if last.startswith(status):
            detail = last[len(status):].strip()
            break
    if status == "raised" and phrase not in detail:
        status = "wrong error"
    return Outcome(name, status, detail)


def environment() -> List[str]:
    """The toolchain facts that decide C++ exception handling across shared libraries."""
    import torch

    lines = [f"python {platform.python_version()}, torch {torch.__version__}"]
    lines.append(f"c++: {next(iter(_output_lines(['c++', '--version'])), 'not found')}")
    config = [ln.strip() for ln in torch.__config__.show().splitlines()
              if any(k in ln for k in ("GCC", "clang", "C++ Version", "CXX_COMPILER", "CXX11_ABI", "CXX_FLAGS"))]
    lines += [f"torch built with: {ln[:300]}" for ln in config]
    lines.append(f"torch._C._GLIBCXX_USE_CXX11_ABI = {torch._C._GLIBCXX_USE_CXX11_ABI}")
    lines.append(f"ld: {next(iter(_output_lines(['ld', '--version'])), 'not found')}")
    # an unwinder that cannot find a frame's FDE crashes instead of raising: the extension's unwind sections
    try:
        from rlhf_kernels import _C

        sections = "; ".join(ln for ln in _output_lines(["readelf", "-SW", _C.__file__]) if ".eh_frame" in ln)
        lines.append(f"extension {os.path.basename(_C.__file__)} unwind sections: {sections or 'none found'}")
    except ImportError as e:
        lines.append(f"extension not importable: {e}")
    return lines


def _output_lines(cmd: List[str]) -> List[str]:
    """``cmd``'s output lines, blanks collapsed; none when it cannot run."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [" ".join(ln.split()) for ln in out]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    outcomes = [run_case(name) for name in CASES]
    print("# C++ errors: raised in Python or a crash\n")
    for line in environment():
        print(f"- {line}")
    print("\n| case | outcome | detail |\n|---|---|---|")
    for o in outcomes:
        print(f"| {o.case} | {o.status} | {o.detail.splitlines()[0][:160] if o.detail else ''} |")
    for o in outcomes:
        if o.crashed:
            print(f"\n## {o.case}: {o.status}\n\n```\n{o.detail}\n```")
    return 1 if any(o.crashed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
