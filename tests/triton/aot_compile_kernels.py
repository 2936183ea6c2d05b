"""AOT-compile every Triton kernel for an NVIDIA target without a GPU (run as a script, TRITON_INTERPRET unset).

Catches what only the compiler sees (branch type mismatches, unsupported ops)
while CI has no GPU. Then every forward autotune candidate is compiled as the
autotuner would see it on a GPU (16-byte aligned rows) and its cubin's resource
usage read with cuobjdump (the toolkit's, or the copy Triton ships): a candidate that spills registers to
local memory or a stack fails the run. Usage: python aot_compile_kernels.py [sm] [shard/shards] [--no-candidate-sweep]
(``1/2``: the second of two halves of the compiles, every other one, so two processes share a 2-core machine).
"""
import os, sys, inspect, tempfile
os.environ.pop("TRITON_INTERPRET", None)
from triton.compiler import ASTSource, compile
from triton.backends.compiler import GPUTarget
from rlhf_kernels.triton import logprobs, kl, ppo, advantages, scale, aggregate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import sass_report  # noqa: E402 (the checkout's root, for the cubin resource reader)

# --no-candidate-sweep: the kernels' variants only, not every forward autotune candidate (the oldest Triton's run)
CANDIDATE_SWEEP = "--no-candidate-sweep" not in sys.argv[1:]
positional = [a for a in sys.argv[1:] if not a.startswith("--")]
target = GPUTarget("cuda", int(positional[0]) if positional else 90, 32)
SHARD, SHARDS = map(int, (positional[1] if len(positional) > 1 else "0/1").split("/"))
assert 0 <= SHARD < SHARDS, f"shard {SHARD}/{SHARDS}"
_compiles = 0  # compiles asked for so far: this process does those whose index falls in its shard
CUOBJDUMP = sass_report.find_cuobjdump()

def sig_for(fn, types, consts):
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = types.get(n, "*fp32")
        elif n in types:
            sig[n] = types[n]
        elif n in ("inv_t", "kl_coef", "ent_coef", "clip_low", "clip_high", "dual_clip", "clamp", "gamma", "gamma_lam"):
            sig[n] = "fp32"
        else:
            sig[n] = "i64" if n in ("ignore_index",) or n.startswith("stride") else "i32"
    return sig

def build(kernel, types, consts, warps, aligned=()):
    """Compile ``kernel``; ``aligned``: arguments the GPU launch would see divisible by 16 (pointers, V, strides).
    None when the compile belongs to another shard."""
    global _compiles
    _compiles += 1
    if (_compiles - 1) % SHARDS != SHARD:
        return None
    fn = kernel
    if "constexprs" in inspect.signature(ASTSource).parameters:  # triton >= 3.3
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        src = ASTSource(fn=fn, signature=sig_for(fn, types, consts), constexprs=consts, attrs=attrs)
    else:  # triton 3.2: the divisibility hints through its AttrsDescriptor
        from triton.backends.compiler import AttrsDescriptor
        attrs = AttrsDescriptor.from_hints({fn.arg_names.index(n): 16 for n in aligned})
        src = ASTSource(fn=fn, signature=sig_for(fn, types, consts), constants=consts, attrs=attrs)
    k = compile(src, target=target, options={"num_warps": warps})
    md = k.metadata
    print(f"ok {fn.__name__:32s} {types.get('x_ptr', '')} consts={consts} warps={warps} shared={md.shared} regs={getattr(k, 'n_regs', '?')}")
    return k


def resource_usage(k):
    """``REG:.. STACK:.. SHARED:.. LOCAL:..`` of a compiled kernel's cubin (benchmarks/sass_report.py's reading of
    ``cuobjdump -res-usage``), or None without a cuobjdump."""
    if CUOBJDUMP is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = sass_report.resource_usage(CUOBJDUMP, f.name, f"sm_{target.arch}")
    return next(iter(usage.values()), None)

def vector_accesses(k):
    """How many 16-byte (v4) global loads and stores a compiled kernel's PTX has."""
    ptx = k.asm["ptx"]
    return ptx.count("ld.global.v4"), ptx.count("st.global.v4")


unvectorised = []


def both_walks(kernel, body):
    """The fused PPO kernel's second walk (its gradient's, ``ALIGNED_GRAD``) as its first, as launched with a
    co-aligned gradient; nothing for the other kernels."""
    return {"ALIGNED_GRAD": body} if "ALIGNED_GRAD" in kernel.arg_names else {}


