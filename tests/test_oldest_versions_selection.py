"""``pytest --oldest-versions`` (make test-oldest; tests/conftest.py): the version-independent tests left out, every
4th seed of the fuzz tests kept, everything else collected as without it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.child_process import child_pytest_environment

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/ops/test_random_small_ops.py", "tests/cuda/test_token_terms_emulation.py"]


def _collected(*options: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *options, *FILES], cwd=ROOT, env=child_pytest_environment(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def _seed(node: str) -> int:
    """The seed in a fuzz test's id (``[12]``, ``[12-gae]``: its only numeric part)."""
    (seed,) = [int(part) for part in re.sub(r".*\[|\]$", "", node).split("-") if part.isdigit()]
    return seed


def test_the_oldest_versions_run_keeps_a_quarter_of_the_fuzz_and_no_version_independent_test():
    everything, oldest = _collected(), _collected("--oldest-versions")
    emulation = [n for n in everything if "test_token_terms_emulation" in n]
    fuzz = [n for n in everything if "test_random_small_ops" in n and "_random_" in n.split("::")[1]]
    assert emulation and len(fuzz) >= 400, (len(emulation), len(fuzz))
    kept = [n for n in fuzz if _seed(n) % 4 == 0]
    assert set(oldest) == (set(everything) - set(emulation) - set(fuzz)) | set(kept)
    assert 0.2 < len(kept) / len(fuzz) < 0.3
