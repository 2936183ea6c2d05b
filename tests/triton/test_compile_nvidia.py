"""The kernels compile for sm_90 with the real Triton compiler (not the interpreter), no GPU needed."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _can_aot_compile() -> bool:
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return False
    ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    return os.path.exists(ptxas)


@pytest.mark.slow
@pytest.mark.skipif(not _can_aot_compile(), reason="needs triton with the bundled NVIDIA ptxas")
def test_all_kernels_compile_for_sm90(tmp_path, pytestconfig):
    """Every kernel compiles; on the newest Triton also every forward autotune candidate, checked for spills (the
    oldest Triton, ``--oldest-versions``, compiles each kernel's variants only: half the compiles)."""
    sweep = ["--no-candidate-sweep"] if pytestconfig.getoption("--oldest-versions") else []
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    script = os.path.join(os.path.dirname(__file__), "aot_compile_kernels.py")
    # two halves of the compiles in two processes (~2x on CI's 2 cores: one process took over 300 s on a slow one)
    shards = 2
    procs = [subprocess.Popen([sys.executable, script, "90", f"{i}/{shards}", *sweep], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(shards)]
    try:
        outputs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and "ALL OK" in out, f"shard {i}: " + out[-2000:] + err[-4000:]
    counts = {out.rsplit("ALL OK (", 1)[1].split(" ", 1)[0] for out, _ in outputs}
    assert len(counts) == 1, f"the shards saw different compile lists: {counts}"