def build_odd_rows(kernel, types, consts, warps, stores=True):
    """A kernel as launched on rows of an odd length and stride (GPT-2's V = 50257: only the pointers are 16-byte
    aligned), with and without ALIGNED_BODY; with it, the whole blocks must load (a backward: and store) 16 bytes at
    a time (triton/_common.py), without it (the rows' alignment unknown to Triton) they cannot."""
    pointers = tuple(n for n in kernel.arg_names if n.endswith("_ptr"))
    vec = {"*bf16": 8, "*fp16": 8, "*fp32": 4}[types["x_ptr"]]
    for body in (False, True):
        k = build(kernel, types, dict(consts, ALIGNED_BODY=body, VEC=vec, **both_walks(kernel, body)), warps, pointers)
        if k is None:
            continue
        loads, wide_stores = vector_accesses(k)
        print(f"   16-byte loads {loads}, stores {wide_stores}")
        if body != (loads > 0 and (wide_stores > 0 or not stores)):
            unvectorised.append(f"{kernel.__name__} {types['x_ptr']} {consts} ALIGNED_BODY={body}: {loads} / "
                                f"{wide_stores}")


for dt in ("*bf16", "*fp16", "*fp32"):
    build_odd_rows(logprobs._logprobs_fwd_kernel, {"x_ptr": dt, "y_ptr": "*i64"}, {"BLOCK_V": 4096, "LANES_V": 4096}, 8,
                   stores=False)
    build_odd_rows(logprobs._logprobs_bwd_kernel, {"x_ptr": dt, "dx_ptr": dt, "y_ptr": "*i64"}, {"BLOCK_V": 4096}, 8)
    build_odd_rows(kl._kl_divergence_fwd_kernel, {"x_ptr": dt, "r_ptr": dt}, {"BLOCK_V": 4096, "LANES_V": 4096}, 16,
                   stores=False)
    for need in (True, False):
        build_odd_rows(kl._kl_divergence_bwd_kernel, {"x_ptr": dt, "r_ptr": dt, "dx_ptr": dt, "dr_ptr": dt},
                       {"BLOCK_V": 4096, "NEED_REF_GRAD": need}, 8)
    for est in (1, 2, 3):
        for clamp in (True, False):
            build(kl._kl_estimate_fwd_kernel, {"logp_ptr": dt, "ref_ptr": dt, "out_ptr": dt}, {"KL_EST": est, "HAS_CLAMP": clamp, "BLOCK": 1024}, 4)
            build(kl._kl_estimate_bwd_kernel, {"logp_ptr": dt, "ref_ptr": dt, "g_ptr": dt, "dlogp_ptr": dt, "dref_ptr": dt}, {"KL_EST": est, "HAS_CLAMP": clamp, "BLOCK": 1024}, 4)
    for has_ref in (True, False):
        for dual in (True, False):
            c = {"BLOCK_V": 4096, "HAS_REF": has_ref, "KL_EST": 3, "HAS_DUAL": dual}
            build_odd_rows(ppo._ppo_fwd_kernel, {"x_ptr": dt, "y_ptr": "*i64"}, dict(c, LANES_V=4096), 8, stores=False)
            build_odd_rows(ppo._ppo_bwd_kernel, {"x_ptr": dt, "dx_ptr": dt, "y_ptr": "*i64"}, c, 8)
            build_odd_rows(ppo._ppo_fused_kernel, {"x_ptr": dt, "dx_ptr": dt, "y_ptr": "*i64"}, dict(c, LANES_V=4096),
                           8)
    for n_type in ("i32", "i64"):  # (n past 2^31 elements arrives as i64)
        k = build(scale._scale_unless_one_kernel, {"x_ptr": dt, "scale_ptr": "*fp32", "n": n_type}, {"BLOCK": 4096}, 8,
                  ("x_ptr", "n"))  # (n divisible by 16, as Triton's launch specialises it: N·V at V = 151936)
        if k is not None and vector_accesses(k) == (0, 0):
            unvectorised.append(f"_scale_unless_one_kernel {dt} n {n_type}: no 16-byte accesses")
    build(advantages._gae_fwd_kernel, {"r_ptr": dt, "v_ptr": dt, "adv_ptr": dt, "ret_ptr": dt}, {"BLOCK_B": 32}, 1)
