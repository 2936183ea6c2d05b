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
if os.environ.get("TRITON_INTERPRET") == "1":
    # about half of the interpreter's time went to re-patching triton.language on every nested @triton.jit call
    from tests.interpreter_patching import patch_the_language_once_per_launch

    patch_the_language_once_per_launch()


def pytest_report_header(config):
    """A Triton / numpy pair whose interpreter cannot run is said once, before the interpreted tests fail one by one
    (those calling a kernel directly with the interpreter's own TypeError)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from rlhf_kernels.ops._dispatch import triton_interpreter_conflict

        conflict = triton_interpreter_conflict()
        if conflict:
            return f"WARNING: {conflict}; the tests of the interpreted Triton kernels will fail"
    return None


def pytest_runtest_logreport(report):
    """With RLHF_KERNELS_TEST_FAILURES=<file>, each failure is appended there as it happens (name and traceback):
    pytest prints its summary only at the end, and a test that ends the process (H200 run 6) took every earlier
    failure's report with it. The GPU suite sets it (pytest_gpu_failures.log)."""
    path = os.environ.get("RLHF_KERNELS_TEST_FAILURES")
    # under pytest-xdist the controller sees every worker's reports (and outlives a worker a test kills): it alone
    # writes, once per failure (H200 run 7's log held each one twice)
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n\n")


# --oldest-versions runs every FUZZ_SHARE-th seed of the tests marked fuzz
FUZZ_SHARE = 4


def pytest_addoption(parser):
    parser.addoption(
        "--oldest-versions", action="store_true",
        help="the run on the oldest supported torch / Triton / transformers (make test-oldest): what can differ "
             "between versions, once; leaves out the tests marked version_independent, runs every "
             f"{FUZZ_SHARE}th seed of those marked fuzz, and the sm_90 compile without its autotune-candidate sweep "
             "(make test runs everything on the newest versions)")


def _left_to_the_newest_versions(item) -> bool:
    """Whether ``--oldest-versions`` leaves ``item`` to ``make test``: a version-independent test, or a fuzz seed
    not in the share kept (the seeds draw their op family at random, so the kept ones still reach every family)."""
    if item.get_closest_marker("version_independent"):
        return True
    callspec = getattr(item, "callspec", None)
    seed = callspec.params.get("seed") if callspec is not None else None
    return bool(item.get_closest_marker("fuzz")) and isinstance(seed, int) and seed % FUZZ_SHARE != 0


def pytest_collection_modifyitems(config, items):
    """With ``--oldest-versions``, the selection above. Then the tests marked ``slow`` (the sm_90 compile of every
    kernel, the interpreted Triton fuzz, ...) run first, the rest in their order. Under pytest-xdist a long test near
    the end of the collection runs alone on one worker while the others have finished (the compile: ~200 s of a
    15-minute ``make test``); started first, it runs beside everything else. The sort is stable: within each group
    the collection's order holds."""
    if config.getoption("--oldest-versions"):
        left = {item for item in items if _left_to_the_newest_versions(item)}
        if left:
            config.hook.pytest_deselected(items=list(left))
            items[:] = [item for item in items if item not in left]
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _share_the_cores_between_xdist_workers():
    """Under pytest-xdist (``make test`` runs a worker per core, up to 4) each worker is a process with torch's
    default of one intra-op thread per core: 2 workers on 2 cores then run 4 threads, and the OpenMP threads that
    spin between parallel regions take the other worker's core (measured on 2 cores: 1668 s of CPU for the suite
    against 1181 s in one process; 1454 s with one thread per worker). Each worker gets its share of the cores;
    tests that vary the thread count set it themselves."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores_between_xdist_workers()
