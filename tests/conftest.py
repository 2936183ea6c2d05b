"""Session-wide test set-up.

Without a CUDA device the Triton kernels run on the CPU interpreter. Triton
decides interpreted-or-compiled when a ``@triton.jit`` function is created,
i.e. when its module is first imported — and any test module (benchmarks,
integrations) may import the kernel modules at collection. So the switch is
set here, in the root conftest, before anything else is collected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_runtest_logreport(report):
    """With RLHF_KERNELS_TEST_FAILURES=<file>, each failure is appended there as it happens (name and traceback):
    pytest prints its summary only at the end, and a test that ends the process (H200 run 6) took every earlier
    failure's report with it. The GPU suite sets it (pytest_gpu_failures.log)."""
    path = os.environ.get("RLHF_KERNELS_TEST_FAILURES")
    if path and report.failed:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n\n")
