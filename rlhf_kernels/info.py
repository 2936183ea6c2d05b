"""``rk.info()`` / ``rlhf-kernels info``: versions, device and which backends are live (and why not)."""

from __future__ import annotations

import platform

import torch

from . import _ext, settings
from .ops import advantages, kl, logprobs, ppo
from .ops._dispatch import _GPU_DEFAULT, BACKENDS, GPU_PREFERENCE, installed_version, unavailable_reason

# Which backends have a kernel for each op family (the reference "torch" serves every op).
OP_KERNELS = {
    "logprobs": logprobs.IMPLEMENTED,
    "kl_divergence": kl.IMPLEMENTED,
    "kl_estimate": kl.ESTIMATE_IMPLEMENTED,
    "ppo_loss": ppo.IMPLEMENTED,
    "gae": advantages.IMPLEMENTED,
}


def _version(package: str) -> str:
    return installed_version(package) or "not installed"


# The stacks the drop-ins (rlhf_kernels/integrations) and the benchmarks were checked against: another installed
# version may still work, and a bug report should say which one it was.
CHECKED_AGAINST = {
    "trl": "1.16 (integrations.trl)",
    "verl": "0.9.1 (integrations.verl)",
    "openrlhf": "0.11.2 (integrations.openrlhf)",
    "liger-kernel": "0.8.5 (benchmarks)",
}


# What ``chunk_by="auto"`` and ``RLHF_KERNELS_LINEAR_GRAD=auto`` pick (ops/_linear_layout.py, ops/linear.py).
_FUSED_LINEAR_PATHS = {
    "linear losses (CE, PPO)": "gradient in the forward, row chunks: 3 matmuls (vocabulary slabs, 4, when the "
                               "[V, H] float32 accumulator would not fit in GPU memory, and on the CPU for a 16-bit "
                               "head that trains)",
    "linear_logprobs": "logits recomputed in backward: 4 matmuls; vocabulary slabs on the GPU for a 16-bit head "
                       "that trains; a frozen head (only hidden trains, no entropy): 2",
}


def info(print_report: bool = True) -> dict:
    """Collect (and print) what this installation can run.

    Returns a dict with ``versions``, ``device``, ``extension``,
    ``backends`` (``name -> "live"`` or the reason it is not, for the CPU
    and, when present, the CUDA device) and ``settings`` (each runtime
    environment variable's value, default and, when invalid, the problem).
    """
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    report = {
        "versions": {
            "rlhf_kernels": _version("rlhf-kernels"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch CUDA": torch.version.cuda or "none (CPU build)",
            "triton": _version("triton"),
            "transformers": _version("transformers"),
        },
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "extension": {
            "loaded": _ext.available(),
            "error": _ext.load_error(),
            "cpu_capability": _ext.cpu_capability(),
            "cuda_kernels": _ext.has_cuda_kernels(),
            "cuda_archs": _ext.cuda_arch_list(),
            "cuda_kernels_per_op": _ext.cuda_kernels(),
        },
        "backends": {},
        "ops": {op: list(kernels) + ["torch"] for op, kernels in OP_KERNELS.items()},
        # the automatic choice for CUDA tensors: first live backend of each op's preference
        "gpu_preference": {
            op: [b for b in GPU_PREFERENCE.get(op.split(" ")[0], _GPU_DEFAULT) if b in kernels]
            for op, kernels in OP_KERNELS.items()
        },
    }
    report["integrations"] = {pkg: {"installed": _version(pkg), "checked": checked}
                              for pkg, checked in CHECKED_AGAINST.items()}
    report["fused_linear"] = dict(_FUSED_LINEAR_PATHS)
    # every runtime setting (rlhf_kernels/settings.py): its value, or its default when unset, and what is wrong
    defaults = {s.name: s.default for s in settings.RUNTIME}
    report["settings"] = {
        name: {"value": raw, "default": defaults[name], "problem": problem}
        for name, (raw, problem) in settings.check().items()
    }
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    for dev in devices:
        for backend in BACKENDS:
            reason = unavailable_reason(backend, dev)
            report["backends"][f"{backend} ({dev.type})"] = "live" if reason is None else reason
    if print_report:
        print(format_report(report))
    return report


def format_report(report: dict) -> str:
    """Human-readable text of ``info()``'s dict."""
    lines = ["rlhf_kernels"]
    lines += [f"  {k:<14} {v}" for k, v in report["versions"].items()]
    lines.append(f"  {'device':<14} {report['device']}")
    ext = report["extension"]
    if ext["loaded"]:
        archs = ext["cuda_archs"] or "-"
        lines.append(
            f"  {'extension':<14} loaded (CPU: {ext['cpu_capability']}; CUDA kernels: "
            f"{'yes' if ext['cuda_kernels'] else 'no'}, archs {archs})"
        )
    else:
        lines.append(f"  {'extension':<14} NOT loaded: {ext['error']}")
    lines.append("backends:")
    lines += [f"  {k:<16} {v}" for k, v in report["backends"].items()]
    lines.append("kernels per op (others use the torch reference):")
    lines += [f"  {k:<28} {', '.join(v)}" for k, v in report["ops"].items()]
    preference = report.get("gpu_preference", {})
    if preference:
        lines.append("automatic choice for CUDA tensors (first live of; ops/_dispatch.py GPU_PREFERENCE):")
        lines += [f"  {k:<28} {' > '.join(v)}" for k, v in preference.items() if v]
    stacks = report.get("integrations", {})
    if stacks:
        lines.append("other stacks (installed; checked against):")
        lines += [f"  {k:<14} {v['installed']}; {v['checked']}" for k, v in stacks.items()]
    paths = report.get("fused_linear", {})
    if paths:
        lines.append("fused-linear ops (hidden states + LM head; ops/linear.py), gradient paths under the defaults:")
        lines += [f"  {k:<28} {v}" for k, v in paths.items()]
    current = report.get("settings", {})
    if current:
        lines.append("settings (environment; rlhf_kernels/settings.py):")
        for name, s in current.items():
            shown = s["value"] if s["value"] is not None else f"unset: {s['default']}"
            lines.append(f"  {name:<30} {shown}" + (f"   INVALID: {s['problem']}" if s["problem"] else ""))
    per_op = ext.get("cuda_kernels_per_op") or {}
    if per_op:
        lines.append(f"cuda kernels (csrc/cuda, compiled for {ext['cuda_archs'] or '-'}):")
        lines += [f"  {k:<28} {v}" for k, v in per_op.items()]
    return "\n".join(lines)