for mask_type in ("*fp32", "*u8", "*i64", "*fp16"):  # the fused PPO step's aggregation (triton/aggregate.py)
    for agg in range(4):
        for rows_b, cols_b in ((1, 2048), (16, 128)):
            build(aggregate._loss_weights_kernel, {"mask_ptr": mask_type},
                  {"AGG": agg, "BLOCK": 2048, "ROWS_B": rows_b, "COLS_B": cols_b}, 8)
    build(aggregate._loss_sums_kernel, {"mask_ptr": mask_type}, {"BLOCK": 2048}, 8)
for est in (1, 2):
    build(ppo._ppo_fwd_kernel, {"x_ptr": "*bf16", "y_ptr": "*i64"}, {"BLOCK_V": 4096, "LANES_V": 4096, "HAS_REF": True, "KL_EST": est, "HAS_DUAL": True, "ALIGNED_BODY": False, "VEC": 8}, 8)
# float64 outputs (forced triton on float64 logits)
build(logprobs._logprobs_fwd_kernel, {"x_ptr": "*fp64", "y_ptr": "*i64", "logp_ptr": "*fp64", "ent_ptr": "*fp64", "lse_ptr": "*fp64"}, {"BLOCK_V": 4096, "LANES_V": 4096, "ALIGNED_BODY": True, "VEC": 2}, 8)

# Every forward autotune candidate, as launched on 16-byte aligned rows: none may spill.
from rlhf_kernels.triton import _common
row_aligned = ("x_ptr", "V", "stride_b", "stride_t")
forwards = [
    (logprobs._logprobs_fwd_kernel, _common._ROW_FWD_CANDIDATES, {}, row_aligned),
    (ppo._ppo_fwd_kernel, _common._ROW_FWD_CANDIDATES, {"HAS_REF": True, "KL_EST": 3, "HAS_DUAL": True}, row_aligned),
    (ppo._ppo_fused_kernel, ppo._PPO_FUSED_CANDIDATES, {"HAS_REF": True, "KL_EST": 3, "HAS_DUAL": True},
     row_aligned + ("dx_ptr", "stride_ob", "stride_ot")),
    (kl._kl_divergence_fwd_kernel, _common._TWO_ROW_FWD_CANDIDATES, {},
     ("x_ptr", "r_ptr", "V", "stride_xb", "stride_xt", "stride_rb", "stride_rt")),
]
# float32 only: of 35 candidate configs compiled both ways (2026-11-29, sm_90), float32 took more registers in 12 (up to
# +34, to 127 where bfloat16 took 93) and fewer in 4 (at most 8 fewer, all under 50 registers): float32 is the build
# that nears the limit, and the sweep's bfloat16 half cost CI ~100 s. (Every kernel's bfloat16 variants are still
# compiled above, with their 16-byte access checks.)
SWEEP_DT, SWEEP_VEC = "*fp32", 4
spilled = []
for kernel, candidates, consts, aligned in forwards if CANDIDATE_SWEEP else ():
    for block, lanes, warps in candidates:
        # as launched on aligned rows, and (ALIGNED_BODY) on rows of an odd length and stride
        for body, proven in ((False, aligned), (True, tuple(n for n in aligned if n.endswith("_ptr")))):
            k = build(kernel, {"x_ptr": SWEEP_DT, "r_ptr": SWEEP_DT, "dx_ptr": SWEEP_DT, "y_ptr": "*i64"},
                      dict(consts, BLOCK_V=block, LANES_V=lanes, ALIGNED_BODY=body, VEC=SWEEP_VEC,
                           **both_walks(kernel, body)), warps, proven)
            if k is None:
                continue
            usage = resource_usage(k)
            print(f"   {usage}")
            if usage is not None and not ("STACK:0" in usage and "LOCAL:0" in usage):
                spilled.append(f"{kernel.__name__} {SWEEP_DT} {block}x{lanes}x{warps} ALIGNED_BODY={body}: {usage}")
if spilled:
    print("SPILLS (a forward candidate keeps state in local memory):\n" + "\n".join(spilled))
    sys.exit(1)
if unvectorised:
    print("16-BYTE ACCESSES not as expected (ALIGNED_BODY: whole blocks vectorised; without it: none):\n"
          + "\n".join(unvectorised))
    sys.exit(1)
print(f"ALL OK ({_compiles} compiles, shard {SHARD}/{SHARDS})")
