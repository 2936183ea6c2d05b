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


@pytest.mark.skipif(not _can_aot_compile(), reason="needs triton with the bundled NVIDIA ptxas")
def test_all_kernels_compile_for_sm90(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    script = os.path.join(os.path.dirname(__file__), "aot_compile_kernels.py")
    proc = subprocess.run([sys.executable, script, "90"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, (proc.stdout[-2000:] + proc.stderr[-4000:])
