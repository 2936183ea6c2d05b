"""The command line of the random-configuration tests: a range of seeds run on one backend, failures named by
seed (``tests/ops/test_random_configurations.py``, ``tests/ops/test_random_small_ops.py``)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable

import torch


def seed_parser(description: str, *, backend: str, cases: int) -> argparse.ArgumentParser:
    """``--backend``, ``--device``, ``--first`` (the first seed) and ``--cases`` (how many seeds)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backend", default=backend, help="cpu | torch | triton | cuda")
    parser.add_argument("--device", default=None, help="default: cuda for triton / cuda when available, else cpu")
    parser.add_argument("--first", type=int, default=0, help="first seed")
    parser.add_argument("--cases", type=int, default=cases)
    return parser


def device_for(args: argparse.Namespace) -> torch.device:
    gpu = args.backend in ("triton", "cuda") and torch.cuda.is_available()
    return torch.device(args.device or ("cuda" if gpu else "cpu"))


def failures_of(check: Callable[[int], object], seeds: Iterable[int], label: str = "") -> int:
    """Runs ``check(seed)`` for each seed; prints each failure (an error raised by an op is one too) with its seed
    to stderr, and returns how many failed."""
    failures = 0
    for seed in seeds:
        try:
            check(seed)
        except Exception as e:
            failures += 1
            print(f"{label}seed {seed}: {type(e).__name__}: {e}", file=sys.stderr)
    return failures
