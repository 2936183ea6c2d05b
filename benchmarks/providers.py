"""What each op is measured against, and how a provider says it cannot run.

An op family (``bench_<family>.py``) describes its inputs and, per provider,
a ``build(inputs) -> fn`` whose ``fn()`` returns the differentiable outputs
as a tuple, plus a ``reason(case, device)`` that is ``None`` when the
provider can run and otherwise says why not (printed, and kept in the CSV).

Providers
    eager    the formula users write today: ``log_softmax(...).gather(...)``
             and the entropy from the full softmax, all in float32.
    compile  ``torch.compile`` of that same eager function.
    chunked  the loop TRL / verl use to bound memory: rows in chunks, each
             chunk's ``logsumexp`` / softmax computed separately (written here
             from the published formula: ``logp = z[y] - logsumexp(z)``,
             ``entropy = logsumexp(z) - Σ softmax(z)·z``).
    liger    Liger-Kernel's closest op, when installed (GPU only).
    triton / cuda / cpu
             this package, ``backend=`` forced; skipped when the backend is
             unavailable here or has no kernel for the op yet.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

OURS = ("triton", "cuda", "cpu")
COMPETITORS = ("eager", "compile", "chunked", "liger")
ALL_PROVIDERS = COMPETITORS + OURS

# Rows per chunk of the chunked loop (verl's entropy chunking uses 2048 rows; TRL loops per sequence).
CHUNK_ROWS = 1024


@dataclass(frozen=True)
class Case:
    """One op at one shape and dtype. ``B x T = N`` where the op needs a batch layout."""

    op: str
    N: int
    V: int = 0
    H: int = 0
    dtype: torch.dtype = torch.float32
    B: int = 1
    T: int = 1

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def elem(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()


@dataclass
class Provider:
    build: Callable[[Dict[str, torch.Tensor]], Callable[[], Tuple[torch.Tensor, ...]]]
    reason: Callable[[Case, torch.device], Optional[str]] = lambda case, device: None


@dataclass
class OpSpec:
    """An op of the suite."""

    name: str
    family: str  # "logits" (N x V), "linear" (N x V x H) or "scan" (B x T)
    make_inputs: Callable[[Case, torch.device, int], Dict[str, torch.Tensor]]
    grad_names: Tuple[str, ...]
    providers: Dict[str, Provider]
    bytes_moved: Callable[[Case, str], float]
    flops: Optional[Callable[[Case, str], float]] = None
    modes: Tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")
    description: str = ""
    notes: Dict[str, str] = field(default_factory=dict)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """Inputs are drawn on the device itself (a 10 GB logits tensor drawn on the host would take minutes)."""
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, g: torch.Generator, device: torch.device, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    out = torch.randn(shape, generator=g, device=device, dtype=dtype)
    return out.mul_(scale) if scale != 1.0 else out


def randint(high: int, shape, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=g, device=device)


# --------------------------------------------------------------------------- eager formulas


def eager_logprobs(logits: torch.Tensor, targets: torch.Tensor, entropy: bool):
    """``log_softmax(z).gather(y)`` and ``entropy = lse - Σ softmax(z)·z`` in float32."""
    z = logits.float()
    logp = torch.log_softmax(z, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return (logp,)
    p = torch.softmax(z, dim=-1)
    ent = torch.logsumexp(z, dim=-1) - (p * z).sum(-1)
    return logp, ent


def chunked_logprobs(logits: torch.Tensor, targets: torch.Tensor, entropy: bool, chunk: int = CHUNK_ROWS):
    """Row chunks of ``[*, V]``: per chunk ``logsumexp`` then ``z[y] - lse`` (TRL's selective_log_softmax,
    verl's chunked entropy)."""
    # [B, T, V] (often the strided view logits[:, :-1]) is walked per sequence, as TRL does, so no copy
    # of the whole tensor is made; each sequence's rows in chunks of `chunk`.
    if logits.dim() == 3:
        blocks = [(logits[b], targets[b]) for b in range(logits.shape[0])]
    else:
        blocks = [(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))]
    logps, ents = [], []
    for rows, row_targets in blocks:
        for start in range(0, rows.shape[0], chunk):
            z = rows[start : start + chunk].float()
            y = row_targets[start : start + chunk]
            lse = torch.logsumexp(z, dim=-1)
            logps.append(z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse)
            if entropy:
                p = torch.softmax(z, dim=-1)
                ents.append(lse - (p * z).sum(-1))
    logp = torch.cat(logps).reshape(targets.shape)
    if not entropy:
        return (logp,)
    return logp, torch.cat(ents).reshape(targets.shape)


_COMPILED: Dict[str, Callable] = {}
# dynamic=True: one graph per op / mode / dtype serves every N and V (RLHF batches change shape every step,
# and a static graph per shape would cost minutes of compilation per suite). --compile-static turns it off.
COMPILE_DYNAMIC: Optional[bool] = True


def compiled(name: str, fn: Callable) -> Callable:
    """One ``torch.compile`` object per eager function (shape changes recompile once, then go dynamic)."""
    if name not in _COMPILED:
        try:
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        except Exception:  # noqa: BLE001 - older / newer torch without this knob
            pass
        _COMPILED[name] = torch.compile(fn, dynamic=COMPILE_DYNAMIC)
    return _COMPILED[name]


def compile_reason(case: Case, device: torch.device) -> Optional[str]:
    if not hasattr(torch, "compile"):
        return "torch.compile is missing"
    return None


# --------------------------------------------------------------------------- Liger-Kernel


@functools.lru_cache(maxsize=None)
def liger_import_error() -> Optional[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel, or benchmarks/fetch_wheels.sh)"
    try:
        import liger_kernel.transformers.functional  # noqa: F401
        import liger_kernel.transformers.grpo_loss  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "cannot run here"
        return f"liger-kernel does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
    return None


def liger_reason(case: Case, device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return liger_import_error()
    if device.type != "cuda":
        return "Liger-Kernel is Triton-only and needs CUDA tensors"
    return liger_import_error()


def no_liger(why: str) -> Provider:
    return Provider(build=lambda inputs: None, reason=lambda case, device: f"no Liger-Kernel equivalent: {why}")


def measured_under(op: str) -> Provider:
    """A provider of an op's variant (``ppo_loss+overwrite``) on which the variant's setting changes nothing: its
    numbers are the base op's."""
    return Provider(build=lambda inputs: None, reason=lambda case, device: f"measured under {op}")


# --------------------------------------------------------------------------- our backends

_PROBES: Dict[Tuple[str, str, str], Optional[str]] = {}


def our_reason(op: str, fn: Callable, backend: str, probe: Callable[[str, torch.device], object]):
    """A ``reason`` for ``backend=``: dispatch says it cannot run, the op has no ``backend=``
    parameter yet, or a tiny probe call raises (e.g. "has no kernel for ...")."""

    def reason(case: Case, device: torch.device) -> Optional[str]:
        key = (op, backend, device.type)
        if key not in _PROBES:
            _PROBES[key] = _probe(op, fn, backend, probe, device)
        return _PROBES[key]

    return reason


def _probe(op, fn, backend, probe, device) -> Optional[str]:
    if "backend" not in inspect.signature(fn).parameters:
        return f"rk.{op} takes no backend= yet (reference only)"
    from rlhf_kernels.ops._dispatch import unavailable_reason

    why = unavailable_reason(backend, device)
    if why:
        return why
    try:
        probe(backend, device)
    except (ValueError, RuntimeError, NotImplementedError, ImportError, TypeError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None
