"""Static report of the compiled CUDA kernels: resources and the instruction mix of their loops.

Why: a GPU is lent to few sessions, and the forward row reductions were measured
issue-bound (about 15 instructions per bf16 value against a budget of ~22 at
H100 bandwidth). The SASS of the built extension says, without a GPU, what each
kernel's loops issue per iteration, whether registers spill (local memory) and how
many CTAs fit an SM, so a kernel change can be judged before its GPU run::

    python -m benchmarks.sass_report                      # the installed rlhf_kernels/_C*.so, sm_90
    python -m benchmarks.sass_report --arch sm_80 --kernel ppo_fwd --out report.md

A loop is a backward branch; its body is every instruction between the branch and
its target (rarely taken paths inside it, such as a partial vector's element loads,
are counted too, so per-value figures are upper bounds). Needs ``cuobjdump`` (CUDA
toolkit, or the copy Triton ships).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from CUDA_HOME, PATH, /usr/local/cuda*, or Triton's bundled copy."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump"), shutil.which("cuobjdump") or ""]
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def find_extension() -> Optional[str]:
    found = sorted(glob.glob(os.path.join(ROOT, "rlhf_kernels", "_C*.so")))
    return found[0] if found else None


def short_names(symbols: List[str]) -> Dict[str, str]:
    """{symbol: `logprobs_fwd_kernel<bf16>`} through c++filt (the symbol itself where that is missing)."""
    names = {s: s for s in symbols}
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not symbols:
        return names
    done = subprocess.run([cxxfilt], input="\n".join(symbols), capture_output=True, text=True)
    dtypes = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}
    for symbol, full in zip(symbols, done.stdout.splitlines()):
        m = re.search(r"(\w+_kernel)<([^>]*)>", full)
        if not m:
            plain = re.search(r"(\w+_kernel)\(", full)
            if plain:
                names[symbol] = plain.group(1)
        if m:
            args = [a.strip() for a in m.group(2).split(",")]
            args[0] = dtypes.get(args[0], args[0])
            names[symbol] = f"{m.group(1)}<{', '.join(args)}>"
    return names


def parse_sass(text: str) -> Dict[str, List[Tuple[int, str]]]:
    """{kernel symbol: [(address, instruction)]} from `cuobjdump -sass` output."""
    kernels: Dict[str, List[Tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            current = m.group(1)
            kernels[current] = []
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and current is not None:
            kernels[current].append((int(m.group(1), 16), m.group(2)))
    return kernels


def opcode(instruction: str) -> str:
    parts = instruction.split()
    op = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
    return op.split(".")[0]


def loops(instructions: List[Tuple[int, str]], min_size: int) -> List[Tuple[int, int, Counter]]:
    """(start, end, opcode counts) of every backward branch spanning at least min_size instructions."""
    out = []
    for addr, ins in instructions:
        m = re.search(r"BRA\s+(?:\S+,\s*)?0x([0-9a-f]+)", ins)
        if not m or int(m.group(1), 16) >= addr:
            continue
        start = int(m.group(1), 16)
        body = Counter(opcode(i) for a, i in instructions if start <= a <= addr)
        if sum(body.values()) >= min_size and not body["SHFL"]:  # reductions are not the sweep
            out.append((start, addr, body))
    return out


def resource_usage(cuobjdump: str, binary: str, arch: str) -> Dict[str, str]:
    text = subprocess.run([cuobjdump, "-res-usage", "-arch", arch, binary], capture_output=True, text=True).stdout
    usage, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
        elif current and "REG:" in line:
            usage[current] = " ".join(f for f in line.split() if f.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"))
    return usage


def report(binary: str, arch: str, kernel_filter: str, min_loop: int) -> str:
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise SystemExit("sass_report: cuobjdump not found (CUDA toolkit or Triton's copy)")
    sass = subprocess.run([cuobjdump, "-sass", "-arch", arch, binary], capture_output=True, text=True)
    if sass.returncode != 0 or "Function" not in sass.stdout:
        raise SystemExit(f"sass_report: no {arch} code in {binary}: {sass.stderr.strip()[:300]}")
    usage = resource_usage(cuobjdump, binary, arch)
    lines = [f"# SASS of {os.path.basename(binary)} ({arch})", "",
             "| kernel | resources | loop (addresses) | instructions | top opcodes |", "|---|---|---|---|---|"]
    kernels = parse_sass(sass.stdout)
    names = short_names(list(kernels))
    for symbol, instructions in sorted(kernels.items(), key=lambda kv: names[kv[0]]):
        name = names[symbol]
        if kernel_filter and kernel_filter not in name:
            continue
        found = loops(instructions, min_loop)
        if not found:
            lines.append(f"| `{name}` | {usage.get(symbol, '')} | – | {len(instructions)} in all | |")
        for start, end, body in found:
            mix = ", ".join(f"{op} {n}" for op, n in body.most_common(8))
            lines.append(f"| `{name}` | {usage.get(symbol, '')} | {start:#x}–{end:#x} | {sum(body.values())} | {mix} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", default=None,
                        help="extension .so or cubin (default: the built rlhf_kernels/_C*.so)")
    parser.add_argument("--arch", default="sm_90", help="architecture in the fat binary (default sm_90)")
    parser.add_argument("--kernel", default="", help="only kernels whose short name contains this (e.g. fwd)")
    parser.add_argument("--min-loop", type=int, default=40, help="smallest loop body reported (instructions)")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    binary = args.binary or find_extension()
    if binary is None:
        raise SystemExit("sass_report: no built extension (make build) and no --binary")
    text = report(binary, args.arch, args.kernel, args.min_loop)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
