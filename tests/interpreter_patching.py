"""Triton's CPU interpreter, made to patch ``triton.language`` once per kernel launch instead of once per call.

Under ``TRITON_INTERPRET=1`` a launch (``GridExecutor.__call__``) swaps ``triton.language``'s builtins for
interpreted versions (``_patch_lang``), then runs the kernel once per program id. Each call of a nested
``@triton.jit`` helper (``InterpretedFunction.__call__``: the row sweeps of ``triton/_common.py``, several per
program) calls ``_patch_lang`` again: an ``inspect.getmembers`` walk over ``tl``, ``tl.tensor`` and ``tl.math`` that
finds every builtin already swapped, then re-sets the same closures. Profiled on one of the Triton PPO tests (Triton
3.8): 5172 calls, about half of the interpreter's time, for no change.

This wrapper skips a nested call when the launch has already patched every language module the helper's globals
see (``tl`` and/or ``tl.core``, the modules ``_patch_lang`` looks for); the launch's own call, and a helper that
sees a module the kernel did not, patch as before. What the kernels compute is untouched: the same interpreted
builtins are in place either way. Written against Triton 3.2 (patches kept after the launch) and 3.3-3.8 (patches
in a scope the launch restores); if a Triton lacks the pieces it relies on, nothing is changed.
"""

from __future__ import annotations

import functools


class _NothingToRestore:
    """What a skipped call returns where Triton expects a patch scope (3.3+: its ``restore()`` is called)."""

    def restore(self) -> None:
        pass


def patch_the_language_once_per_launch() -> bool:
    """Install the wrapper (idempotent); True when installed or already in place."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    grid_executor = getattr(interpreter, "GridExecutor", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if grid_executor is None or patch_lang is None or not callable(getattr(grid_executor, "__call__", None)):
        return False
    if getattr(patch_lang, "_once_per_launch", False):
        return True

    launch = {"depth": 0, "patched": set()}  # the running launch's depth and the ids of the modules it patched

    def language_modules(fn) -> set[int]:
        return {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}

    @functools.wraps(patch_lang)
    def patch_lang_once(fn):
        modules = language_modules(fn)
        if launch["depth"] and modules and modules <= launch["patched"]:
            return _NothingToRestore()
        scope = patch_lang(fn)
        if launch["depth"]:
            launch["patched"] |= modules
        return scope

    launch_call = grid_executor.__call__

    @functools.wraps(launch_call)
    def counted_launch(self, *args, **kwargs):
        launch["depth"] += 1
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            launch["depth"] -= 1
            if not launch["depth"]:
                launch["patched"].clear()

    patch_lang_once._once_per_launch = True
    interpreter._patch_lang = patch_lang_once
    grid_executor.__call__ = counted_launch
    return True
