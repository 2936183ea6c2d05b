"""Every ``RLHF_KERNELS_*`` environment variable in one table, with its values, default and effect.

Runtime settings are read by the ops at each call (so a test or a script may change them between calls); each
has a reader next to the code it steers that refuses a bad value with a ``ValueError`` naming the variable, and
:func:`check` runs them all (``rlhf-kernels info`` shows the result). Build settings are read by ``setup.py``,
tool settings by the tests and benchmarks. ``tests/test_settings.py`` keeps this table, the code and the README
in step: a variable read anywhere must be listed here and documented.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional


@dataclass(frozen=True)
class Setting:
    """One environment variable: ``values`` and ``default`` as a user types them, ``effect`` in one sentence."""

    name: str
    values: str
    default: str
    effect: str
    reader: Optional[Callable[[], object]] = None  # runtime settings: parses the current value, raises on a bad one


def _reader(module: str, function: str, *args) -> Callable[[], object]:
    """``rlhf_kernels.<module>.<function>(*args)``, imported when called: the ops modules read their settings at
    each call, and this table must not import them (nor triton) when the package is imported."""

    def read():
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(*args)

    return read


def _triton_block():
    from .ops._dispatch import triton_importable

    if not triton_importable():
        return None  # read only by the Triton kernels
    from .triton import _common

    return _common.block_v_override()


RUNTIME: tuple[Setting, ...] = (
    Setting("RLHF_KERNELS_BACKEND", "auto | triton | cuda | cpu | torch", "auto",
            "the backend every op prefers (it falls back to the automatic choice where that one cannot run)",
            _reader("ops._dispatch", "preferred_backend")),
    Setting("RLHF_KERNELS_VALIDATE", "1 | async | 0", "1",
            "the check that targets lie in [0, V): a host sync (on a GPU read once the op's kernel is queued), "
            "queued and reported by the next op, or off (a bad target's token then gets NaN); skipped while a CUDA "
            "graph is captured",
            _reader("ops._deferred_checks", "validation_mode")),
    Setting("RLHF_KERNELS_VIEW_GRAD", "1 | 0", "1",
            "route the gradient of a logits[:, a:a+T] view straight into its base instead of autograd's zero-fill "
            "and copy",
            _reader("ops._checks", "view_grad_enabled")),
    Setting("RLHF_KERNELS_LINEAR_CHUNK_BY", "auto | rows | vocab", "auto",
            "how the fused-linear ops walk the LM head: row chunks, or vocabulary slabs (no [V, H] float32 "
            "accumulator)",
            _reader("ops._linear_layout", "_chunk_by_setting", None)),
    Setting("RLHF_KERNELS_LINEAR_GRAD", "auto | forward | recompute", "auto",
            "whether the fused-linear losses compute their gradient in the forward or recompute the logits in "
            "the backward",
            _reader("ops._linear_fused", "linear_grad_path")),
    Setting("RLHF_KERNELS_CUDA_PPO", "auto | shared | cluster | global | l2 | pipe | two-pass", "auto",
            "where the CUDA ppo_loss forward-with-gradient keeps a row between its two sweeps",
            _reader("ops.ppo", "cuda_ppo_path")),
    Setting("RLHF_KERNELS_TRITON_PPO", "fused | two-pass", "fused",
            "whether the Triton ppo_loss writes its gradient in the forward (one kernel) or in a backward kernel",
            _reader("ops.ppo", "triton_ppo_path")),
    Setting("RLHF_KERNELS_CUDA_PREFETCH", "1 | 0 | bulk", "1",
            "how the fused CUDA PPO path fills its shared-memory slice: cp.async, the register sweep, or the TMA's "
            "bulk copies (sm_90; bit-identical results)",
            _reader("ops.ppo", "cuda_ppo_prefetch")),
    Setting("RLHF_KERNELS_CUDA_CLUSTER", "2 | 4 | 8", "the smallest cluster whose slices fit",
            "the smallest thread-block cluster the fused CUDA PPO path splits a row over",
            _reader("ops.ppo", "cuda_ppo_cluster")),
    Setting("RLHF_KERNELS_CUDA_FWD_THREADS", "32 | 64 | 128 | 256 | 512", "each kernel's own (H200 sweep)",
            "cap on the CTA size of the CUDA forward kernels (a tuning knob)",
            _reader("ops._dispatch", "cuda_forward_threads")),
    Setting("RLHF_KERNELS_TRITON_BLOCK_V", "a whole number of columns", "autotuned (64 under the interpreter)",
            "a fixed vocabulary block for every Triton kernel (a tuning and testing knob)", _triton_block),
)

BUILD: tuple[Setting, ...] = (
    Setting("RLHF_KERNELS_FORCE_CUDA", "1", "0", "fail the build if the CUDA kernels cannot be compiled"),
    Setting("RLHF_KERNELS_SKIP_CUDA", "1", "0", "build the C++ CPU kernels only"),
    Setting("RLHF_KERNELS_NO_EXTENSION", "1", "0", "install without compiled kernels (the PyTorch reference backend)"),
    Setting("RLHF_KERNELS_CPU_ARCH", "native | avx2 | generic", "native",
            "the CPU instruction set the C++ kernels are compiled for"),
)

TOOLS: tuple[Setting, ...] = (
    Setting("RLHF_KERNELS_REQUIRE_EXTENSION", "1", "0",
            "make the tests fail, instead of skip, where the compiled extension is missing (make test sets it)"),
    Setting("RLHF_KERNELS_COMMIT", "a git hash", "git's HEAD",
            "the commit benchmark rows are stamped with where the checkout has no git metadata (the GPU machine)"),
    Setting("RLHF_KERNELS_TEST_FAILURES", "a file path", "unset",
            "pytest appends each failure's report there as it happens, so a test that ends the process cannot take "
            "the earlier reports with it (the GPU suite sets it)"),
)

# Preprocessor macros of the extension's build, not environment variables (csrc/build_config.h).
BUILD_MACROS = ("RLHF_KERNELS_WITH_CUDA", "RLHF_KERNELS_CUDA_ARCHS", "RLHF_KERNELS_CPU_CAPABILITY")

ALL: tuple[Setting, ...] = RUNTIME + BUILD + TOOLS


def check() -> Dict[str, tuple[Optional[str], Optional[str]]]:
    """``name -> (raw value or None when unset, problem or None)`` for every runtime setting; never raises."""
    report: Dict[str, tuple[Optional[str], Optional[str]]] = {}
    for setting in RUNTIME:
        raw = os.environ.get(setting.name)
        problem = None
        try:
            setting.reader()
        except ValueError as exc:
            problem = str(exc)
        report[setting.name] = (raw, problem)
    return report


README_START = "<!-- settings:start -->"
README_END = "<!-- settings:end -->"


def markdown() -> str:
    """The settings as a markdown table (the README's, between ``README_START`` and ``README_END``)."""
    lines = ["| variable | values | default | effect |", "|---|---|---|---|"]
    for kind, group in (("", RUNTIME), ("build: ", BUILD), ("tests / benchmarks: ", TOOLS)):
        for s in group:
            values = ", ".join(f"`{v}`" if " " not in v else v for v in s.values.split(" | "))
            lines.append(f"| `{s.name}` | {values} | {s.default} | {kind}{s.effect} |")
    return "\n".join(lines) + "\n"


def update_readme(path: str) -> bool:
    """Rewrites the table between the markers of ``path``; returns whether it changed."""
    with open(path) as fh:
        text = fh.read()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    new = text[:start] + "\n" + markdown() + text[end:]
    if new != text:
        with open(path, "w") as fh:
            fh.write(new)
    return new != text

